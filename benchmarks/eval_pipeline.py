"""Evaluation pipeline wall time per stage on a randomly initialised generator: K-step CoSIM generation (Eq. S1),
VAE decoding (latent models), Inception-V3 and DINOv2 ViT-L/14 features (random Kaiming weights written in the
official layouts and loaded through cosim_dist's weights-path code), float64 moments and the Frechet distances.

    python -m benchmarks.eval_pipeline --num-samples 50000 --batch 250          # GPU: 50K EDM2-S, 4 steps, sd-vae
    python -m benchmarks.eval_pipeline --num-samples 8 --batch 4 --device cpu   # CPU-sized (docs/benchmarks.md)

Every stage runs on the same batches (image i uses seed i) and is timed with the device synchronised, so the stage
times add up to the end-to-end time of `task=eval` minus its checkpointing of sums.
"""

import argparse
import importlib.util
import pathlib
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from cosim_dist import cosim
from cosim_dist.eval.decode import make_decoder
from cosim_dist.eval.features import build_metrics
from cosim_dist.eval.metrics import MomentAccumulator, frechet_to_reference
from cosim_dist.eval.samplers import cosim_spec, seeded_inputs
from cosim_dist.nets import build_network

REPO = pathlib.Path(__file__).resolve().parents[1]

def random_weights():
    """tests/helpers/random_weights.py (weight files in the official layouts)."""
    spec = importlib.util.spec_from_file_location('_random_weights', REPO / 'tests' / 'helpers' / 'random_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, defaultdict(float)

    def __call__(self, stage: str, fn: Callable, *args):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - start
        return out

def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='edm2', choices=('edm2', 'songunet', 'dhariwalunet'))
    parser.add_argument('--model-channels', type=int, default=192, help='192 = EDM2-S')
    parser.add_argument('--resolution', type=int, default=64, help='network resolution (EDM2 latents: 64 = 512 px)')
    parser.add_argument('--label-dim', type=int, default=1000)
    parser.add_argument('--steps', type=int, default=4, help='K of Eq. S1')
    parser.add_argument('--num-samples', type=int, default=50000)
    parser.add_argument('--batch', type=int, default=250, help='generation and feature batch')
    parser.add_argument('--decode-batch', type=int, default=8, help='latents per VAE decoder call')
    parser.add_argument('--vae', default='sd', choices=('sd', 'tiny'), help='sd-vae-ft-mse layout or a tiny one')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args()

def main() -> None:
    args = parse()
    device = torch.device(args.device)
    helpers, channels = random_weights(), 4 if args.arch == 'edm2' else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        weights = {'inception': str(helpers.write_inception(tmp / 'inception.pth')),
                   'dinov2': str(helpers.write_dinov2(tmp / 'dinov2.pth'))}
        layout = helpers.SD_VAE if args.vae == 'sd' else helpers.TINY_VAE
        vae = helpers.write_vae(tmp / 'vae', layout) if channels == 4 else None
        metrics = build_metrics(['inception', 'dinov2'], weights, device)
        decode = make_decoder(channels, vae, device, args.decode_batch)
    torch.manual_seed(0)
    G = build_network(args.arch, img_resolution=args.resolution, img_channels=channels, label_dim=args.label_dim,
                      model_channels=args.model_channels).to(device).eval().requires_grad_(False)
    spec = cosim_spec(G, cosim.default_grid(args.steps, cosim.NoiseRange()))
    timer, accs = Timer(device), {m.name: MomentAccumulator(m.kind.dim) for m in metrics}
    shape, total = (channels, args.resolution, args.resolution), time.perf_counter()
    with torch.no_grad():
        for start in range(0, args.num_samples, args.batch):
            seeds = range(start, min(start + args.batch, args.num_samples))
            z, c, noise = timer('inputs (per-seed RNG)', seeded_inputs, seeds, shape, args.label_dim, spec.extra_draws,
                                device)
            x = timer(f'generation ({spec.name})', spec.fn, z, c, noise)
            images = timer('decode to uint8' + (' (VAE)' if vae else ''), decode, x)
            for m in metrics:
                f = timer(f'features {m.info["extractor"]}', m.net, images)
                timer('float64 sums', accs[m.name].update, f)
        for m in metrics:
            timer('Frechet distance', frechet_to_reference, accs[m.name], np.zeros(m.kind.dim), np.eye(m.kind.dim))
    total = time.perf_counter() - total
    params = sum(p.numel() for p in G.parameters())
    print(f'{args.arch} model_channels={args.model_channels} ({params / 1e6:.1f}M params), {shape}, K={args.steps}, '
          f'{args.num_samples} samples, batch {args.batch}, VAE {args.vae if vae else "-"}, device {device}, '
          f'torch threads {torch.get_num_threads()}')
    for stage, seconds in timer.seconds.items():
        print(f'  {stage:<36} {seconds:9.2f} s  {seconds / args.num_samples * 1000:9.2f} ms/img')
    print(f'  {"total":<36} {total:9.2f} s  {args.num_samples / total:9.2f} img/s')

if __name__ == '__main__':
    main()

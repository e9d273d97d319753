"""`task=generate`: images of a distilled generator for chosen seeds, without writing Python.

Image i is the evaluation's image for seed i: the same per-seed inputs (samplers.seeded_inputs) through the same Eq. S1
sampler (samplers.cosim_spec) and decoder (decode.py), written by the same PNG writer (real.save_pngs), so that
`task=generate` and `task=eval eval.png_dir=...` write the same files for the same seeds and batches. The grid is
generate.grid, else the one stored with the generator for K = generate.steps (build.distil), else Eq. S1's default.
The seeds are split over the ranks in contiguous shares (samplers.rank_seeds); rank 0 joins the shares of the npz.
"""

import pathlib

import numpy as np
import torch

from .. import cosim, distributed
from ..config import Config, parse_seeds
from ..distributed import DistEnv
from ..logging import log
from .decode import make_decoder
from .real import generator_eta, generator_path, image_shape, load_generator, save_pngs
from .samplers import cosim_spec, rank_seeds, sample, seeded_inputs

def sampler_grid(cfg: Config, extra: dict, noise: cosim.NoiseRange) -> list[float]:
    """generate.grid, else the generator's stored grid for K = generate.steps, else the default Eq. S1 grid."""
    g = cfg.generate
    stored = extra.get('grids', {}).get(g.steps)
    return list(g.grid or stored or cosim.default_grid(g.steps, noise, cfg.eval.grid_scale))

def seed_labels(seeds: list[int], classes: list[int] | None, index: range, label_dim: int) -> torch.Tensor:
    """The class of each seed at positions `index`: classes[i % len(classes)], else the seed's own random label."""
    if classes is not None:
        return torch.tensor([classes[i % len(classes)] for i in index])
    c = seeded_inputs([seeds[i] for i in index], (1,), label_dim, 0, torch.device('cpu'))[1]
    return c.argmax(1) if c is not None else torch.full((len(index),), -1)

def npz_part(out: pathlib.Path, rank: int) -> pathlib.Path:
    return out / f'.images-rank{rank}.npz'

def run_generate(cfg: Config, device: torch.device, env: DistEnv, noise: cosim.NoiseRange) -> pathlib.Path:
    """Collective: this rank's share of generate.seeds -> PNGs and/or its part of the npz; returns the output dir."""
    g, e = cfg.generate, cfg.eval
    G, extra = load_generator(generator_path(g.generator, cfg.run_dir, 'generate.generator'))
    G = G.to(device)
    spec, seeds = cosim_spec(G, sampler_grid(cfg, extra, noise), generator_eta(extra, cfg)), parse_seeds(g.seeds)
    decode = make_decoder(G.img_channels, e.vae, device, e.decode_batch, cfg.model.latent_raw_mean,
                          cfg.model.latent_raw_std)
    out = pathlib.Path(g.out) if g.out else cfg.run_dir / 'generated'
    out.mkdir(parents=True, exist_ok=True)
    mine, parts = rank_seeds(range(len(seeds)), env.rank, env.world_size), {'images': [], 'labels': [], 'seeds': []}
    log.info(f'{spec.name} grid {[round(t, 4) for t in spec.grid]}: {len(seeds)} seeds into {out}')
    for start in range(mine.start, mine.stop, e.batch):
        index = range(start, min(start + e.batch, mine.stop))
        batch_seeds, labels = [seeds[i] for i in index], seed_labels(seeds, g.classes, index, G.label_dim)
        images = decode(sample(spec, batch_seeds, image_shape(G), G.label_dim, device, labels)).cpu()
        if g.png:
            save_pngs(images, batch_seeds, out)
        for key, value in zip(parts, (images.permute(0, 2, 3, 1).numpy(), labels.numpy(), np.array(batch_seeds))):
            parts[key].append(value)
    if g.npz:
        np.savez(npz_part(out, env.rank), **{k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()})
        distributed.barrier()
        if env.rank == 0:
            files = [npz_part(out, r) for r in range(env.world_size)]
            shares = [dict(np.load(f)) for f in files]
            np.savez(out / 'images.npz', **{k: np.concatenate([s[k] for s in shares if len(s['seeds'])])
                                            for k in parts})
            for f in files:
                f.unlink()
    return out

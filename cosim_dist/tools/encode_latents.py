"""Encode a pixel shard dataset (cosim-make-shards) into latent shards holding the VAE posterior mean and std
(format: cosim_dist/shards.py), with a diffusers AutoencoderKL loaded from a local directory in the
`stabilityai/sd-vae-ft-mse` layout (config.json + weights). Pixels enter the VAE as x/255 in [0, 1] and the dataset
records scale = 0.5/raw_std, bias = -raw_mean*scale (EDM2 conventions, docs/ALGORITHM.md, "Reference facts").

The work is split into --tasks tasks: output shard i (same name and samples as input shard i) belongs to task
i % tasks. A task skips every shard already done, i.e. present and matching its entry `_entries/<shard>.json`
(bytes and sha256); it writes each shard atomically and its entry after it. The task that finds every entry present
writes manifest.parquet. A killed or preempted task is simply rerun; reruns never redo finished shards.

    # every task as a local process (GPU task % device_count when CUDA is present)
    cosim-encode-latents --source s3://b/in512-px --out s3://b/in512-sd --vae /models/sd-vae-ft-mse --tasks 8
    # a Slurm job array through submitit
    cosim-encode-latents ... --tasks 64 --cluster slurm --slurm-partition gpu
    # one task, e.g. from a plain sbatch array (slurm/encode_latents.sbatch)
    cosim-encode-latents ... --tasks 64 --task $SLURM_ARRAY_TASK_ID
(`python -m cosim_dist.tools.encode_latents` is the same command.)
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..distributed import pick_device
from ..eval.decode import load_vae
from ..latents import SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, latent_scale_bias
from ..shards import (
    CorruptShard,
    DatasetInfo,
    ShardEntry,
    load_shard,
    read_manifest,
    write_manifest,
    write_shard,
)
from ..storage import ObjectStore, StorageConfig, open_store

ENTRIES = '_entries' # one JSON ShardEntry per finished output shard

@dataclasses.dataclass(kw_only=True)
class EncodeConfig:
    source: str                                     # pixel dataset (make_shards output): directory or s3:// URL
    out: str                                        # latent dataset: directory or s3:// URL
    vae: str                                        # local AutoencoderKL directory (config.json + weights)
    tasks: int = 1                                  # number of tasks sharing the shards
    batch: int = 32                                 # images per VAE forward
    dtype: str = 'fp16'                             # storage dtype of mean and std: fp16 | fp32
    raw_mean: tuple[float, ...] = SD_VAE_RAW_MEAN   # per-channel latent mean under this VAE (EDM2's for sd-vae-ft-mse)
    raw_std: tuple[float, ...] = SD_VAE_RAW_STD     # per-channel latent std
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.batch < 1:
            raise ValueError(f'--tasks={self.tasks} and --batch={self.batch} must be >= 1')
        if self.dtype not in ('fp16', 'fp32'):
            raise ValueError(f'--dtype={self.dtype!r} must be fp16 or fp32')
        if len(self.raw_mean) != len(self.raw_std):
            raise ValueError(f'--raw-mean {self.raw_mean} and --raw-std {self.raw_std} '
                             'need one value per latent channel each')
        if not (pathlib.Path(self.vae) / 'config.json').is_file():
            raise FileNotFoundError(f'--vae {self.vae}: no config.json; expected a local diffusers AutoencoderKL '
                                    f'directory (e.g. a download of stabilityai/sd-vae-ft-mse)')

#----------------------------------------------------------------------------
# Bookkeeping.

def _entry_key(name: str) -> str:
    return f'{ENTRIES}/{name}.json'

def _done(out: ObjectStore, name: str) -> bool:
    """Whether output shard `name` is present and matches its entry."""
    try:
        entry = ShardEntry(**json.loads(out.read(_entry_key(name))))
        data = out.read(name)
    except FileNotFoundError:
        return False
    return len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256

def latent_info(cfg: EncodeConfig, pixels: DatasetInfo) -> DatasetInfo:
    """Metadata of the latent dataset, from the pixel metadata and the VAE's config.json (no weights needed)."""
    vae = json.loads((pathlib.Path(cfg.vae) / 'config.json').read_text())
    if pixels.kind != 'pixels' or pixels.channels != vae['in_channels']:
        raise ValueError(f'--source {cfg.source}: kind={pixels.kind!r} with {pixels.channels} channels, '
                         f'but the VAE takes uint8 pixels with {vae["in_channels"]} channels '
                         f'(write them with cosim-make-shards --source)')
    if vae['latent_channels'] != len(cfg.raw_mean):
        raise ValueError(f'--vae {cfg.vae} has {vae["latent_channels"]} latent channels '
                         f'but --raw-mean/--raw-std give {len(cfg.raw_mean)}')
    scale, bias = latent_scale_bias(cfg.raw_mean, cfg.raw_std)
    extra = {'source': cfg.source, 'vae': cfg.vae, 'dtype': cfg.dtype, 'pixel_resolution': pixels.resolution,
             'raw_mean': list(cfg.raw_mean), 'raw_std': list(cfg.raw_std), 'classes': pixels.extra.get('classes')}
    return DatasetInfo(kind='latents', resolution=pixels.resolution // 2 ** (len(vae['block_out_channels']) - 1),
                       channels=vae['latent_channels'], label_count=pixels.label_count, latent_scale=scale,
                       latent_bias=bias, extra=extra)

def finalize(out: ObjectStore, info: DatasetInfo, names: list[str]) -> bool:
    """Write the manifest if every shard has its entry; returns whether it did."""
    present = set(out.list(f'{ENTRIES}/'))
    if any(_entry_key(name) not in present for name in names):
        return False
    write_manifest(out, info, [ShardEntry(**json.loads(out.read(_entry_key(name)))) for name in names])
    return True

#----------------------------------------------------------------------------
# Encoding.

def _load_vae(path: str, task: int) -> tuple[torch.nn.Module, torch.device]:
    device = pick_device('auto', task)
    return load_vae(path, device), device

@torch.no_grad()
def _encode(vae: torch.nn.Module, device: torch.device, samples: list[dict[str, Any]],
            batch: int, dtype: str) -> Iterator[dict[str, Any]]:
    np_dtype = np.float16 if dtype == 'fp16' else np.float32
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        # EDM2: [0, 1], not [-1, 1]
        x = torch.from_numpy(np.stack([s['x.npy'] for s in chunk])).to(device, torch.float32) / 255
        dist = vae.encode(x).latent_dist
        mean, std = (t.float().cpu().numpy().astype(np_dtype) for t in (dist.mean, dist.std))
        for s, m, d in zip(chunk, mean, std):
            yield {'__key__': s['__key__'], 'mean.npy': m, 'std.npy': d} | ({'cls': s['cls']} if 'cls' in s else {})

def run_task(cfg: EncodeConfig, task: int) -> dict[str, Any]:
    """Encode the shards of `task` that are not done yet, then write the manifest if the dataset is complete."""
    if not 0 <= task < cfg.tasks:
        raise ValueError(f'--task={task} must be in [0, --tasks={cfg.tasks})')
    src, out = open_store(cfg.source, cfg.storage), open_store(cfg.out, cfg.storage)
    pixels, entries = read_manifest(src)
    info = latent_info(cfg, pixels)
    mine = entries[task::cfg.tasks]
    todo = [e for e in mine if not _done(out, e.name)]
    print(f'task {task}/{cfg.tasks}: {len(mine)} shards, {len(mine) - len(todo)} already done, {len(todo)} to encode',
          flush=True)
    images, start = 0, time.perf_counter()
    if todo:
        vae, device = _load_vae(cfg.vae, task)
        start = time.perf_counter() # images/s of encoding, without the model load
        for k, entry in enumerate(todo):
            try:
                samples = load_shard(src, entry, pixels)
            except CorruptShard as e:
                raise RuntimeError(f'{src.url}/{entry.name} is corrupt ({e}); re-create the source dataset '
                                   f'(cosim_dist.shards.verify_manifest lists every bad shard)') from e
            written = write_shard(out, entry.name, _encode(vae, device, samples, cfg.batch, cfg.dtype), info)
            out.put_bytes(json.dumps(dataclasses.asdict(written)).encode(), _entry_key(entry.name))
            images += written.samples
            rate = images / (time.perf_counter() - start)
            print(f'task {task}: {out.url}/{entry.name} ({k + 1}/{len(todo)}), {rate:.1f} images/s', flush=True)
    complete = finalize(out, info, [e.name for e in entries])
    return {'task': task, 'encoded': len(todo), 'skipped': len(mine) - len(todo), 'images': images,
            'seconds': time.perf_counter() - start, 'manifest': complete}

#----------------------------------------------------------------------------
# Launching.

def launch(cfg: EncodeConfig, *, cluster: str, log_dir: str, timeout_min: int, slurm_partition: str | None = None,
           gpus_per_task: int = 1, cpus_per_task: int = 8, parallelism: int = 64) -> list[dict[str, Any]]:
    """Run every task through submitit (local processes or a Slurm array) and wait for them."""
    import submitit
    executor = submitit.AutoExecutor(folder=log_dir, cluster=cluster)
    executor.update_parameters(name='encode_latents', timeout_min=timeout_min, cpus_per_task=cpus_per_task,
                               local_gpus_per_node=torch.cuda.device_count(), slurm_gpus_per_node=gpus_per_task,
                               slurm_array_parallelism=parallelism,
                               **({'slurm_partition': slurm_partition} if slurm_partition else {}))
    jobs = executor.map_array(run_task, [cfg] * cfg.tasks, range(cfg.tasks))
    print(f'submitted {len(jobs)} {cluster} tasks (job {jobs[0].job_id.split("_")[0]}); logs in {log_dir}', flush=True)
    results, failed = [], []
    for task, job in enumerate(jobs):
        try:
            results.append(job.result())
        except Exception as e: # a task died: report it and the others; a rerun resumes
            failed.append(f'task {task} (job {job.job_id}): '
                          f'{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}')
    if failed:
        raise RuntimeError(f'{len(failed)} of {len(jobs)} tasks failed; rerun the same command to finish the rest:\n  '
                           + '\n  '.join(failed))
    return results

def encode(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the command line, run the tasks it asks for and print a summary; the per-task results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', required=True, help='pixel dataset (directory or s3:// URL)')
    parser.add_argument('--out', required=True, help='latent dataset (directory or s3:// URL)')
    parser.add_argument('--vae', required=True, help='local AutoencoderKL directory (stabilityai/sd-vae-ft-mse layout)')
    parser.add_argument('--tasks', type=int, default=1, help='number of tasks sharing the shards')
    parser.add_argument('--task', type=int, help='run only this task, in this process')
    parser.add_argument('--cluster', choices=('local', 'slurm'), default='local',
                        help='where the tasks run (without --task)')
    parser.add_argument('--batch', type=int, default=32, help='images per VAE forward')
    parser.add_argument('--dtype', choices=('fp16', 'fp32'), default='fp16', help='storage dtype of mean and std')
    parser.add_argument('--raw-mean', type=float, nargs='+', default=SD_VAE_RAW_MEAN,
                        help='per-channel latent mean (EDM2 sd-vae-ft-mse)')
    parser.add_argument('--raw-std', type=float, nargs='+', default=SD_VAE_RAW_STD,
                        help='per-channel latent std (EDM2 sd-vae-ft-mse)')
    parser.add_argument('--endpoint-url', help='S3 endpoint (default: $AWS_ENDPOINT_URL / $S3_ENDPOINT_URL, else AWS)')
    parser.add_argument('--log-dir', default='logs/encode_latents', help='submitit folder for task logs')
    parser.add_argument('--timeout-min', type=int, default=240, help='time limit per task')
    parser.add_argument('--slurm-partition', help='Slurm partition')
    parser.add_argument('--gpus-per-task', type=int, default=1, help='GPUs per Slurm task')
    parser.add_argument('--cpus-per-task', type=int, default=8, help='CPUs per task')
    parser.add_argument('--parallelism', type=int, default=64, help='Slurm tasks running at once')
    args = parser.parse_args(argv)
    cfg = EncodeConfig(source=args.source, out=args.out, vae=args.vae, tasks=args.tasks, batch=args.batch,
                       dtype=args.dtype, raw_mean=tuple(args.raw_mean), raw_std=tuple(args.raw_std),
                       storage=StorageConfig(endpoint_url=args.endpoint_url))
    if args.task is not None:
        results = [run_task(cfg, args.task)]
    else:
        results = launch(cfg, cluster=args.cluster, log_dir=args.log_dir, timeout_min=args.timeout_min,
                         slurm_partition=args.slurm_partition, gpus_per_task=args.gpus_per_task,
                         cpus_per_task=args.cpus_per_task, parallelism=args.parallelism)
    images, seconds = sum(r['images'] for r in results), max(r['seconds'] for r in results)
    print(f'encoded {images} images in {sum(r["encoded"] for r in results)} shards '
          f'({images / max(seconds, 1e-9):.1f} images/s over {len(results)} task(s)); '
          f'skipped {sum(r["skipped"] for r in results)} finished shards; '
          f'manifest {"written" if any(r["manifest"] for r in results) else "pending (other tasks still running)"}',
          flush=True)
    return results

def main(argv: Sequence[str] | None = None) -> int:
    """The `cosim-encode-latents` console script."""
    encode(argv)
    return 0

if __name__ == '__main__':
    sys.exit(main())

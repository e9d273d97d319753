"""Save and restore of a synthetic training state through the real checkpoint path (elastic.py shards,
CheckpointManager, SeaweedFS S3 on 127.0.0.1), over R local ranks (gloo), next to the raw-transfer floor: the same
bytes per rank moved by a plain boto3 `upload_file` / `download_file`, in the same run.

    python benchmarks/checkpoint_s3.py                      # 2 GiB over 4 ranks
    python benchmarks/checkpoint_s3.py --mib 512 --ranks 2

Save: each rank's partitions -> its shard with the hashes, upload, commit. Restore on the same R ranks: manifest,
indexes and each rank's own shard by a ranged read, verified, then the all-to-alls (which carry nothing here: every
rank read exactly what it holds). Floor: the same bytes per rank through boto3. Each is timed until the slowest rank
is done, over several rounds, alternating which goes first. The state is held like ZeRO-3's: each rank holds 1/R of
every tensor (parameters, moments and the EMA alike). A restore on another number of ranks (an even cut of the
global order and an all-to-all) is measured by the tests' byte counts, not here.
"""

import argparse
import functools
import importlib.util
import os
import pathlib
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from cosim_dist.checkpoint import CheckpointManager
from cosim_dist.distributed import gather_object
from cosim_dist.elastic import load_state, save_state, shard_name
from cosim_dist.trainer import read_meta

REPO = pathlib.Path(__file__).resolve().parents[1]
TENSOR_MIB = 16                     # synthetic tensors of 16 MiB (4M fp32 elements), like large conv weights

def timed(fn) -> float:
    """Seconds until every rank has finished fn (the slowest rank's time: a save or restore is collective). Each
    starts on a settled machine: the previous phase's dirty pages written back and SeaweedFS given 2 s to finish
    (without this, whichever transfer came second in a round paid for the first one's write-back: measured up to 2x)."""
    if torch.distributed.get_rank() == 0:
        os.sync()
    time.sleep(2)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    fn()
    torch.distributed.barrier()
    return time.perf_counter() - t0

def timed_pair(floor, real, floor_first: bool) -> tuple[float, float]:
    """(floor seconds, real seconds), measured in the given order."""
    if floor_first:
        floor_s = timed(floor)
        return floor_s, timed(real)
    real_s = timed(real)
    return timed(floor), real_s

def rank_main(rank: int, ranks: int, port: int, url: str, work: str, mib: int, rounds: int, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)                                # as torchrun sets OMP_NUM_THREADS=1 per rank
    torch.distributed.init_process_group('gloo', rank=rank, world_size=ranks)
    import boto3
    specs = [(f't{i}', (TENSOR_MIB << 18,)) for i in range(mib // TENSOR_MIB)]
    n = TENSOR_MIB << 18                                    # elements per tensor; rank r holds its 1/R (ZeRO-3)
    holdings = [[(r * n // ranks, (r + 1) * n // ranks)] * len(specs) for r in range(ranks)]
    gen = torch.Generator().manual_seed(rank)
    mine = [torch.randn(b - a, generator=gen) for a, b in holdings[rank]]
    ck = CheckpointManager(url, pathlib.Path(work) / 'staging', rank=rank, async_upload=False)
    bucket, _, prefix = url[len('s3://'):].partition('/')
    s3, config = boto3.client('s3'), ck.store.transfer
    info = {}

    def write(path: pathlib.Path) -> dict[str, str]:
        _, digests = save_state(path, specs, holdings, mine.__getitem__, mine.__getitem__, rank, ranks)
        if rank == 0:
            torch.save({'state': {}}, path / 'meta.pt')
        return digests

    def save(step: int) -> None:
        t0 = time.perf_counter()
        path = ck.stage(step)
        digests = write(path)
        info['write_s'] = time.perf_counter() - t0
        ck.commit(step, digests)

    floor_dir = pathlib.Path(work) / f'floor-{rank}'         # the same bytes as every save's shard, for the floor
    write(floor_dir)
    floor_file = floor_dir / f'{shard_name(rank, ranks)}.bin'
    info['shard'] = floor_file.stat().st_size

    def restore() -> None:
        reader = CheckpointManager(url, pathlib.Path(work) / 'restore', rank=rank).latest()
        _, layout = read_meta(reader)
        load_state(layout, specs, reader.read_range, holdings[rank], lambda i, v: None, rank, ranks)
        info['read'] = reader.bytes_read

    def upload(step: int) -> None:
        s3.upload_file(str(floor_file), bucket, f'{prefix}/floor/{step}/{rank}', Config=config)

    def download(step: int) -> None:
        s3.download_file(bucket, f'{prefix}/floor/{step}/{rank}', f'{floor_file}.down', Config=config)

    for step in range(1, rounds + 1):                       # odd rounds measure the floor first (no order bias)
        up_s, save_s = timed_pair(functools.partial(upload, step), functools.partial(save, step), step % 2)
        down_s, restore_s = timed_pair(functools.partial(download, step), restore, step % 2)
        write_s = max(gather_object(info['write_s']))
        results.put((step, rank, info['shard'], info['read'], save_s, up_s, restore_s, down_s, write_s))
    torch.distributed.destroy_process_group()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mib', type=int, default=2048, help='state size in MiB')
    parser.add_argument('--ranks', type=int, default=4, help='local ranks (gloo)')
    parser.add_argument('--rounds', type=int, default=3, help='rounds (the table gives each and the median)')
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location('seaweedfs', REPO / 'tests' / 'services' / 'seaweedfs.py')
    seaweedfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seaweedfs)
    with tempfile.TemporaryDirectory() as tmp, seaweedfs.serve(pathlib.Path(tmp) / 'seaweedfs', bucket='bench') as ep:
        os.environ.update(ep.env())
        ctx = mp.get_context('spawn')
        results = ctx.Queue()
        port = seaweedfs._free_ports(1)[0]
        procs = [ctx.Process(target=rank_main, args=(r, args.ranks, port, f's3://{ep.bucket}/ckpt', tmp, args.mib,
                                                      args.rounds, results)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        rows = sorted(results.get(timeout=3600) for _ in range(len(procs) * args.rounds))
        for p in procs:
            p.join()
    shard = [r[2] / 2**20 for r in rows if r[0] == 1]
    read = [r[3] / 2**20 for r in rows if r[0] == 1]
    print(f'{args.mib} MiB state over {args.ranks} ranks, SeaweedFS S3 on 127.0.0.1; per rank: writes {min(shard):.0f}'
          f'-{max(shard):.0f} MiB, reads {min(read):.0f}-{max(read):.0f} MiB on restore. Floor: boto3 upload_file / '
          f'download_file of the same bytes, same transfer settings. Seconds until the slowest rank is done.')
    print('| round | save s (of which writing the shard) | upload floor s | save / floor | restore s '
          '| download floor s | restore / floor |')
    print('|---|---|---|---|---|---|---|')
    table = [rows[k * args.ranks][4:] for k in range(args.rounds)]     # timed() is equal on every rank
    for k, (save_s, up_s, restore_s, down_s, write_s) in enumerate(table, 1):
        print(f'| {k} | {save_s:.2f} ({write_s:.2f}) | {up_s:.2f} | {save_s / up_s:.2f} | {restore_s:.2f} '
              f'| {down_s:.2f} | {restore_s / down_s:.2f} |')
    med = [statistics.median(col) for col in zip(*table, strict=True)]
    ratios = [statistics.median(t[0] / t[1] for t in table), statistics.median(t[2] / t[3] for t in table)]
    print(f'| median | {med[0]:.2f} ({med[4]:.2f}) | {med[1]:.2f} | {ratios[0]:.2f} | {med[2]:.2f} | {med[3]:.2f} '
          f'| {ratios[1]:.2f} |')

if __name__ == '__main__':
    main()

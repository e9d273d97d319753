"""Save and restore of a synthetic training state through the real checkpoint path (elastic.py shards,
CheckpointManager, SeaweedFS S3 on 127.0.0.1), over R local ranks (gloo), next to the raw-transfer floor: the same
bytes per rank moved by a plain boto3 `upload_file` / `download_file`, in the same run.

    python benchmarks/checkpoint_s3.py                      # 2 GiB over 4 ranks
    python benchmarks/checkpoint_s3.py --mib 512 --ranks 2

Per rank: the shard bytes it writes, save seconds (state -> shard + block hashes + upload + commit), restore seconds
(manifest, indexes and its 1/R of the bytes by ranged reads, verified, then every tensor assembled by broadcasts)
and the floor seconds for its bytes. Restore here includes the broadcasts that hand every rank every tensor.
"""

import argparse
import importlib.util
import math
import os
import pathlib
import tempfile
import time

import torch
import torch.multiprocessing as mp

from cosim_dist.checkpoint import CheckpointManager
from cosim_dist.elastic import load_state, save_owners, save_state, shard_name
from cosim_dist.trainer import read_meta

REPO = pathlib.Path(__file__).resolve().parents[1]
TENSOR_MIB = 16                     # synthetic tensors of 16 MiB (4M fp32 elements), like large conv weights

def rank_main(rank: int, ranks: int, port: int, url: str, work: str, mib: int, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=ranks)
    import boto3
    specs = [(f't{i}', (TENSOR_MIB << 18,)) for i in range(mib // TENSOR_MIB)]
    owners = save_owners([math.prod(s) for _, s in specs], ranks)
    gen = torch.Generator().manual_seed(rank)
    mine = {i: torch.randn(specs[i][1], generator=gen) for i in range(len(specs)) if owners[i] == rank}
    empty = torch.empty(0)
    ck = CheckpointManager(url, pathlib.Path(work) / 'staging', rank=rank, async_upload=False)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    path = ck.stage(1)
    save_state(path, specs, lambda i: mine.get(i, empty), rank, ranks)
    if rank == 0:
        torch.save({'state': {}}, path / 'meta.pt')
    shard = path / f'{shard_name(rank, ranks)}.bin'
    nbytes = shard.stat().st_size
    floor_file = pathlib.Path(work) / f'floor-{rank}.bin'
    os.link(shard, floor_file)
    ck.commit(1)
    save_s = time.perf_counter() - t0
    torch.distributed.barrier()
    t0 = time.perf_counter()
    reader = CheckpointManager(url, pathlib.Path(work) / 'restore', rank=rank).latest()
    _, layout = read_meta(reader)
    load_state(layout, specs, reader.read_range, lambda i, v: None, rank, ranks)
    restore_s, read = time.perf_counter() - t0, reader.bytes_read
    torch.distributed.barrier()
    bucket, _, prefix = url[len('s3://'):].partition('/')
    s3, config = boto3.client('s3'), ck.store.transfer
    t0 = time.perf_counter()
    s3.upload_file(str(floor_file), bucket, f'{prefix}/floor/{rank}', Config=config)
    up_s = time.perf_counter() - t0
    torch.distributed.barrier()
    t0 = time.perf_counter()
    s3.download_file(bucket, f'{prefix}/floor/{rank}', str(floor_file) + '.down', Config=config)
    down_s = time.perf_counter() - t0
    results.put((rank, nbytes, save_s, up_s, read, restore_s, down_s))
    torch.distributed.destroy_process_group()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mib', type=int, default=2048, help='state size in MiB')
    parser.add_argument('--ranks', type=int, default=4, help='local ranks (gloo)')
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
                                                      results)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        rows = sorted(results.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    print(f'{args.mib} MiB state over {args.ranks} ranks, SeaweedFS S3 on 127.0.0.1 (floor: boto3 upload_file / '
          f'download_file of the same bytes, same transfer settings)')
    print('| rank | shard MiB | save s | upload floor s | save / floor | read MiB | restore s | download floor s '
          '| restore / floor |')
    print('|---|---|---|---|---|---|---|---|---|')
    for rank, nbytes, save_s, up_s, read, restore_s, down_s in rows:
        print(f'| {rank} | {nbytes / 2**20:.0f} | {save_s:.2f} | {up_s:.2f} | {save_s / up_s:.2f} | {read / 2**20:.0f} '
              f'| {restore_s:.2f} | {down_s:.2f} | {restore_s / down_s:.2f} |')

if __name__ == '__main__':
    main()

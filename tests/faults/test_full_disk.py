"""A full disk under the checkpoint staging directory or under the checkpoint store (a small tmpfs, filled up to a
random level): the run stops with an error that says so, the newest commit stays intact, and once space is freed
the run resumes from it and ends bit-identical to an uninterrupted run."""

import contextlib
import json
import os
import pathlib
import random
import shutil
import subprocess
from collections.abc import Iterator

import fault_harness as h
import pytest
from fault_report import Trial, trials

from cosim_dist.checkpoint import step_prefix
from cosim_dist.storage import open_store

pytestmark = pytest.mark.slow
HALF = h.TOTAL // 2

@contextlib.contextmanager
def tmpfs(path: pathlib.Path, mib: int) -> Iterator[pathlib.Path]:
    """A real size-limited filesystem (needs root or CAP_SYS_ADMIN, as on the developer and CI machines)."""
    path.mkdir(parents=True)
    mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={mib}m', 'tmpfs', str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f'cannot mount a tmpfs here ({mount.stderr.strip()})')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)

def fill(fs: pathlib.Path, leave: int) -> pathlib.Path:
    """Occupy everything but `leave` bytes of the filesystem."""
    st = os.statvfs(fs)
    filler = fs / 'filler'
    with open(filler, 'wb') as f:
        os.posix_fallocate(f.fileno(), 0, max(1, st.f_bavail * st.f_frsize - leave))
    return filler

@pytest.fixture(scope='module')
def half_run(fault_root) -> pathlib.Path:
    """A run trained to half its length (commits in <run>/checkpoints)."""
    return h.finish(fault_root, 'disk-half', f'train.kimg={HALF / 1000}').dir

def test_full_disk_is_a_clear_error_and_loses_no_commit(half_run, fault_root, reference, record):
    rng, base = random.Random(23), open_store(half_run / 'checkpoints')
    size = sum(e['size'] for e in json.loads(base.read(f'{step_prefix(HALF)}/manifest.json'))['files'])
    for trial in range(trials(2, share=0.5)):
        where, name = ('staging', 'store')[trial % 2], f'disk-{trial}'
        shutil.copytree(half_run, fault_root / name)
        with tmpfs(fault_root / f'{name}-fs', 4 * size // 2**20 + 4) as fs:
            url = str(fault_root / name / 'checkpoints')
            if where == 'store':
                url = str(shutil.copytree(url, fs / 'store'))
            args = [f'checkpoint.url={url}'] + ([f'checkpoint.staging={fs}'] if where == 'staging' else [])
            filler = fill(fs, rng.randrange(size // 5, size - size // 5))   # less room than one checkpoint
            full = h.start(fault_root, name, *args)
            rc, tail = full.wait(), full.output()[-3000:]
            after = h.commits(url)
            filler.unlink()
            final = h.finish(fault_root, name, *args)
            diff = h.differences(h.final_state(final.dir, url), reference)
        last = tail.strip().splitlines()[-1]
        clear = rc != 0 and ('No space left on device' in last or 'MiB free on that disk (full?)' in last)
        newest = max([HALF, *full.committed()])                # commits go on while retention frees enough space
        intact = not after[1] and max(after[0]) == newest and final.resumed() == newest
        record(Trial(f'full disk under the checkpoint {where}', clear and intact and not diff, not intact or bool(diff),
                     last[:300]))
        assert clear and intact and not diff, (tail, newest, after, final.resumed(), diff[:5])

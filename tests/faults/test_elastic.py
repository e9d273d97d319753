"""Faults during an elastic resume (a checkpoint of 2 ranks read by 3, in SeaweedFS S3): one writer's shard damaged
or missing in the store, and kill -9 while the 3 ranks load. A damaged newest commit is retired and the previous one
resumed; a killed load changes nothing in the store (loading only reads), so the next resume, on yet another number
of ranks, takes the same commit. Every run must then finish."""

import contextlib
import random
import subprocess
import sys
import time

import fault_harness as h
import psutil
import pytest
from fault_report import Trial, trials

from cosim_dist.checkpoint import step_prefix
from cosim_dist.storage import open_store

pytestmark = pytest.mark.slow
DS = ['engine.backend=deepspeed', 'engine.zero_stage=2', 'train.batch=48', 'train.checkpoint_kimg=0.048',
      'train.log_kimg=0.048']

def launch(fault_root, name: str, store, kimg: float, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, str(h.REPO / 'launch.py'), f'--nproc={nproc}', f'run.root={fault_root}', f'run.name={name}',
           f'checkpoint.url={store.url}', *h.ARGS, *DS, f'train.kimg={kimg}']
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=fault_root,
                            start_new_session=True)

def finish(fault_root, name: str, store, kimg: float, nproc: int) -> str:
    proc = launch(fault_root, name, store, kimg, nproc)
    out, _ = proc.communicate(timeout=h.TIMEOUT)
    assert proc.returncode == 0, out[-3000:]
    return out

def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

def kill_tree(proc: subprocess.Popen, settle_s: float = 1.0) -> None:
    """kill -9 the launcher and every process under it, then wait until all are gone. torchrun starts each rank in a
    session of its own, so killing the launcher's session would leave the ranks training on (and committing) as
    orphans. The settle time lets the store finish a request whose bytes were sent just before the kill."""
    root, tree = psutil.Process(proc.pid), []
    while len(tree) < len(found := [root, *root.children(recursive=True)]):   # freeze first, until no process is new:
        tree = found                                                          # nobody spawns or commits while we kill
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    deadline = time.monotonic() + 60                # orphaned ranks are not our children: poll, zombies count as gone
    while alive := [p for p in tree if running(p)]:
        assert time.monotonic() < deadline, f'{alive} outlived kill -9 by 60 s'
        time.sleep(0.05)
    time.sleep(settle_s)

def damage_one_shard(store, nimg: int, rng: random.Random) -> str:
    """One writer's shard of the commit: deleted, or one bit flipped."""
    key = f'{step_prefix(nimg)}/shard-{rng.randrange(2):05d}-of-00002.bin'
    if rng.random() < 0.5:
        store.delete(key)
        return f'{key} deleted'
    data = bytearray(store.read(key))
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    store.put_bytes(bytes(data), key)
    return f'{key} bit flipped'

def test_damaged_shard_and_kill9_during_elastic_resume(s3_env, fault_root, record):
    rng = random.Random(15)
    for trial in range(trials(1)):
        name = f'elastic-{fault_root.name}-{trial}'
        store = open_store(f's3://{s3_env.bucket}/faults/{name}')  # the s3_env fixture points boto3 at SeaweedFS
        finish(fault_root, name, store, 0.096, nproc=2)           # commits at 48 and 96 images, by 2 ranks
        what = damage_one_shard(store, 96, rng)
        out = finish(fault_root, name, store, 0.144, nproc=3)
        ok = f'resumed at 0.0 kimg from {store.url}/{step_prefix(48)}' in out and 'is unusable' in out
        record(Trial('elastic resume (2 -> 3 ranks): one rank\'s shard damaged', ok, not ok, what))
        assert ok, out[-3000:]

        proc = launch(fault_root, name, store, 0.192, nproc=3)           # newest commit: 144 images, by 3 ranks
        time.sleep(rng.uniform(2, 10))                            # start-up, teacher, engines or the load itself
        kill_tree(proc)
        newest = max(int(k.split('/')[0][5:]) for k in store.list('step-') if k.endswith('/COMMIT'))
        out = finish(fault_root, name, store, 0.240, nproc=2)
        ok = newest >= 144 and f'from {store.url}/{step_prefix(newest)}' in out and 'is unusable' not in out
        record(Trial('kill -9 during an elastic resume (3 ranks), then 2', ok, not ok, f'resumed from step {newest}'))
        assert ok, out[-3000:]

"""Preemption of a local 2-rank run: USR2 to every rank, a collective checkpoint, exit; rerunning resumes.
Three interruptions at random steps end with the same parameters as an uninterrupted run (CPU, fp32)."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]

ARGS = ['task=train', 'engine.backend=deepspeed', 'engine.zero_stage=1', 'pretrain.kimg=1', 'pretrain.batch=64',
        'model.net.model_channels=16', 'train.batch=16', 'train.batch_gpu=8', 'train.kimg=0.8', 'train.log_kimg=0.016',
        'train.checkpoint_kimg=0', 'checkpoint.async_upload=true', 'logging.wandb=disabled', 'logging.progress=false']

def start(root: pathlib.Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / 'launch.py'), '--nproc=2', f'run.root={root}', f'run.name={name}', *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})

def rank_pids(name: str) -> list[int]:
    """PIDs of the training ranks of run `name` (not the launcher or torchrun's agent)."""
    pids = []
    for proc in pathlib.Path('/proc').iterdir():
        try:
            cmd = (proc / 'cmdline').read_bytes().split(b'\0')
            env = (proc / 'environ').read_bytes()
        except (OSError, ValueError):
            continue
        if f'run.name={name}'.encode() in cmd and b'LOCAL_RANK=' in env and b'torch.distributed.run' not in cmd:
            pids.append(int(proc.name))
    return pids

def progress(root: pathlib.Path, name: str) -> int:
    path = root / name / 'train.jsonl'
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])['nimg'] if lines else 0

def test_ranks_run_the_launchers_copy_of_the_package(monkeypatch):
    """N local ranks are `python -m cosim_dist.launch` processes; a copy of the package outside site-packages (this
    checkout) goes first on their PYTHONPATH, so they never import another installed copy (the installed case:
    tests/test_packaging.py)."""
    from cosim_dist.launchers import local
    calls = []
    monkeypatch.setattr(subprocess, 'run',
                        lambda cmd, env: calls.append((cmd, env)) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setenv('PYTHONPATH', '/elsewhere')
    assert local.launch_processes(2, ['model=toy']) == 0
    ((cmd, env),) = calls
    assert cmd[-3:] == ['-m', 'cosim_dist.launch', 'model=toy'] and '--nproc_per_node=2' in cmd
    assert env['PYTHONPATH'].split(os.pathsep) == [str(REPO), '/elsewhere']

@pytest.mark.slow
def test_three_preemptions_equal_an_uninterrupted_run(tmp_path):
    """Stopped three times, by USR2 to one rank only, by SIGTERM to the other only, then by USR2 to both: the stop is
    agreed across ranks each time (no rank goes on alone), and the run ends bit-identical to an uninterrupted one."""
    straight = start(tmp_path, 'straight')
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-3000:]
    rng = random.Random(0)
    done_at = []
    signals = [(signal.SIGUSR2, [1]), (signal.SIGTERM, [0]), (signal.SIGUSR2, [0, 1])]
    for target, (signum, which) in zip(sorted(rng.sample(range(64, 700, 16), 3)), signals, strict=True):
        proc = start(tmp_path, 'preempted')
        deadline = time.time() + 240
        while progress(tmp_path, 'preempted') < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        pids = rank_pids('preempted')
        assert len(pids) == 2, pids
        for k in which:
            os.kill(pids[k], signum)
        out = proc.communicate(timeout=240)[0]
        assert proc.returncode == 0, out[-3000:]
        assert ('stopping at the next step boundary' in out
                and 'run the same command again to resume' in out), out[-3000:]
        done_at.append(progress(tmp_path, 'preempted'))
    assert done_at == sorted(done_at) and done_at[-1] < 800
    final = start(tmp_path, 'preempted')
    out = final.communicate(timeout=300)[0]
    assert final.returncode == 0 and 'resumed at' in out, out[-3000:]
    a = torch.load(tmp_path / 'straight' / 'generator.pt', weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'preempted' / 'generator.pt', weights_only=True)['state_dict']
    for k in a:
        assert torch.equal(a[k], b[k]), k

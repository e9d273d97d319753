"""`launch.py --cluster slurm` on a real single-node Slurm (scripts/slurm_testbed.sh): a 2-task job trains the toy
to completion; a real preemption (a job in the `high` partition: stock Slurm sends SIGTERM, then SIGKILL after the
partition's GraceTime) makes it save collectively and requeue itself; it finishes with the same parameters as an
uninterrupted local run."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from cosim_dist.config import load_config
from cosim_dist.launchers.slurm import SlurmOptions, submit

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ARGS = ['task=train', 'engine.backend=deepspeed', 'engine.zero_stage=1', 'pretrain.kimg=1', 'pretrain.batch=64',
        'model.net.model_channels=16', 'train.batch=16', 'train.batch_gpu=8', 'train.kimg=1.6', 'train.log_kimg=0.016',
        'train.checkpoint_kimg=0', 'logging.wandb=disabled', 'logging.progress=false']

def progress(run_dir: pathlib.Path) -> int:
    path = run_dir / 'train.jsonl'
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])['nimg'] if lines else 0

def wait_for(predicate, timeout: float, what: str, job=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = (job.stdout() or '')[-3000:] + (job.stderr() or '')[-3000:] if job is not None else ''
            pytest.fail(f'timed out after {timeout} s waiting for {what}\n{logs}')
        time.sleep(0.25)

def test_preempted_slurm_run_requeues_and_matches_local_run(slurm_cluster, tmp_path, monkeypatch):
    import submitit
    # sbatch exports it: same kernels, same reduction order as the local run
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    ref = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--nproc=2', f'run.root={tmp_path}',
                          'run.name=local', *ARGS],
                         capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert ref.returncode == 0, ref.stderr[-3000:]

    overrides = [f'run.root={tmp_path}', 'run.name=slurm', *ARGS]
    t0 = time.monotonic()
    job = submit(load_config(overrides), SlurmOptions(tasks_per_node=2, partition=slurm_cluster.low, timeout_min=20),
                 overrides)
    run_dir = tmp_path / 'slurm'
    wait_for(lambda: progress(run_dir) >= 320, 180, 'the Slurm run to train 20 steps', job)
    high = submitit.AutoExecutor(folder=tmp_path / 'high', cluster='slurm')
    high.update_parameters(nodes=1, tasks_per_node=1, cpus_per_task=slurm_cluster.cpus, timeout_min=5,
                           slurm_partition=slurm_cluster.high)
    preemptor = high.submit(time.sleep, 2)
    wait_for(preemptor.done, 120, 'the preempting job', preemptor)
    wait_for(job.done, 300, 'the requeued run to finish', job)
    log = (job.stdout() or '') + (job.stderr() or '')
    for line in ('received SIGTERM', 'checkpoint committed', f'requeueing job {job.job_id}', 'resumed at'):
        assert line in log, f'{line!r} missing from the job log:\n{log[-4000:]}'
    print('\n'.join(line for line in log.splitlines()
                    if any(s in line for s in ('SIGTERM', 'committed', 'requeue', 'resumed', 'done in'))))
    print(f'slurm run with one preemption finished {time.monotonic() - t0:.0f} s after submission')
    a = torch.load(tmp_path / 'local' / 'generator.pt', weights_only=True)['state_dict']
    b = torch.load(run_dir / 'generator.pt', weights_only=True)['state_dict']
    for k in a:
        assert torch.equal(a[k], b[k]), k

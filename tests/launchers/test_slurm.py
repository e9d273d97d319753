"""`launch.py --cluster slurm` across the two nodes of the Slurm testbed (scripts/slurm_testbed.sh), with no shared
filesystem for the run: run.root is each node's private /scratch, checkpoints go to S3 (the only shared store). The run
is preempted twice by jobs in the `high` partition (stock Slurm: SIGTERM, SIGKILL after GraceTime) and stopped once by
its time limit (Slurm's USR2, --signal-delay-s before the limit); each time it saves collectively, rank 0 requeues
it, it resumes on whatever nodes it gets, and it ends bit-identical to an uninterrupted 2-rank run."""

import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import uuid

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ARGS = ['task=train', 'engine.backend=deepspeed', 'engine.zero_stage=1', 'pretrain.kimg=1', 'pretrain.batch=64',
        'model.net.model_channels=16', 'train.batch=32', 'train.batch_gpu=16', 'train.kimg=16',
        'train.log_kimg=0.032', 'train.checkpoint_kimg=0', 'logging.wandb=disabled', 'logging.progress=false']

def progress(testbed, run: str) -> int:
    """The run's latest nimg, from train.jsonl on whichever node rank 0 ran (read as the nodes' admin would)."""
    best = 0
    for node in testbed.nodes:
        path = testbed.scratch(node) / run / 'train.jsonl'
        lines = path.read_text().splitlines() if path.exists() else []
        best = max([best] + [json.loads(line)['nimg'] for line in lines[-1:]])
    return best

def wait_for(predicate, timeout: float, what: str, log=lambda: '') -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout} s waiting for {what}\n{log()[-5000:]}')
        time.sleep(0.25)

def job_state(job: str) -> str:
    return subprocess.run(['squeue', '-h', '-j', job, '-o', '%T'], capture_output=True, text=True).stdout.strip()

def preempt(testbed) -> None:
    """A job in `high` that needs all CPUs of one node: Slurm preempts the run (both nodes: it is one job)."""
    subprocess.run(['sbatch', f'--partition={testbed.high}', '--nodes=1', f'--cpus-per-task={testbed.cpus}',
                    '--time=5', '--output=/dev/null', '--wrap', 'sleep 2'], check=True, capture_output=True)

def hit_time_limit(job: str) -> None:
    """Shorten the job's limit so that Slurm's own time-limit signal (USR2, 120 s before the end) is due now: it comes
    at slurmctld's next time-limit check (every 30 s), with >= 60 s left for the save."""
    runtime = subprocess.run(['squeue', '-h', '-j', job, '-o', '%M'], capture_output=True, text=True).stdout.strip()
    parts = [int(p) for p in re.split('[-:]', runtime)]
    seconds = sum(v * m for v, m in zip(reversed(parts), (1, 60, 3600, 86400)))
    subprocess.run(['scontrol', 'update', f'JobId={job}', f'TimeLimit={math.floor((seconds + 120) / 60)}'],
                   check=True)

def test_two_node_run_survives_two_preemptions_and_its_time_limit(slurm_cluster, cluster_s3, tmp_path):
    env = {**os.environ, **cluster_s3.env(), 'OMP_NUM_THREADS': '1', 'PATH': f'{pathlib.Path(sys.executable).parent}'
           f':{os.environ["PATH"]}'}   # sbatch exports it: the ranks run this interpreter; same kernels as the ref
    ref = subprocess.Popen([sys.executable, str(REPO / 'launch.py'), '--nproc=2', f'run.root={tmp_path}',
                            'run.name=local', *ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    key = f'two-node-{uuid.uuid4().hex[:8]}'
    root, url = f'/scratch/{key}', f's3://{cluster_s3.bucket}/{key}'
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--cluster', 'slurm', '--nodes', '2',
                          '--tasks-per-node', '1', '--partition', slurm_cluster.low, '--timeout-min', '20',
                          '--job-dir', str(tmp_path / 'jobs'), f'run.root={root}', 'run.name=two',
                          f'checkpoint.url={url}', *ARGS], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    job = re.search(r'submitted Slurm job (\d+)', out.stdout).group(1)
    log = lambda: ''.join(p.read_text() for p in sorted((tmp_path / 'jobs').glob(f'{job}_*_log.*')))
    requeues = lambda: log().count(f'requeueing job {job}')
    at = lambda: progress(slurm_cluster, f'{key}/two')
    for stop in ('preemption', 'preemption', 'time limit'):
        start, n = at(), requeues()
        wait_for(lambda: at() >= start + 320 and job_state(job) == 'RUNNING', 240, f'progress before the {stop}', log)
        preempt(slurm_cluster) if stop == 'preemption' else hit_time_limit(job)
        wait_for(lambda: requeues() > n, 120, f'the requeue after the {stop}', log)
        if stop == 'time limit':
            subprocess.run(['scontrol', 'update', f'JobId={job}', 'TimeLimit=20'], check=True)
    wait_for(lambda: job_state(job) in ('', 'COMPLETED') and 'done in' in log(), 300, 'the run to finish', log)
    print(f'two-node run with 3 stops finished {time.monotonic() - t0:.0f} s after submission')
    text = log()
    assert text.count('received SIGTERM') >= 2 and text.count('received SIGUSR2') >= 1, text[-5000:]
    assert text.count('resumed at') >= 3 and 'checkpoint committed' in text, text[-5000:]
    assert text.count(f'slurm job {job}: 2 ranks on node[1-2]') >= 4, text[-5000:]
    for node in slurm_cluster.nodes:    # each node's own disk received rank 0's toy teacher; nothing else is shared
        assert list((slurm_cluster.scratch(node) / key / '_cache').glob('toy-teacher-*.pt')), node
    stdout, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, stdout[-3000:]
    a = torch.load(tmp_path / 'local' / 'generator.pt', weights_only=True)['state_dict']
    body = cluster_s3.client().get_object(Bucket=cluster_s3.bucket, Key=f'{key}/outputs/generator.pt')['Body'].read()
    b = torch.load(io.BytesIO(body), weights_only=True)['state_dict']   # published by rank 0 to the shared store
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

"""slurm/train.sbatch without submitit on the real single-node Slurm: the time-limit signal (USR2 to the job's tasks)
and a preemption (a job in the `high` partition: SIGTERM to the script and the tasks, SIGKILL after GraceTime) make the
ranks save, rank 0 requeue the job and every rank exit 0; the rerun resumes and finishes."""

import pathlib
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = pathlib.Path(__file__).resolve().parents[2]

@pytest.mark.parametrize('stop', ['usr2', 'preemption'])
def test_sbatch_script_resumes_after_a_stop(slurm_cluster, tmp_path, monkeypatch, stop):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'job.out'
    submit = subprocess.run(
        ['sbatch', '--parsable', f'--chdir={REPO}', f'--output={out}', '--open-mode=append', '--ntasks-per-node=2',
         '--gpus-per-node=0', '--cpus-per-task=1', '--time=10', f'--partition={slurm_cluster.low}',
         str(REPO / 'slurm' / 'train.sbatch'), f'run.root={tmp_path}', 'run.name=sb', 'task=train',
         'engine.backend=deepspeed', 'pretrain.kimg=1', 'model.net.model_channels=16', 'train.batch=16',
         'train.batch_gpu=8', 'train.kimg=1.6', 'train.log_kimg=0.016', 'logging.wandb=disabled',
         'logging.progress=false'], capture_output=True, text=True, check=True)
    job = submit.stdout.strip().split(';')[0]
    jsonl = tmp_path / 'sb' / 'train.jsonl'
    deadline = time.monotonic() + 120
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) > 10):
        assert time.monotonic() < deadline, out.read_text()[-3000:] if out.exists() else 'no job output'
        time.sleep(0.25)
    if stop == 'usr2':
        subprocess.run(['scancel', '--signal=USR2', job], check=True)
    else:
        subprocess.run(['sbatch', f'--partition={slurm_cluster.high}', f'--cpus-per-task={slurm_cluster.cpus}',
                        '--time=5', f'--output={tmp_path / "high.out"}', '--wrap', 'sleep 2'], check=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / 'sb' / 'checkpoints').exists() or 'done in' not in out.read_text().split('resumed at')[-1]:
        assert time.monotonic() < deadline, out.read_text()[-4000:]
        time.sleep(0.5)
    log = out.read_text()
    expected = ('received SIGUSR2',) if stop == 'usr2' else ('received SIGTERM', 'train.sbatch: SIGTERM')
    for line in ('stop requested: saving at', f'requeueing job {job}', 'resumed at', *expected):
        assert line in log, f'{line!r} missing:\n{log[-4000:]}'
    assert '"nimg": 1600' in jsonl.read_text()

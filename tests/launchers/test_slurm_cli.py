"""`launch.py --cluster slurm` before anything reaches Slurm: the rendered sbatch script, the GPU-node defaults and the
one-line errors (no Slurm needed: PATH holds only the venv's python)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

def launch(*args: str, slurm: bool = False) -> subprocess.CompletedProcess:
    path = os.environ['PATH'] if slurm else str(pathlib.Path(sys.executable).parent)   # no sbatch, sinfo, srun
    return subprocess.run([sys.executable, str(REPO / 'launch.py'), '--cluster', 'slurm', *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, 'PATH': path}, timeout=120)

def test_dry_run_renders_the_sbatch_script_without_slurm():
    out = launch('--nodes', '4', '--gpus-per-node', '8', '--dry-run', 'model=edm2-l', 'data.path=s3://b/in512',
                 'checkpoint.url=s3://b/runs/l')
    assert out.returncode == 0, out.stderr
    script = out.stdout.split('\ntask:')[0]
    for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-node=8', '#SBATCH --mem=0',
                 '#SBATCH --cpus-per-task=8', '#SBATCH --signal=USR2@120', '#SBATCH --requeue', '--kill-on-bad-exit=1'):
        assert line in script, f'{line!r} missing:\n{script}'
    assert 'Traceback' not in out.stderr and 'arch: edm2' in out.stdout

def test_options_reach_the_script():
    out = launch('--gpus-per-node', '4', '--cpus-per-task', '12', '--mem', '500G', '--exclusive', '--signal-delay-s',
                 '300', '--timeout-min', '90', '--partition', 'gpu', '--dry-run', 'model=edm2-xs', 'data.path=/d')
    assert out.returncode == 0, out.stderr
    for line in ('--cpus-per-task=12', '--mem=500G', '--exclusive', '--signal=USR2@300', '--time=90',
                 '--partition=gpu', '--ntasks-per-node=4'):
        assert line in out.stdout, line

def test_one_line_errors():
    no_gpus = launch('--nodes', '2', '--dry-run', 'model=edm2-l', 'data.path=/d', 'checkpoint.url=s3://b/r')
    assert no_gpus.returncode == 2 and no_gpus.stderr.count('\n') == 1 and '--gpus-per-node 0' in no_gpus.stderr
    assert launch('--nodes', '2', '--cpu-ranks', '--dry-run', 'model=edm2-l', 'data.path=/d',
                  'checkpoint.url=s3://b/r').returncode == 0
    local = launch('--nodes', '2', '--dry-run', 'model=toy', 'task=train')
    assert local.returncode == 2 and "each node's own disk" in local.stderr and 'checkpoint.url=s3://' in local.stderr
    no_slurm = launch('--nodes', '1', 'model=toy')
    assert no_slurm.returncode == 2 and no_slurm.stderr.count('\n') == 1, no_slurm.stderr
    assert 'needs Slurm (sbatch is not on PATH)' in no_slurm.stderr

def test_s3_inputs_are_checked_before_submission(s3_env, tmp_path):
    """A missing s3:// teacher or dataset, and an unreachable store, are refused before anything reaches Slurm."""
    bucket = f's3://{s3_env.bucket}'
    s3_env.client().put_object(Bucket=s3_env.bucket, Key='teachers/present.pkl', Body=b'x')
    common = ('--gpus-per-node', '1', 'model=edm2-xs', 'task=train', f'checkpoint.url={bucket}/runs/x',
              f'run.root={tmp_path}')
    missing = launch(*common, f'model.teacher={bucket}/teachers/absent.pkl', f'data.path={bucket}/shards')
    assert missing.returncode == 2, missing.stderr
    assert f'model.teacher={bucket}/teachers/absent.pkl does not exist' in missing.stderr
    assert f'data.path={bucket}/shards does not exist ({bucket}/shards/manifest.parquet not found)' in missing.stderr
    s3_env.client().put_object(Bucket=s3_env.bucket, Key='shards/manifest.parquet', Body=b'x')
    present = launch(*common, f'model.teacher={bucket}/teachers/present.pkl', f'data.path={bucket}/shards')
    assert 'needs Slurm (sbatch is not on PATH)' in present.stderr, present.stderr   # every store check passed
    down = launch(*common, f'model.teacher={bucket}/teachers/present.pkl', f'data.path={bucket}/shards',
                  'storage.endpoint_url=http://127.0.0.1:9', 'storage.max_attempts=1')
    assert down.returncode == 2 and 'cannot be read' in down.stderr and 'checkpoint.url' in down.stderr, down.stderr
    assert 'Traceback' not in down.stderr

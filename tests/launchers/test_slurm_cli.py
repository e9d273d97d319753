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
    no_gpus = launch('--nodes', '2', '--dry-run', 'model=edm2-l', 'data.path=/d')
    assert no_gpus.returncode == 2 and no_gpus.stderr.count('\n') == 1 and '--gpus-per-node 0' in no_gpus.stderr
    assert launch('--nodes', '2', '--cpu-ranks', '--dry-run', 'model=edm2-l', 'data.path=/d').returncode == 0
    no_slurm = launch('--nodes', '2', 'model=toy')
    assert no_slurm.returncode == 2 and no_slurm.stderr.count('\n') == 1, no_slurm.stderr
    assert 'needs Slurm (sbatch is not on PATH)' in no_slurm.stderr

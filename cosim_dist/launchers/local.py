"""Local launcher: run a task in this process, or start N processes on this machine (torchrun-style)."""

import os
import pathlib
import site
import subprocess
import sys

from .. import distributed
from ..config import Config
from ..logging import log, setup_console
from .signals import run_until_stopped

def launch_local(cfg: Config) -> None:
    """Run cfg.task in this process (a single process, or one rank started by torchrun or srun). SIGUSR2 or SIGTERM
    stops training at the next step boundary with a checkpoint; running the same command again resumes."""
    env = distributed.discover()
    setup_console(env.rank)
    # slurm/train.sbatch: rank 0 requeues the job after the stop-save
    if run_until_stopped(cfg, env, os.environ['SLURM_JOB_ID'] if env.source == 'slurm' else None):
        log.info('stopped early with a checkpoint: run the same command again to resume')

def launch_processes(nproc: int, overrides: list[str]) -> int:
    """Start `nproc` ranks of `python -m cosim_dist.launch overrides` through torch.distributed.run on this machine
    (`--standalone`: the rendezvous store binds a free port itself, so concurrent runs cannot race for one). The ranks
    import this very copy of the package: one outside site-packages (a checkout run as `python launch.py`) goes first
    on their PYTHONPATH."""
    env = dict(os.environ,
               OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // nproc))))
    root = str(pathlib.Path(__file__).resolve().parents[2])
    if root not in {str(pathlib.Path(p).resolve()) for p in (*site.getsitepackages(), site.getusersitepackages())}:
        env['PYTHONPATH'] = os.pathsep.join([root, *filter(None, [os.environ.get('PYTHONPATH')])])
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', '--tee=0',
           '-m', 'cosim_dist.launch', *overrides]
    return subprocess.run(cmd, env=env).returncode

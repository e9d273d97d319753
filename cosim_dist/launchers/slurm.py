"""Slurm launcher through submitit: one task per GPU (or per CPU slot), torch.distributed from the Slurm
environment, run directory keyed by run name (the same command resumes the same run), and preemption /
time-limit handling: USR2 only sets a flag, ranks agree at a step boundary, save collectively, rank 0
requeues the job, every rank exits."""

import dataclasses
import pathlib
import subprocess
import sys

from ..config import Config, load_config

@dataclasses.dataclass
class SlurmOptions:
    nodes: int = 1                   # nodes
    gpus_per_node: int = 0           # GPUs per node (0: CPU tasks)
    tasks_per_node: int | None = None # ranks per node (default: gpus_per_node, or 1 without GPUs)
    cpus_per_task: int = 1           # CPU cores per rank
    partition: str | None = None     # Slurm partition
    account: str | None = None       # Slurm account
    qos: str | None = None           # Slurm QOS
    timeout_min: int = 60 * 24       # wall-clock limit per allocation; the run requeues itself when it is reached
    signal_delay_s: int = 120        # USR2 this long before the limit: must cover one step, a save and the upload

    def executor_parameters(self, name: str) -> dict:
        tasks = self.tasks_per_node or self.gpus_per_node or 1
        params = dict(name=name, nodes=self.nodes, tasks_per_node=tasks, cpus_per_task=self.cpus_per_task,
                      timeout_min=self.timeout_min, slurm_signal_delay_s=self.signal_delay_s)
        if self.gpus_per_node:
            params['gpus_per_node'] = self.gpus_per_node
        for key in ('partition', 'account', 'qos'):
            if getattr(self, key):
                params[f'slurm_{key}'] = getattr(self, key)
        return params

#----------------------------------------------------------------------------

class TrainTask:
    """The submitit callable: holds only the command-line overrides, so requeued jobs pickle nothing else."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = list(overrides)

    def __call__(self) -> None:
        import signal

        import submitit

        from .. import distributed, tasks
        from ..logging import log, setup_console
        from .signals import StopFlag

        job = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        stop = StopFlag((signal.SIGUSR2,))       # replaces submitit's handler: the collective save comes first
        env = distributed.discover()
        setup_console(env.rank)
        log.info(f'slurm job {job.job_id} task {env.rank}/{env.world_size} on {job.hostname}')
        cfg = load_config(self.overrides)
        try:
            tasks.run(cfg, env, should_stop=stop)
            stop.release()                          # a second USR2 during the exit must not kill the stopped task
        finally:
            distributed.shutdown()
        if stop():
            if env.rank == 0:
                log.info(f'checkpoint saved; requeueing job {job.job_id}')
                subprocess.run(['scontrol', 'requeue', str(job.job_id)], check=True)
            sys.exit(0)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit only if USR2 arrives before our handler is installed: just requeue."""
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.overrides))

def make_executor(cfg: Config, options: SlurmOptions):
    import submitit
    folder = pathlib.Path(cfg.run_dir).absolute() / 'slurm'
    executor = submitit.AutoExecutor(folder=folder, cluster='slurm')
    executor.update_parameters(**options.executor_parameters(f'cosim-{cfg.run.name}'))
    return executor

def submit(cfg: Config, options: SlurmOptions, overrides: list[str], dry_run: bool = False):
    """Submit the run (or show what would be submitted). Re-running the same command resumes the run."""
    executor = make_executor(cfg, options)
    if dry_run:
        print('# sbatch parameters')
        for key, value in sorted(executor._executor.parameters.items()):
            print(f'#   {key}: {value}')
        return None
    pathlib.Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    job = executor.submit(TrainTask([*overrides, f'run.root={pathlib.Path(cfg.run.root).absolute()}']))
    print(f'submitted Slurm job {job.job_id} for run {cfg.run_dir} (logs in {cfg.run_dir}/slurm)')
    return job

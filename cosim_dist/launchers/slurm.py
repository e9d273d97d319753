"""Slurm launcher through submitit: one task per GPU (or per CPU slot), torch.distributed from the Slurm
environment, run directory keyed by run name (the same command resumes the same run), and preemption /
time-limit handling (signals.py): USR2 or SIGTERM only sets a flag, ranks agree at a step boundary, save
collectively, rank 0 requeues the job (after USR2 or a preemption, not after scancel), every rank exits 0."""

import dataclasses
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from .. import storage
from ..config import Config, ConfigError, load_config
from ..config_checks import real_model, store_readiness
from ..storage import parse_url

@dataclasses.dataclass
class SlurmOptions:
    nodes: int = 1                   # nodes
    gpus_per_node: int = 0           # GPUs per node (0: CPU ranks on gloo; refused for a real model unless cpu_ranks)
    tasks_per_node: int | None = None # ranks per node (default: gpus_per_node, or 1 without GPUs)
    cpus_per_task: int | None = None # CPU cores per rank (default: the node's cores / ranks per node, from sinfo;
                                     # 8 per GPU where sinfo cannot tell)
    mem: str | None = None           # memory per node (default with GPUs: '0', all of the node's memory)
    exclusive: bool = False          # whole nodes only
    partition: str | None = None     # Slurm partition
    account: str | None = None       # Slurm account
    qos: str | None = None           # Slurm QOS
    timeout_min: int = 60 * 24       # wall-clock limit per allocation; the run requeues itself when it is reached
    signal_delay_s: int = 120        # USR2 this long before the limit: must cover one step, a save and the upload
    cpu_ranks: bool = False          # allow a real model on CPU ranks (gpus_per_node 0)
    job_dir: str | None = None       # submitit's folder (the pickled task, the job logs): on a filesystem the login
                                     # node and every node share (home); default <run_dir>/slurm. run.root itself may
                                     # be node-local when checkpoint.url is s3://

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def node_cpus(self) -> int | None:
        """CPUs of the partition's smallest node (`sinfo`), or None where Slurm is not installed."""
        cmd = ['sinfo', '-h', '-N', '-o', '%c'] + (['-p', self.partition] if self.partition else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return None
        return min((int(c) for c in out if c.isdigit()), default=None)

    def executor_parameters(self, name: str) -> dict:
        """submitit's Slurm parameters: one rank per task; srun ends the step when any rank fails."""
        node = self.node_cpus() or (8 * self.tasks if self.gpus_per_node else self.tasks)   # unknown: 8 per GPU
        cpus = self.cpus_per_task or max(1, node // self.tasks)
        params = dict(job_name=name, nodes=self.nodes, ntasks_per_node=self.tasks, cpus_per_task=cpus,
                      time=self.timeout_min, signal_delay_s=self.signal_delay_s,
                      srun_args=['--kill-on-bad-exit=1'], additional_parameters={'requeue': True})
        if self.gpus_per_node:
            params.update(gpus_per_node=self.gpus_per_node, mem=self.mem or '0')
        elif self.mem:
            params['mem'] = self.mem
        if self.exclusive:
            params['exclusive'] = True
        for key in ('partition', 'account', 'qos'):
            if getattr(self, key):
                params[key] = getattr(self, key)
        return params

    def folder(self, cfg: Config) -> pathlib.Path:
        return pathlib.Path(self.job_dir or cfg.run_dir / 'slurm').absolute()

    def check(self, cfg: Config, stores: bool = True) -> None:
        """Everything a job would otherwise find out in the queue: the node layout, the checkpoint store every node
        reaches, and (`stores`) each s3:// input present (local files are checked by load_config)."""
        problems = []
        if self.gpus_per_node == 0 and real_model(cfg) and not self.cpu_ranks:
            problems.append(f'--gpus-per-node 0 would train {cfg.model.arch} on CPU ranks (gloo); give the GPUs per '
                            f'node (e.g. --gpus-per-node 8), or --cpu-ranks to mean it')
        if cfg.checkpoint.stop_budget_s >= self.signal_delay_s:
            problems.append(f'checkpoint.stop_budget_s={cfg.checkpoint.stop_budget_s:g} leaves no time before the '
                            f'time limit: keep it below --signal-delay-s={self.signal_delay_s} (the step in flight and '
                            f'the requeue come on top)')
        store = cfg.checkpoint.url or str(cfg.run_dir / 'checkpoints')
        if self.nodes > 1 and parse_url(store)[0] != 's3' and cfg.task in ('train', 'default'):
            problems.append(f'checkpoints would go to {store}, a path on each node\'s own disk, but the job spans '
                            f'{self.nodes} nodes: set checkpoint.url=s3://<bucket>/<prefix>')
        if stores:
            storage.configure(cfg.storage)
            problems += store_readiness(cfg)
        if problems:
            raise ConfigError('\n'.join(problems))

#----------------------------------------------------------------------------

class TrainTask:
    """The submitit callable: holds only the command-line overrides, so requeued jobs pickle nothing else."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = list(overrides)

    def __call__(self) -> None:
        import submitit

        from .. import distributed
        from ..logging import log, setup_console
        from .signals import run_until_stopped

        job = submitit.JobEnvironment()
        env = distributed.discover()             # from the task's SLURM_* variables (host list, port: distributed.py)
        setup_console(env.rank)
        log.info(f'slurm job {job.job_id}: {env.world_size} ranks on {os.environ.get("SLURM_JOB_NODELIST")}, '
                 f'rank {env.rank} on {job.hostname}')
        # its stop flag replaces submitit's handlers: the collective save comes first, then rank 0 requeues
        if run_until_stopped(load_config(self.overrides), env, job.job_id):
            sys.exit(0)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit only if USR2 arrives before our handler is installed: just requeue."""
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.overrides))

def sbatch_script(cfg: Config, options: SlurmOptions) -> str:
    """The sbatch script submitit would submit (rendered by submitit, without Slurm)."""
    from submitit.slurm.slurm import _make_sbatch_string
    command = f'{shlex.quote(sys.executable)} -u -m submitit.core._submit'
    return _make_sbatch_string(command=command, folder=options.folder(cfg) / '%j',
                               **options.executor_parameters(f'cosim-{cfg.run.name}'))

def submit(cfg: Config, options: SlurmOptions, overrides: list[str], dry_run: bool = False):
    """Submit the run (or print the sbatch script). Re-running the same command resumes the run."""
    options.check(cfg, stores=not dry_run)
    if dry_run:
        print(sbatch_script(cfg, options))
        return None
    if shutil.which('sbatch') is None:
        raise ConfigError('--cluster slurm needs Slurm (sbatch is not on PATH); run on a login node, use --dry-run '
                          'to see the script, or --cluster local')
    import submitit
    executor = submitit.SlurmExecutor(folder=options.folder(cfg))
    executor.update_parameters(**options.executor_parameters(f'cosim-{cfg.run.name}'))
    try:
        job = executor.submit(TrainTask([*overrides, f'run.root={pathlib.Path(cfg.run.root).absolute()}']))
    except submitit.core.utils.FailedJobError as e:
        why = str(e).strip().splitlines()[-1].removeprefix('sbatch: error: ')
        raise ConfigError(f'sbatch refused the job: {why}') from None
    print(f'submitted Slurm job {job.job_id} for run {cfg.run_dir} (logs in {options.folder(cfg)})')
    return job

"""The stop flag: a signal handler that only records the signal; the trainer polls it at step boundaries,
all ranks agree, save together and exit (ECOSYSTEM.md (a): never checkpoint inside a handler). After the task, the
ranks agree once more on what stopped them, and rank 0 alone asks Slurm to requeue the job: after the time-limit
signal (USR2) or a preemption (stock Slurm: SIGTERM, then SIGKILL after GraceTime; a job that exits inside the grace
time counts as completed and is not requeued by Slurm). A SIGTERM from `scancel` means stop."""

import signal
import subprocess

from .. import distributed
from ..logging import log

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)   # USR2: the time-limit signal (submitit, --signal); TERM: preemption

class StopFlag:
    """Callable flag set by any of `signals` (USR2: Slurm preemption / time limit; TERM: a local stop)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signum: int | None = None
        self.signals = signals
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            log.warning(f'received {signal.Signals(signum).name}: stopping at the next step boundary')
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    def release(self) -> None:
        """The task is over (any stop-save done): ignore further signals. Python restores the default actions while
        it shuts down, so a second USR2 during the exit would otherwise turn a clean stop into death by signal."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)

def agreed_stop(stop: StopFlag) -> int:
    """Collective (while the process group is up): 0 if no rank was signalled, else the signal that stopped the run,
    the same on every rank (USR2 wins over TERM: it asks for a requeue)."""
    code = distributed.rank_max({None: 0, signal.SIGTERM: 1, signal.SIGUSR2: 2}.get(stop.signum, 1))
    distributed.barrier()   # the group's last collective: an all-reduce right before teardown let a rank tear its gloo
    return {0: 0, 1: signal.SIGTERM, 2: signal.SIGUSR2}[code]   # pairs down under a peer (abort, 1 run in 4)

def preempted(job_id: str) -> bool:
    """Whether Slurm is preempting the job (`scontrol show job`: PreemptTime is set during the grace time)."""
    out = subprocess.run(['scontrol', 'show', 'job', str(job_id)], capture_output=True, text=True).stdout
    return 'PreemptTime=' in out and 'PreemptTime=None' not in out

def requeue_if_asked(signum: int, rank: int, job_id: str) -> None:
    """After a committed stop-save, rank 0 requeues the job when the time limit (USR2) or a preemption (SIGTERM while
    Slurm's PreemptTime is set) stopped it. A job that ends inside its grace time is not requeued by Slurm: it counts
    as completed. A SIGTERM without a preemption (scancel) asks for nothing."""
    if rank != 0:
        return
    if signum == signal.SIGUSR2 or preempted(job_id):
        log.info(f'checkpoint saved; requeueing job {job_id}')
        subprocess.run(['scontrol', 'requeue', str(job_id)], check=True)
    else:
        log.info(f'checkpoint saved after SIGTERM (not a preemption): job {job_id} ends')

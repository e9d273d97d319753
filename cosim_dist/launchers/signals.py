"""The stop flag: a signal handler that only records the signal; the trainer polls it at step boundaries,
all ranks agree, save together and exit (ECOSYSTEM.md (a): never checkpoint inside a handler). After the task, the
ranks agree once more on what stopped them, and rank 0 alone asks Slurm to requeue the job: after the time-limit
signal (USR2) or a preemption (stock Slurm: SIGTERM, then SIGKILL after GraceTime; a job that exits inside the grace
time counts as completed and is not requeued by Slurm). A SIGTERM from `scancel` means stop. A stop-save that outruns
its budget (`checkpoint.stop_budget_s`) is given up: rank 0 requeues at once, before the kill could end the job."""

import signal
import subprocess
import threading
from collections.abc import Callable

from .. import distributed
from ..config import Config
from ..distributed import DistEnv
from ..logging import log

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)   # USR2: the time-limit signal (submitit, --signal); TERM: preemption

class StopFlag:
    """Callable flag set by any of `signals` (USR2: Slurm preemption / time limit; TERM: a local stop). With a
    `budget_s`, `on_overrun(signum)` runs (in a timer thread) if the flag is not released within that many seconds of
    the first signal."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, budget_s: float | None = None,
                 on_overrun: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.signals, self.budget_s, self.on_overrun = signals, budget_s, on_overrun
        self.timer: threading.Timer | None = None
        self.overran = False
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            log.warning(f'received {signal.Signals(signum).name}: stopping at the next step boundary')
            if self.budget_s is not None and self.on_overrun is not None:
                self.timer = threading.Timer(self.budget_s, self._overrun, args=(signum,))
                self.timer.daemon = True
                self.timer.start()
        self.signum = signum

    def _overrun(self, signum: int) -> None:
        self.overran = True
        log.warning(f'the stop-save did not commit within checkpoint.stop_budget_s={self.budget_s:g} s: giving it up')
        self.on_overrun(signum)

    def __call__(self) -> bool:
        return self.signum is not None

    def release(self) -> None:
        """The task is over (any stop-save done): cancel the budget and ignore further signals. Python restores the
        default actions while it shuts down, so a second USR2 during the exit would otherwise turn a clean stop into
        death by signal."""
        if self.timer is not None:
            self.timer.cancel()
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

def requeue_if_asked(signum: int, rank: int, job_id: str, done: str = 'checkpoint saved') -> None:
    """After a committed stop-save, rank 0 requeues the job when the time limit (USR2) or a preemption (SIGTERM while
    Slurm's PreemptTime is set) stopped it. A job that ends inside its grace time is not requeued by Slurm: it counts
    as completed. A SIGTERM without a preemption (scancel) asks for nothing."""
    if rank != 0:
        return
    if signum == signal.SIGUSR2 or preempted(job_id):
        log.info(f'{done}; requeueing job {job_id}')
        subprocess.run(['scontrol', 'requeue', str(job_id)], check=True)
    else:
        log.info(f'{done} after SIGTERM (not a preemption): job {job_id} ends')

def run_until_stopped(cfg: Config, env: DistEnv, job_id: str | None = None) -> int:
    """Run cfg.task on this rank under a StopFlag; returns the agreed stop signal (0: the task ran to its end). In a
    Slurm job (`job_id`) rank 0 then requeues the job if the stop asks for it, or at once if the stop-save outruns its
    budget."""
    from .. import tasks
    overrun = (lambda signum: requeue_if_asked(signum, env.rank, job_id, 'stop-save given up')) if job_id else None
    stop = StopFlag(budget_s=cfg.checkpoint.stop_budget_s, on_overrun=overrun)
    try:
        tasks.run(cfg, env, should_stop=stop)
        signum = agreed_stop(stop)
        stop.release()                          # a second signal during the exit must not kill the stopped task
    finally:
        distributed.shutdown()
    if signum and job_id and not stop.overran:
        requeue_if_asked(signum, env.rank, job_id)
    return signum

"""The stop flag: a signal handler that only records the signal; the trainer polls it at step boundaries,
all ranks agree, save together and exit (ECOSYSTEM.md (a): never checkpoint inside a handler)."""

import signal

from ..logging import log

class StopFlag:
    """Callable flag set by any of `signals` (USR2: Slurm preemption / time limit; TERM: a local stop)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2,)) -> None:
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

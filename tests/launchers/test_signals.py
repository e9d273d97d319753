"""The stop flag's budget: a stop-save that does not finish within `budget_s` of the first signal hands over to
`on_overrun` (the Slurm launchers: rank 0 requeues before the kill); one released in time never does."""

import os
import signal
import threading
import time

from cosim_dist.launchers.signals import StopFlag

def test_stop_budget_overrun_calls_back_once_and_release_in_time_does_not():
    calls, fired = [], threading.Event()
    def on_overrun(signum: int) -> None:
        calls.append(signum)
        fired.set()
    try:
        slow = StopFlag(budget_s=0.3, on_overrun=on_overrun)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)             # a second signal neither restarts nor adds a timer
        assert slow() and slow.signum == signal.SIGTERM
        assert fired.wait(10) and calls == [signal.SIGUSR2] and slow.overran
        slow.release()

        quick = StopFlag(budget_s=0.3, on_overrun=on_overrun)
        os.kill(os.getpid(), signal.SIGTERM)
        quick.release()                                  # the save committed in time
        time.sleep(0.6)
        assert calls == [signal.SIGUSR2] and not quick.overran
        os.kill(os.getpid(), signal.SIGUSR2)             # released: ignored, the test process lives on
    finally:
        for s in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

"""Repeated preemption: USR2 (what Slurm sends before a time limit or preemption) at random steps and in the middle of
checkpoint saves, half the time followed by more USR2 until the process is gone (stop-save and exit). Every stop
must exit cleanly (exit 0) with a commit at the step it stopped at, every restart must resume from it, and the run
must end bit-identical to an uninterrupted one."""

import contextlib
import os
import random
import signal
import time

import fault_harness as h
import pytest
from fault_report import Trial, trials

from cosim_dist.storage import open_store

pytestmark = pytest.mark.slow
STOPPED = 'run the same command again to resume'

def test_repeated_usr2_preemption(fault_root, reference, record):
    rng = random.Random(2)
    for trial in range(trials(1, share=0.5)):
        name = f'usr2-{trial}'
        store = open_store(fault_root / name / 'checkpoints')

        def choose(done: int) -> tuple[str, h.Phase, int]:
            if rng.random() < 0.3:
                return 'mid-save', h.in_staging(store), rng.randrange(3)
            return 'step', h.random_train_phase(rng, done), 0

        def again(run: h.Run) -> None:
            """Half the time, more USR2 every 20-50 ms until the process is gone (during the stop-save and the exit)."""
            if rng.random() < 0.5:
                while run.proc.poll() is None:
                    time.sleep(rng.uniform(0.02, 0.05))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(run.proc.pid, signal.SIGUSR2)

        hits, final = h.chain(fault_root, name, rng.randint(2, 3), signal.SIGUSR2, choose, then=again,
                              extra=lambda: [f'checkpoint.async_upload={rng.random() < 0.5}'])
        assert final.wait() == 0, final.output()[-3000:]
        diff = h.differences(h.final_state(final.dir), reference)
        clean = [x.rc == 0 and STOPPED in x.run.output() and max(x.steps, default=0) == x.progress for x in hits]
        lost = any(x.lost or max(x.steps, default=0) < x.progress for x in hits) or bool(diff)
        ok = all(clean) and all(x.resumed_ok for x in hits) and not lost
        record(Trial('USR2 preemption, 2-3 per run', ok, lost, f'{name}: {[x.label for x in hits]}'))
        assert ok, ([(x.label, x.rc, x.steps, x.bad, x.announced, x.progress, x.resumed_ok) for x in hits], clean,
                    diff[:5], [x.run.output()[-1500:] for x in hits])

"""kill -9 of a training process at random moments: in a training step, while the engines write a checkpoint into
staging, and while a checkpoint is uploaded but not committed (sync and async uploads). Every restart must resume
from the newest commit that verifies, no announced commit may disappear, and the run must end bit-identical to an
uninterrupted one."""

import random
import signal

import fault_harness as h
import pytest
from fault_report import Trial, trials

from cosim_dist.storage import open_store

pytestmark = pytest.mark.slow
KILLS_PER_RUN = 4

def test_kill9_at_random_moments(fault_root, reference, record):
    rng, todo, chains = random.Random(9), trials(3), 0
    while todo > 0:
        chains += 1
        name = f'kill-{chains}'
        store = open_store(fault_root / name / 'checkpoints')
        phases = {'a training step': lambda done: h.random_train_phase(rng, done),
                  'checkpoint staging': lambda done: h.in_staging(store),
                  'checkpoint upload': lambda done: h.in_upload(store)}

        def choose(done: int) -> tuple[str, h.Phase, int]:
            label = rng.choice(sorted(phases))
            return label, phases[label](done), rng.randrange(3)

        hits, final = h.chain(fault_root, name, min(todo, KILLS_PER_RUN), signal.SIGKILL, choose,
                              extra=lambda: [f'checkpoint.async_upload={rng.random() < 0.5}'])
        assert final.wait() == 0, final.output()[-3000:]
        diff = h.differences(h.final_state(final.dir), reference)
        for hit in hits:
            record(Trial(f'kill -9 during {hit.label}', hit.resumed_ok and not hit.lost and not diff,
                         hit.lost or bool(diff), f'{name}: commits {hit.steps}'))
        assert all(hit.resumed_ok and not hit.lost for hit in hits), [(x.label, x.steps, x.bad, x.announced,
                                                                       x.run.output()[-1500:]) for x in hits]
        assert not diff, diff[:5]
        todo -= len(hits)

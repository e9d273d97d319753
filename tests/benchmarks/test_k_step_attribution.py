"""benchmarks/k_step_attribution.py: the per-jump attribution of an Eq. S1 sampler's error, checked on generators whose
answer is known in the toy world (the teacher is the world's exact denoiser)."""

import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'benchmarks'))
from k_step_attribution import attribution, run_config  # noqa: E402

from cosim_dist.build import make_world  # noqa: E402
from cosim_dist.config import load_config, save_config  # noqa: E402
from cosim_dist.toy import ExactDenoiser  # noqa: E402

def small_config():
    return load_config(['model.resolution=8', 'model.channels=1', 'data.gmm.classes=3', 'model.label_dim=3'])

class ExactSampler(torch.nn.Module):
    """A perfect one-step generator: a fresh exact sample of the label, whatever the input."""

    def __init__(self, world) -> None:
        super().__init__()
        self.world, self.gen = world, torch.Generator().manual_seed(1)

    def forward(self, x, sigma, c):
        return self.world.sample(len(x), self.gen, labels=c.argmax(1))[0].reshape(x.shape)

def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r['name']: r for r in rows}

def test_a_perfect_generator_loses_nothing_and_the_posterior_mean_loses_it_at_the_jump_to_the_last_point():
    cfg = small_config()
    world = make_world(cfg)
    teacher = ExactDenoiser(world)
    rows = by_name(attribution(cfg, ExactSampler(world), teacher, steps=4, samples=1500, heun_steps=10))
    floor = rows['exact samples (floor)']['within_component_fd']
    assert len(rows) == 1 + 4 + 2 * 3 + 1
    # every state the perfect generator hands on is the exact noisy marginal: chain and exact rows agree up to the
    # sampling error of two within-component FDs of ~170 samples per component (floor 0.06; 0.15 is several times it)
    for name, r in rows.items():
        if name.startswith('chain'):
            exact = rows[name.replace('chain', 'exact')]
            assert abs(r['within_component_fd'] - exact['within_component_fd']) < 0.15, name
    assert rows['CoSIM K=4 (whole sampler)']['within_component_fd'] < floor + 0.15
    # the posterior mean E[x0 | x_tau] as "generator": its jumps from 80 and 17.5 lose only what noise at the next
    # level hides anyway; the jump from 2.5 to 0.17 hands on the shrunk posterior mean, whose missing diversity inside
    # the components Heun cannot recover from 0.17: the attribution points at that jump and no other
    rows = by_name(attribution(cfg, teacher, teacher, steps=4, samples=1500, heun_steps=10))
    chain = [n for n in rows if n.startswith('chain')]
    gaps = [rows[n]['within_component_fd'] - rows[n.replace('chain', 'exact')]['within_component_fd'] for n in chain]
    assert abs(gaps[0]) < 0.15 and abs(gaps[1]) < 0.15 and gaps[2] > 1, gaps
    assert rows['CoSIM K=4 (whole sampler)']['within_component_fd'] > 1

def test_the_run_config_is_read_back_from_config_yaml(tmp_path):
    cfg = small_config()
    save_config(cfg, tmp_path)
    assert run_config(tmp_path) == cfg

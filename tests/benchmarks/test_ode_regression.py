"""benchmarks/ode_regression.py: the regression of the generator's network onto the teacher's ODE solution from one
noise level, on a small toy network (any teacher's ODE map is a valid target)."""

import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'benchmarks'))
from ode_regression import ode_regression  # noqa: E402

from cosim_dist.build import new_network  # noqa: E402
from cosim_dist.config import load_config  # noqa: E402

def test_the_regression_moves_the_network_onto_the_teachers_ode_map():
    cfg = load_config(['model.resolution=8', 'model.channels=1', 'data.gmm.classes=3', 'model.label_dim=3',
                       'model.net.model_channels=8', 'train.batch=32'])
    torch.manual_seed(0)
    teacher = new_network(cfg).eval()
    before = [p.detach().clone() for p in teacher.parameters()]
    rows = ode_regression(cfg, teacher, None, tau=2.5, steps=40, lr=1e-3, samples=300, heun_steps=4)
    names = [r['name'] for r in rows]
    assert names == ['teacher Heun from x_2.5', 'teacher one step', 'regressed G after 10 steps',
                     'regressed G after 20 steps', 'regressed G after 30 steps', 'regressed G after 40 steps']
    assert rows[0]['mse_to_ode'] == 0                      # the target row is the target itself
    assert rows[0]['nfe'] == 7 and rows[1]['nfe'] == 1
    start, end = rows[1]['mse_to_ode'], rows[-1]['mse_to_ode']
    # 40 Adam steps of a fixed-target regression: the distance falls steadily (here 28 -> 19), a wrong target or a
    # missing update would leave it where it started
    assert end < 0.8 * start, [r['mse_to_ode'] for r in rows]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))    # the teacher is left untouched

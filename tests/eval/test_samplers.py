"""Evaluation: per-seed generation independent of batch size and world size; float64 moments all-reduced."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cosim_dist import build, cosim
from cosim_dist.config import load_config
from cosim_dist.eval.samplers import cosim_spec, rank_seeds, sampler_moments, tune_grid
from cosim_dist.teacher_io import save_snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]

def test_rank_seeds_partition_the_range():
    for world in (1, 2, 3, 7):
        parts = [rank_seeds(range(5, 105), r, world) for r in range(world)]
        assert [s for p in parts for s in p] == list(range(5, 105))

@pytest.mark.numeric
def test_moments_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    G = lambda x, sigma, c: 0.3 * x + (0 if c is None else c[:, :1, None, None])
    spec = cosim_spec(G, cosim.default_grid(2, cosim.NoiseRange()))
    a = sampler_moments(spec, range(100), (1, 4, 4), 3, 7, torch.device('cpu')).moments()
    b = sampler_moments(spec, range(100), (1, 4, 4), 3, 100, torch.device('cpu')).moments()
    # The same per-seed images; only the float64 sums are grouped by 7 vs 100: <= n u64 max E[f_i f_j]
    # = 100 x 1.1e-16 x 64 = 7e-13 per entry, so atol=1e-12 (rtol=1e-12 dropped: it allowed 6e-11 on the large entries)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.from_numpy(x), torch.from_numpy(y), rtol=0, atol=1e-12)

@pytest.mark.slow
def test_two_ranks_give_the_same_table_as_one(tmp_path):
    args = [f'run.root={tmp_path}', 'run.name=ev', 'task=eval', 'pretrain.kimg=0.5', 'model.net.model_channels=16',
            'eval.num_samples=600', 'eval.heun_steps=3', 'eval.batch=64', 'logging.wandb=disabled',
            'logging.progress=false']
    cfg = load_config(args)
    build.prepare_run_dir(cfg)
    teacher = build.get_teacher(cfg, torch.device('cpu'))
    save_snapshot(cfg.run_dir / 'generator.pt', teacher)
    tables = []
    for nproc in (1, 2):
        out = subprocess.run([sys.executable, str(REPO / 'launch.py'), f'--nproc={nproc}', *args],
                             capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert out.returncode == 0, out.stderr[-3000:]
        tables.append(json.loads((cfg.run_dir / 'eval.json').read_text()))
    # The same per-seed images; their float64 moment sums are taken in another order (batches, then the all-reduce),
    # which moves the rounding floor of each distance: the sample covariance S (600 samples) has rank 599 < d = 768, and
    # the distance takes square roots of the 169 null eigenvalues of S^1/2 S_ref S^1/2, rounding errors <= u64 ||S||
    # ||S_ref|| with ||S|| <= tr S <= (sqrt(tr S_ref) + sqrt(FD))^2. Each distance may carry that floor: 2e-7 to 7e-5 of
    # it here (was rel=1e-9, only 6x the 1.7e-10 measured on one CPU).
    cov = build.make_world(cfg).moments()[1]
    norm, tr = float(torch.linalg.eigvalsh(cov).max()), float(cov.trace())
    for a, b in zip(*tables):
        fd = max(a['frechet_distance'], b['frechet_distance'])
        floor = (768 - 599) * math.sqrt(2.0 ** -53 * norm) * (math.sqrt(tr) + math.sqrt(fd))
        assert a['name'] == b['name'] and abs(a['frechet_distance'] - b['frechet_distance']) <= 2 * floor

def test_greedy_grid_search_finds_a_better_interior_point():
    target = [80.0, 5.0, 0.5]
    score = lambda g: sum((a - b) ** 2 for a, b in zip(g, target))
    grid, best = tune_grid([80.0, 10.0, 0.25], score)
    assert grid == [80.0, 5.0, 0.5] and best == 0.0

@pytest.mark.numeric
def test_dpm_solver_converges_on_gaussian_data():
    S0 = 0.5
    den = lambda x, sigma, c: S0 ** 2 / (S0 ** 2 + cosim._bcast(torch.as_tensor(sigma)) ** 2) * x
    z = torch.randn(20000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    # No Monte-Carlo error: the sampler is linear, x = g z, so std(x) / std(z) = g exactly; rel bounds the
    # discretisation error of 64 second-order steps (0.38%; first order, without the 2M correction, is off by 4.4%).
    assert float(cosim.dpm_solver_2m_sample(den, z, None, 64).std()) == pytest.approx(S0 * float(z.std()), rel=0.01)

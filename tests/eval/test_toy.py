"""The toy evaluation's samples.png: ground truth first, then one labelled row per sampler, padded cells."""

import numpy as np
import torch
from PIL import Image

from cosim_dist import build
from cosim_dist.config import load_config
from cosim_dist.eval.toy import evaluate_toy
from cosim_dist.logging import GRID_PADDING

def test_samples_png_has_a_padded_cell_per_seed_and_a_label_per_row(tmp_path):
    cfg = load_config([f'run.root={tmp_path}', 'run.name=t', 'run.device=cpu', 'model.net.model_channels=8',
                       'pretrain.kimg=0.064', 'pretrain.batch=64', 'eval.num_samples=32', 'eval.heun_steps=2',
                       'eval.dpm_nfe=[2]', 'eval.steps=[1,2]', 'logging.wandb=disabled', 'logging.progress=false'])
    build.prepare_run_dir(cfg)
    teacher = build.get_teacher(cfg, torch.device('cpu'))
    rows = evaluate_toy(cfg, teacher, teacher, torch.device('cpu'))
    image = np.asarray(Image.open(cfg.run_dir / 'samples.png').convert('RGB'))
    n_rows, cols, cell = len(rows), 20, 64                   # ground truth + 4 samplers; 16 px enlarged to 64
    grid_width = cols * (cell + GRID_PADDING) + GRID_PADDING
    assert n_rows == 5 and image.shape[0] == n_rows * (cell + GRID_PADDING) + GRID_PADDING
    margin = image.shape[1] - grid_width
    assert margin > 40                                       # room for 'teacher DPM-Solver++(2M) (N=2)'
    assert (image[:, margin:margin + GRID_PADDING] == 255).all()          # white padding left of the first column
    for r in range(n_rows):                                  # every row's label is drawn in the margin
        top = GRID_PADDING + r * (cell + GRID_PADDING)
        assert (image[top:top + cell, :margin] < 128).any(), r

def stats_of(world, x, labels):
    from cosim_dist.eval.toy import ComponentStats
    stats = ComponentStats(world)
    stats.update(x, labels)
    return stats.metrics()

def test_component_stats_see_diversity_inside_the_modes():
    """Exact samples sit at the finite-n floor; samples collapsed to their component means score K on the
    within-component distance (no spread, no bias) while the Frechet distance of the whole mixture barely notices;
    exact samples moved by d standard deviations along a component's first direction add d^2 to the distance, all
    of it bias; samples all from one component per class score the component-weight error 1 - 1/R."""
    from cosim_dist.config import GMMConfig
    from cosim_dist.toy import GMMWorld
    world = GMMWorld(GMMConfig(classes=3, components=3, rank=4), resolution=8, channels=1)
    gen = torch.Generator().manual_seed(0)
    x, labels = world.sample(6000, gen)
    exact = stats_of(world, x, labels)
    assert exact['within_component_fd'] < 0.1 and exact['component_weight_tv'] < 0.05
    k, _, _ = world.components(x, labels)
    means = world.mu[labels * 3 + k].reshape(x.shape).float()
    collapsed = stats_of(world, means, labels)
    assert abs(collapsed['within_component_fd'] - 4) < 0.05 and collapsed['component_weight_tv'] < 0.05
    assert collapsed['within_component_bias'] < 1e-6
    comp = labels * 3 + k
    d = 1.5                                                                    # z_0 -> z_0 + d in whitened units
    lam0 = (world.a[comp, 0] ** 2 + world.eps2).sqrt()
    shifted = stats_of(world, x + (d * lam0[:, None] * world.Q[comp, :, 0]).reshape(x.shape).float(), labels)
    # the cross term 2 d mean(z_0) averaged over 9 components of ~670 samples has std 2 d / sqrt(6000) = 0.04: 5 sigma
    assert abs(shifted['within_component_bias'] - (exact['within_component_bias'] + d ** 2)) < 0.2
    assert abs(shifted['within_component_fd'] - shifted['within_component_bias']
               - (exact['within_component_fd'] - exact['within_component_bias'])) < 1e-6     # the spread is unchanged
    one = world.mu[labels * 3].reshape(x.shape).float() + (x - means)          # every sample moved to component 0
    single = stats_of(world, one, labels)
    assert abs(single['component_weight_tv'] - 2 / 3) < 1e-9
    assert exact['nll_per_dim'] < single['nll_per_dim']                        # off-component samples are unlikely

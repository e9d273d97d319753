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

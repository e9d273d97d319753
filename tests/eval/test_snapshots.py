"""Training snapshots (eval.every_kimg): the EMA files, the quick Frechet distance curve in metrics.jsonl at multiples
of the interval (also across a stop and resume), progress.png, and for real models the evaluation's own FID pipeline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cosim_dist import build, tasks
from cosim_dist.config import load_config
from cosim_dist.distributed import DistEnv
from cosim_dist.eval.metrics import save_ref
from cosim_dist.eval.snapshots import Snapshots, history
from cosim_dist.nets import build_network
from cosim_dist.teacher_io import load_snapshot, save_snapshot

ARGS = ['train.kimg=0.256', 'train.batch=32', 'train.checkpoint_kimg=0.128', 'train.log_kimg=0.064',
        'eval.every_kimg=0.064', 'eval.quick_samples=200', 'eval.batch=100', 'eval.steps=[1,2]',
        'logging.wandb=disabled', 'logging.progress=false', 'model.net.model_channels=16']
POINTS = [64, 128, 192, 256]            # nimg of the snapshots: every 64 images

def make_trainer(root, should_stop=lambda: False):
    cfg = load_config([f'run.root={root}', *ARGS])
    build.prepare_run_dir(cfg)
    torch.manual_seed(0)
    teacher = build.new_network(cfg).eval().requires_grad_(False)
    snap = Snapshots(cfg, torch.device('cpu'), DistEnv(), real=False)
    return cfg, build.build_trainer(cfg, teacher, torch.device('cpu'), should_stop=should_stop, snapshot=snap)

def test_the_default_run_draws_a_curve_of_at_least_three_points():
    cfg = load_config([])
    assert cfg.groups['model'] == 'toy' and cfg.eval.every_kimg > 0
    assert cfg.train.kimg // cfg.eval.every_kimg >= 3          # one point per interval

def test_snapshots_write_ema_files_a_distance_curve_and_a_plot(tmp_path):
    cfg, trainer = make_trainer(tmp_path)
    trainer.train()
    rows = history(cfg.run_dir / 'metrics.jsonl')
    assert [r['nimg'] for r in rows] == POINTS
    for r in rows:
        assert set(r['distance']) == {'K=1', 'K=2'} and all(np.isfinite(v) and v > 0 for v in r['distance'].values())
        assert r['metric'] == 'frechet_distance' and r['num_samples'] == 200 and r['floor'] > 0
    first, _ = load_snapshot(cfg.run_dir / rows[0]['snapshot'])
    last, extra = load_snapshot(cfg.run_dir / rows[-1]['snapshot'])
    # the last point is the final EMA (generator.pt's weights); the first an earlier, different one
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), trainer.ema.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), last.state_dict().values()))
    assert extra['nimg'] == 256 and sorted(extra['grids']) == [1, 2]
    assert rows[0]['distance'] != rows[-1]['distance']         # a curve of the training, not one network scored again
    logged = [json.loads(line) for line in (cfg.run_dir / 'train.jsonl').read_text().splitlines()]
    assert [r['nimg'] for r in logged if 'snapshot/frechet_distance K=1' in r] == POINTS
    with Image.open(cfg.run_dir / 'progress.png') as png:
        assert png.format == 'PNG' and png.size == (1000, 400)

def test_a_stopped_and_resumed_run_draws_the_uninterrupted_curve(tmp_path):
    make_trainer(tmp_path / 'a')[1].train()
    calls = iter(range(1000))
    cfg, first = make_trainer(tmp_path / 'b', should_stop=lambda: next(calls) >= 3)   # stops at 96 images
    assert first.train().nimg == 96
    assert [r['nimg'] for r in history(cfg.run_dir / 'metrics.jsonl')] == [64]
    make_trainer(tmp_path / 'b')[1].train()                   # resumes at 96: the next snapshot is at 128, not 96
    lines = (cfg.run_dir / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['nimg'] for line in lines] == POINTS
    straight = history(tmp_path / 'a' / cfg.run.name / 'metrics.jsonl')
    assert [r['distance'] for r in history(cfg.run_dir / 'metrics.jsonl')] == [r['distance'] for r in straight]

def test_history_keeps_the_rows_of_the_resumed_timeline(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    rows = [(0, 'a'), (64, 'a'), (128, 'a'), (192, 'a'), (128, 'b'), (192, 'b'), (256, 'b')]  # resumed at 128
    path.write_text(''.join(json.dumps({'nimg': n, 'v': v}) + '\n' for n, v in rows))
    assert [(r['nimg'], r['v']) for r in history(path)] == [(0, 'a'), (64, 'a'), (128, 'b'), (192, 'b'), (256, 'b')]
    assert history(tmp_path / 'missing.jsonl') == []

#----------------------------------------------------------------------------
# Real models: the quick distance is the evaluation's own (same seeds -> the same number as task=eval).

SONG = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], dropout=0.0)

@pytest.mark.slow
def test_real_model_snapshot_equals_the_evaluation_on_the_same_seeds(tmp_path, inception_weights):
    torch.manual_seed(1)
    G = build_network('songunet', **SONG)
    save_snapshot(tmp_path / 'g.pt', G)
    ref = tmp_path / 'ref.pkl'
    save_ref(ref, {'fid': (np.zeros(2048), np.eye(2048))})
    common = [f'run.root={tmp_path}', 'run.device=cpu', 'model.arch=songunet', 'eval.steps=[1,2]',
              'eval.metrics=[inception]', f'eval.inception_weights={inception_weights}', f'eval.ref={ref}',
              'eval.batch=4', 'eval.chunk=6', 'logging.wandb=disabled', 'logging.progress=false']
    cfg = load_config([*common, 'run.name=snap', 'eval.quick_samples=12'])
    build.prepare_run_dir(cfg)
    scalars = Snapshots(cfg, torch.device('cpu'), DistEnv(), real=True)(0, G.eval())
    row = history(cfg.run_dir / 'metrics.jsonl')[0]
    assert row['metric'] == 'fd_inception' and row['floor'] is None
    evaluated = tasks.run(load_config([*common, 'run.name=eval', 'task=eval', f'eval.generator={tmp_path / "g.pt"}',
                                       'eval.samplers=[cosim]', 'eval.num_samples=12']))
    for K, r in zip((1, 2), evaluated):
        assert row['distance'][f'K={K}'] == pytest.approx(r['fd_inception'], rel=1e-9)   # same images, float64 sums
        assert scalars[f'snapshot/fd_inception K={K}'] == row['distance'][f'K={K}']

"""End to end: `launch.py` pretrains a small toy teacher, distils it, evaluates, and writes its outputs."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from cosim_dist import build
from cosim_dist.config import load_config
from cosim_dist.eval.metrics import frechet_to_reference
from cosim_dist.eval.samplers import cosim_spec, sampler_moments

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = ['pretrain.kimg=25', 'pretrain.batch=128', 'train.kimg=6', 'train.batch=32', 'train.log_kimg=2',
         'train.checkpoint_kimg=3', 'eval.num_samples=2000', 'eval.heun_steps=8', 'logging.progress=false']

@pytest.mark.slow
def test_small_run_improves_on_initialisation(tmp_path):
    args = [f'run.root={tmp_path}', 'run.name=e2e', 'logging.wandb=offline', *SMALL]
    out = subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / 'e2e'
    rows = {r['name']: r for r in json.loads((run_dir / 'eval.json').read_text())}
    assert {'teacher Heun (N=8)', 'teacher DPM-Solver++(2M) (N=4)', 'CoSIM K=1', 'CoSIM K=2', 'CoSIM K=4'} <= set(rows)
    # the default grid, printed to 5 digits: half a unit in the last digit (was abs=1e-3)
    assert rows['CoSIM K=2']['grid'] == pytest.approx([80.0, 2.5152], abs=5e-5)
    assert rows['CoSIM K=4']['nfe'] == 4 and rows['teacher Heun (N=8)']['nfe'] == 15
    assert 'CoSIM K=4' in out.stdout                                                  # the printed table
    for name in ('samples.png', 'config.yaml', 'generator.pt', 'train.jsonl', 'pretrain.jsonl'):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / 'wandb').iterdir())                                        # offline wandb run
    scalars = [json.loads(line) for line in (run_dir / 'train.jsonl').read_text().splitlines()]
    assert scalars[-1]['nimg'] >= 6000 and all('loss/gen' in s for s in scalars)

    # The same seeds through the generator at initialisation (the teacher itself as the one-step kernel).
    cfg = load_config(args)
    teacher = build.get_teacher(cfg, torch.device('cpu'))
    world = build.make_world(cfg)
    mu, sigma = (m.numpy() for m in world.moments())
    floor = rows['exact samples (noise floor)']['frechet_distance']          # sampling noise at 2000 samples
    acc = sampler_moments(cosim_spec(teacher, [80.0]), range(2000), world.shape, 10, 500,
                          torch.device('cpu'))
    at_init = frechet_to_reference(acc, mu, sigma)
    assert at_init - rows['CoSIM K=1']['frechet_distance'] > 5 * floor, (rows, at_init)

@pytest.mark.slow
def test_rerun_resumes_and_reuses_teacher(tmp_path):
    args = [f'run.root={tmp_path}', 'run.name=r', 'logging.wandb=disabled', *SMALL, 'pretrain.kimg=2',
            'eval.num_samples=200', 'task=train']
    launch = [sys.executable, str(REPO / 'launch.py')]
    first = subprocess.run(launch + args + ['train.kimg=3'], capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(launch + args, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'reusing cached toy teacher' in second.stderr and 'resumed at 3.0 kimg' in second.stderr

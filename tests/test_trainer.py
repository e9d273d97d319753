"""The Eq. L1 loop: exact resume, no gradient leaks between the two networks, NaN samples dropped."""

import pytest
import torch

from cosim_dist import build
from cosim_dist.config import ConfigError, load_config

ARGS = ['train.kimg=0.256', 'train.batch=32', 'train.checkpoint_kimg=0.064', 'logging.wandb=disabled',
        'logging.progress=false', 'model.net.model_channels=16']

def make_trainer(tmp_path, *extra):
    cfg = load_config([f'run.root={tmp_path}', *ARGS, *extra])
    build.prepare_run_dir(cfg)
    torch.manual_seed(0)
    teacher = build.new_network(cfg).eval().requires_grad_(False)
    return cfg, build.build_trainer(cfg, teacher, torch.device('cpu'))

def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])

def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    _, straight = make_trainer(tmp_path / 'a')
    straight.train()
    cfg, first = make_trainer(tmp_path / 'b')
    calls = iter(range(1000))
    first.should_stop = lambda: next(calls) >= 3                 # preempted after 3 iterations
    assert first.train().nimg == 96
    _, second = make_trainer(tmp_path / 'b')                             # a fresh process: finds the saved state
    assert second.train().nimg == 256
    for a, b in ((straight.g.module, second.g.module), (straight.aux.module, second.aux.module),
                 (straight.ema, second.ema)):
        assert torch.equal(params(a), params(b))

def test_generator_step_leaves_auxiliary_gradients_alone(tmp_path):
    _, trainer = make_trainer(tmp_path)
    gen = torch.Generator().manual_seed(0)
    trainer.generator_step(gen)
    assert all(p.grad is None for p in trainer.aux.module.parameters())
    assert all(p.requires_grad for p in trainer.aux.module.parameters())
    before = params(trainer.g.module)
    trainer.aux_step(gen)
    assert torch.equal(before, params(trainer.g.module))         # the aux step does not move G
    assert all(p.grad is None for p in trainer.g.module.parameters())

def test_nan_samples_are_dropped_and_counted(tmp_path):
    _, trainer = make_trainer(tmp_path)
    real = trainer.data.next_batch

    def poisoned():
        x, c = real()
        x[0] = float('nan')
        return x, c

    trainer.data.next_batch = poisoned
    gen = torch.Generator().manual_seed(0)
    loss = trainer.aux_step(gen) + trainer.generator_step(gen)
    assert torch.isfinite(torch.tensor(loss)) and trainer.state.nan_dropped == 2
    assert torch.isfinite(params(trainer.g.module)).all() and torch.isfinite(params(trainer.aux.module)).all()

def test_resume_with_a_different_config_is_an_error(tmp_path):
    _, trainer = make_trainer(tmp_path)
    trainer.train()
    _, changed = make_trainer(tmp_path, 'loss.lmbda=2.0', 'train.kimg=1')
    with pytest.raises(ConfigError, match=r"loss.lmbda: 1.0 in the checkpoint, 2.0 now"):
        changed.train()

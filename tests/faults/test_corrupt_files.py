"""Corrupt files around a run: a damaged newest checkpoint (flipped byte, truncated or deleted file, broken manifest),
teacher pickles carrying a forbidden global, and bad config values. A damaged commit is skipped (and written again
when training reaches its step), a forbidden global is refused by name and never runs, a bad value is a one-line
error naming the key."""

import builtins
import io
import os
import pickle
import random
import shutil
import subprocess
import sys

import fault_harness as h
import pytest
import torch
from fault_report import Trial, trials

from cosim_dist import build, teacher_io
from cosim_dist.checkpoint import step_prefix
from cosim_dist.config import ConfigError, batch_layout, load_config

ARGS = ['train.kimg=0.128', 'train.batch=16', 'train.checkpoint_kimg=0.032', 'logging.wandb=disabled',
        'logging.progress=false', 'model.net.model_channels=16']
DAMAGE = ('flipped byte', 'truncated file', 'deleted file', 'broken manifest')

def make_trainer(root, name: str):
    cfg = load_config([f'run.root={root}', f'run.name={name}', *ARGS])
    build.prepare_run_dir(cfg)
    torch.manual_seed(0)
    return build.build_trainer(cfg, build.new_network(cfg).eval().requires_grad_(False), torch.device('cpu'))

def trained(trainer) -> dict:
    return {'g': trainer.g.module.state_dict(), 'aux': trainer.aux.module.state_dict(), 'ema': trainer.ema.state_dict(),
            'g_opt': trainer.g.optimizer.state_dict(), 'aux_opt': trainer.aux.optimizer.state_dict()}

def damage(store, nimg: int, kind: str, rng: random.Random) -> None:
    prefix = step_prefix(nimg)
    state = [k for k in store.list(prefix) if k.endswith(('.bin', '.json', 'meta.pt')) and 'manifest' not in k]
    key = f'{prefix}/manifest.json' if kind == 'broken manifest' else rng.choice(state)   # a shard, index or meta.pt
    data = bytearray(store.read(key))
    if kind == 'deleted file':
        store.delete(key)
        return
    if kind == 'truncated file':
        data = data[:rng.randrange(len(data))]
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    store.put_bytes(bytes(data), key)

def test_damaged_newest_checkpoint_falls_back(tmp_path, record):
    straight = make_trainer(tmp_path, 'straight')
    straight.train()
    reference = trained(straight)
    rng = random.Random(11)
    for trial in range(trials(2)):
        name, kind = f'damaged-{trial}', DAMAGE[trial % len(DAMAGE)] if trial < len(DAMAGE) else rng.choice(DAMAGE)
        first, calls = make_trainer(tmp_path, name), iter(range(1000))
        stop_after = rng.randint(2, 7)
        first.should_stop = lambda: next(calls) >= stop_after
        first.train()
        steps = first.checkpointer.committed()
        damage(first.checkpointer.store, steps[-1], kind, rng)
        second = make_trainer(tmp_path, name)
        try:
            second.train()
            diff = h.differences(trained(second), reference)
        except Exception as e:                                  # e.g. the step cannot be written again
            diff = [f'{type(e).__name__}: {e}']
        resumed = second.checkpointer.resumed
        ok = not diff and resumed == (step_prefix(steps[-2]) if len(steps) > 1 else None)
        record(Trial(f'checkpoint: {kind}', ok, bool(diff), f'commits {steps}, resumed {resumed}'))
        assert ok, (kind, steps, resumed, diff[:5])

#----------------------------------------------------------------------------
# Teacher pickles with a forbidden global somewhere inside.

class Call:
    """Pickles as a call of `fn(*args)` (what a malicious pickle does)."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args

def payloads(marker: str) -> list[Call]:
    """Calls that would create `marker` if they ever ran."""
    return [Call(os.system, f'touch {marker}'), Call(subprocess.call, ['touch', marker]),
            Call(builtins.exec, f'open({marker!r}, "w")'), Call(builtins.eval, f'open({marker!r}, "w")'),
            Call(io.open, marker, 'w'), Call(shutil.copyfile, os.devnull, marker)]

def nest(obj, rng: random.Random, depth: int):
    for _ in range(depth):
        obj = rng.choice((lambda o: {'state': o}, lambda o: [0, o], lambda o: (o, 1.0),
                          lambda o: {'ema': {'_modules': o}}))(obj)
    return obj

def test_teacher_pickle_with_forbidden_global(tmp_path, record):
    rng, marker = random.Random(13), tmp_path / 'executed'
    for trial in range(trials(3)):
        call = rng.choice(payloads(str(marker)))
        path = tmp_path / f'evil-{trial}.pkl'
        path.write_bytes(pickle.dumps({'ema': nest(call, rng, rng.randint(0, 4)), 'dataset_kwargs': {}},
                                      protocol=rng.randint(0, pickle.HIGHEST_PROTOCOL)))
        with pytest.raises(pickle.UnpicklingError,
                           match=rf'refusing to load \S*{call.fn.__name__}: not in the teacher_io allow-list'):
            teacher_io.load_network(path)
        record(Trial('teacher pickle with a forbidden global', not marker.exists(), False, call.fn.__name__))
        assert not marker.exists()
    out = subprocess.run([sys.executable, str(h.REPO / 'launch.py'), 'task=train', f'run.root={tmp_path}',
                          f'model.teacher={path}', 'logging.wandb=disabled', 'eval.every_kimg=0'],  # no FID inputs
                         capture_output=True, text=True, cwd=tmp_path)
    ok = (out.returncode != 0 and 'not in the teacher_io allow-list' in out.stderr.strip().splitlines()[-1]
          and not marker.exists())
    record(Trial('teacher pickle with a forbidden global', ok, False, 'through launch.py'))
    assert ok, out.stderr[-2000:]

#----------------------------------------------------------------------------
# Bad config values.

BAD = [('train.kimg', 'abc', "bad value for 'train.kimg'"), ('train.kimg', '-1', 'must be > 0'),
       ('train.batch', '0', 'must be > 0'), ('train.lr_g', '-1e-4', 'must be > 0'),
       ('train.lr_aux', '0', 'must be > 0'),
       ('train.beta2', '1.5', 'must be in [0, 1)'), ('train.ema_halflife_kimg', '-1', 'must be >= 0'),
       ('checkpoint.keep', '0', 'must be > 0'), ('data.num_workers', '-2', 'must be >= 0'),
       ('model.resolution', '0', 'must be > 0'), ('schedule.sigma_min', '0', 'must be > 0'),
       ('schedule.sigma_max', '0.001', 'must exceed'), ('kernel.eta', '1.5', 'must lie in (0, 1]'),
       ('loss.lmbda', '-1', 'must be >= 0'), ('engine.zero_stage', '5', 'valid choices'),
       ('engine.precision', 'fp16', 'valid choices'), ('model.arch', 'resnet', 'valid choices'),
       ('data.kind', 'shards', 'needs data.path'), ('eval.steps', '[0]', 'must be >= 1'),
       ('train.kimgg', '3', "unknown config key 'train.kimgg'"), ('train.batch_gpu', '7', 'must be a multiple of')]

def check_config(override: str) -> None:
    batch_layout(load_config([override]).train, 1)

def test_bad_config_values(tmp_path, record):
    rng = random.Random(17)
    for key, value, message in rng.sample(BAD, min(len(BAD), trials(6))):
        with pytest.raises(ConfigError) as err:
            check_config(f'{key}={value}')
        ok = message in str(err.value) and key.split('.')[-1] in str(err.value)
        record(Trial('bad config value', ok, False, f'{key}={value}: {err.value}'))
        assert ok, (key, value, str(err.value))
    key, value, message = rng.choice(BAD)
    out = subprocess.run([sys.executable, str(h.REPO / 'launch.py'), f'run.root={tmp_path}', f'{key}={value}'],
                         capture_output=True, text=True, cwd=tmp_path)
    lines = out.stderr.splitlines()        # every problem is reported at once, one `error:` line each
    ok = out.returncode == 2 and lines and all(line.startswith('error: ') for line in lines) and message in out.stderr
    record(Trial('bad config value', ok, False, f'launch.py {key}={value}'))
    assert ok, out.stderr

"""Configuration: groups, dotted overrides, errors naming the key and the choices, the saved YAML."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from cosim_dist.config import CONFIG_DIR, ConfigError, load_config, save_config

ROOT = CONFIG_DIR.parent

def test_defaults_groups_and_overrides():
    cfg = load_config([])
    assert cfg.groups == {'model': 'toy', 'data': 'gmm'} and cfg.run.name == 'toy-gmm'
    cfg = load_config(['model=toy', 'data=gmm', 'train.kimg=50', 'loss.lmbda=1.5', 'eval.steps=[1,3]', 'run.name=x'])
    assert cfg.train.kimg == 50 and cfg.loss.lmbda == 1.5 and cfg.eval.steps == [1, 3] and cfg.run.name == 'x'

@pytest.mark.parametrize('args, message', [
    (['trian.kimg=3'], "unknown config key 'trian' (did you mean 'train'?)"),
    (['train.kimgg=3'], "unknown config key 'train.kimgg' (did you mean 'kimg'?)"),
    (['model=nope'], "model='nope' is not a known model config; valid choices: "),
    (['data=nope'], "data='nope' is not a known data config; valid choices: gmm"),
    (['aux.t_embed=plain'], "aux.t_embed='plain' is invalid; valid choices: gated, sum"),
    (['task=fly'], "task='fly' is invalid; valid choices: default, pretrain, train, eval"),
    (['train.kimg=abc'], "bad value for 'train.kimg'"),
    (['train.batch=0'], 'train.batch=0 must be > 0'),
    (['kernel.eta=0'], 'kernel.eta=0.0 must lie in (0, 1]'),
    (['positional'], "cannot parse argument 'positional'"),
])
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value)

def test_saved_yaml_round_trips(tmp_path):
    cfg = load_config(['train.kimg=7'])
    path = save_config(cfg, tmp_path)
    assert OmegaConf.load(path).train.kimg == 7

def test_every_group_file_loads():
    for group_dir in (d for d in CONFIG_DIR.iterdir() if d.is_dir()):
        for path in group_dir.glob('*.yaml'):
            load_config([f'{group_dir.name}={path.stem}'] + (['data=gmm'] if group_dir.name != 'data' else []))

def run_launch(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'launch.py'), *args], capture_output=True, text=True, cwd=cwd)

def test_dry_run_prints_resolved_config():
    out = run_launch('--dry-run', 'train.kimg=3')
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).train.kimg == 3

def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 2, out.stderr[-2000:]
    assert 'Traceback' not in out.stderr, out.stderr[-2000:]
    return [line for line in out.stderr.splitlines() if line.startswith('error:')]

def test_launch_errors_are_one_line(tmp_path):
    [line] = error_lines(run_launch('trian.kimg=3'))
    assert "unknown config key 'trian'" in line
    [line] = error_lines(run_launch(f'model.teacher={tmp_path}/missing.pkl', f'run.root={tmp_path}', 'logging.wandb=disabled'))
    assert 'missing.pkl does not exist' in line and 'model.teacher=' in line
    blocked = tmp_path / 'file'
    blocked.write_text('')
    [line] = error_lines(run_launch(f'run.root={blocked}', 'logging.wandb=disabled'))
    assert 'not writable' in line and 'run.root=' in line

"""Configuration: groups, dotted overrides, errors naming the key and the choices, the saved YAML."""

import pathlib
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cosim_dist.config import CONFIG_DIR, ConfigError, group_choices, load_config, parse_seeds, save_config

ROOT = pathlib.Path(__file__).resolve().parents[1]   # the checkout (launch.py)

def test_defaults_groups_and_overrides():
    cfg = load_config([])
    assert cfg.groups == {'model': 'toy', 'data': 'gmm'} and cfg.run.name == 'toy-gmm'
    cfg = load_config(['model=toy', 'data=gmm', 'train.kimg=50', 'loss.lmbda=1.5', 'eval.steps=[1,3]', 'run.name=x'])
    assert cfg.train.kimg == 50 and cfg.loss.lmbda == 1.5 and cfg.eval.steps == [1, 3] and cfg.run.name == 'x'

@pytest.mark.parametrize('args, message', [
    (['trian.kimg=3'], "unknown config key 'trian' (did you mean 'train'?)"),
    (['train.kimgg=3'], "unknown config key 'train.kimgg' (did you mean 'kimg'?)"),
    (['model=nope'], "model='nope' is not a known model config; valid choices: "),
    (['data=nope'], "data='nope' is not a known data config; valid choices: cifar10, gmm, imagenet512, imagenet64"),
    (['aux.t_embed=plain'], "aux.t_embed='plain' is invalid; valid choices: gated, sum"),
    (['task=fly'], "task='fly' is invalid; valid choices: default, pretrain, train, eval"),
    (['train.kimg=abc'], "bad value for 'train.kimg'"),
    (['train.batch=0'], 'train.batch=0 must be > 0'),
    (['kernel.eta=0'], 'kernel.eta=0.0 must lie in (0, 1]'),
    (['engine.bf16_weights=true'], 'engine.bf16_weights=true keeps bf16 weights beside fp32 master weights in '
                                   'DeepSpeed ZeRO 1-3 under bf16 autocast, but engine.backend=torch'),
    (['schedule.ratio=0'], 'schedule.ratio=0.0 must be > 0'),
    (['schedule.ratio_mix=0'], 'schedule.ratio_mix=0.0 must be > 0 (or null: one R)'),
    (['schedule.mix_p=1.5'], 'schedule.mix_p=1.5 must be in [0, 1]'),
    (['schedule.r_lo=1'], 'schedule.r_lo=1.0 must be in [0, 1)'),
    (['model.arch=vit'], "model.arch='vit' is invalid; valid choices: toy, songunet, dhariwalunet, edm2"),
    (['data.gmm.rank=0'], 'data.gmm.rank=0 must be >= 1'),
    (['data.gmm.noise_std=0'], 'data.gmm.noise_std=0.0 must be > 0'),
    (['train.lr_g=-1e-4'], 'train.lr_g=-0.0001 must be > 0'),
    (['train.beta2=1'], 'train.beta2=1.0 must be in [0, 1)'),
    (['train.ema_halflife_kimg=-2'], 'train.ema_halflife_kimg=-2.0 must be >= 0'),
    (['checkpoint.keep=0'], 'checkpoint.keep=0 must be > 0'),
    (['schedule.sigma_max=0.001'], 'schedule.sigma_max=0.001 must exceed schedule.sigma_min=0.002'),
    (['eval.samplers=[heun,euler]'],
     "eval.samplers=['heun', 'euler'] is invalid; give a non-empty list of: heun, dpm, cosim"),
    (['eval.metrics=[]'], 'eval.metrics=[] is invalid; give a non-empty list of: inception, dinov2'),
    (['positional'], "cannot parse argument 'positional'"),
    (['generate.seeds=7-3'], "generate.seeds='7-3' cannot be parsed"),
    (['generate.seeds=a'], "generate.seeds='a' cannot be parsed"),
    (['generate.classes=[10]'], 'generate.classes=[10] must be a non-empty list of classes in [0, 10)'),
    (['generate.steps=2', 'generate.grid=[80]'], 'generate.grid=[80.0] must hold generate.steps=2 positive'),
    (['generate.steps=2', 'generate.grid=[1,2]'], 'strictly decreasing'),
    (['generate.png=false'], 'would write nothing'),
    (['pretrain.spread=2'], 'pretrain.spread=2.0 needs pretrain.target=exact'),
    (['pretrain.target=x0'], "pretrain.target='x0' is invalid; valid choices: data, exact"),
    (['data.kind=shards', 'data.path=/data', 'pretrain.target=exact'], 'pretrain.target=exact regresses onto the toy'),
])
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value)

def test_generate_seeds_are_ranges_and_numbers():
    assert parse_seeds('0-3,7, 10-11') == [0, 1, 2, 3, 7, 10, 11] and parse_seeds(5) == [5]
    assert parse_seeds(load_config(['generate.seeds=0-63']).generate.seeds) == list(range(64))

def test_saved_yaml_round_trips(tmp_path):
    cfg = load_config(['train.kimg=7'])
    path = save_config(cfg, tmp_path)
    assert OmegaConf.load(path).train.kimg == 7

def test_every_group_file_loads():
    for group_dir in (d for d in CONFIG_DIR.iterdir() if d.is_dir()):
        for path in group_dir.glob('*.yaml'):
            load_config([f'{group_dir.name}={path.stem}', 'data.path=/data/shards'])

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
    [line] = error_lines(run_launch(f'model.teacher={tmp_path}/missing.pkl', f'run.root={tmp_path}', 'task=train',
                                    'logging.wandb=disabled', 'eval.every_kimg=0'))   # (snapshots need eval inputs)
    assert 'missing.pkl does not exist' in line and 'model.teacher=' in line
    blocked = tmp_path / 'file'
    blocked.write_text('')
    [line] = error_lines(run_launch(f'run.root={blocked}', 'logging.wandb=disabled'))
    assert 'not writable' in line and 'run.root=' in line

# Parameters of each published teacher (tests/nets pin the architectures; here the configs must reproduce them).
MODEL_PARAMS = {'edm-cifar10-uncond': 55_733_891, 'edm-cifar10-cond': 55_733_891 + 10 * 128 + 128,
                'edm-in64': 295_899_267, 'edm2-xs': 124_713_253, 'edm2-s': 280_212_837, 'edm2-m': 497_807_781,
                'edm2-l': 777_498_085, 'edm2-xl': 1_119_283_749, 'edm2-xxl': 1_523_164_773}
SMALL_MODELS = ('edm-cifar10-uncond', 'edm-cifar10-cond', 'edm2-xs')    # run for real; the rest on the meta device

def test_every_model_group_is_tested():
    assert set(group_choices('model')) == {'toy', *MODEL_PARAMS}

@pytest.mark.parametrize('name', sorted(MODEL_PARAMS))
def test_model_configs_build_the_published_architectures(name):
    from cosim_dist.build import new_network
    cfg = load_config([f'model={name}', 'data.path=/data/shards'])
    assert cfg.groups['data'] == {'edm-': 'cifar10' if 'cifar' in name else 'imagenet64'}.get(name[:4], 'imagenet512')
    assert cfg.engine.backend == 'deepspeed' and cfg.train.batch == 2048 and cfg.eval.num_samples == 50000
    device = 'cpu' if name in SMALL_MODELS else 'meta'
    with torch.device(device):
        net = new_network(cfg)
        assert sum(p.numel() for p in net.parameters()) == MODEL_PARAMS[name]
        x = torch.randn(2, cfg.model.channels, cfg.model.resolution, cfg.model.resolution)
        labels = torch.eye(cfg.model.label_dim)[:2] if cfg.model.label_dim else None
        with torch.no_grad():
            D = net.eval()(x, torch.tensor([0.5, 20.0]), labels)
    assert D.shape == x.shape and (device == 'meta' or D.isfinite().all())

def test_model_configs_carry_table5_and_latent_constants():
    s, m, large = (load_config([f'model=edm2-{k}', 'data.path=x']) for k in 'sml')
    assert (s.schedule.ratio, m.schedule.ratio, large.schedule.ratio) == (8, 4, 4)
    assert (s.model.net['dropout'], m.model.net['dropout'], large.model.net['dropout']) == (0, 0.1, 0.1)
    assert (s.train.kimg, large.train.kimg) == (200_000, 20_000) and s.train.beta2 == 0.99 and s.train.batch_gpu == 32
    # Eq. T1: the published teachers take the paper's R as a sigma-space gap, the toy its small R in rho-space
    assert {c.schedule.kind for c in (s, m, large)} == {'sigma'}
    assert load_config([]).schedule.kind == 'rho'
    assert s.model.latent_raw_mean == [5.81, 3.25, 0.12, -2.15] and s.model.latent_raw_std == [4.17, 4.62, 3.71, 3.28]
    cifar = load_config(['model=edm-cifar10-cond', 'data.path=x'])
    assert cifar.model.label_dim == 10 and cifar.model.net['dropout'] == 0 and cifar.train.beta2 == 0.999
    assert load_config(['model=edm-in64', 'data.path=x']).schedule.ratio == 8
    assert {load_config([f'model={n}', 'data.path=x']).schedule.kind for n in MODEL_PARAMS} == {'sigma'}

def test_group_extends_and_defaults(tmp_path, monkeypatch):
    """`extends` merges the parent first (child wins); `defaults` picks groups the command line leaves open; a cycle
    is an error naming it."""
    import cosim_dist.config as config
    for group in ('model', 'data'):
        (tmp_path / group).mkdir()
    (tmp_path / 'data' / 'gmm.yaml').write_text('data: {kind: gmm}\n')
    (tmp_path / 'data' / 'big.yaml').write_text('data: {kind: shards, path: /big}\n')
    (tmp_path / 'model' / 'toy.yaml').write_text('model: {arch: toy}\n')
    (tmp_path / 'model' / 'base.yaml').write_text('defaults: {data: big}\nmodel: {label_dim: 7, channels: 2}\n')
    (tmp_path / 'model' / 'child.yaml').write_text('extends: base\nmodel: {label_dim: 9}\n')
    (tmp_path / 'model' / 'loop.yaml').write_text('extends: loop\n')
    monkeypatch.setattr(config, 'CONFIG_DIR', tmp_path)
    cfg = load_config(['model=child'])
    assert (cfg.model.label_dim, cfg.model.channels, cfg.data.path) == (9, 2, '/big')
    assert cfg.groups == {'model': 'child', 'data': 'big'} and cfg.run.name == 'child-big'
    assert load_config(['model=child', 'data=gmm']).data.kind == 'gmm'
    with pytest.raises(ConfigError, match='`extends` forms a cycle: loop -> loop'):
        load_config(['model=loop'])

def test_every_problem_is_reported_at_once_one_line_each(tmp_path):
    """Types, YAML syntax, architecture keys, ranges and every required value or missing file, before any work."""
    lines = error_lines(run_launch('model=edm2-s', 'task=eval', 'eval.samplers=[heun,cosim]', 'eval.steps=3',
                                   'eval.heun_steps=[1', 'model.net.model_chanels=8', 'kernel.eta=3',
                                   f'eval.ref={tmp_path}/refs.pkl', f'run.root={tmp_path}'))
    assert lines == [
        "error: override 'eval.steps=3': eval.steps takes a list, e.g. eval.steps=[1,2]",
        "error: override 'eval.heun_steps=[1' is not valid YAML (did not find expected ',' or ']'): close the "
        "bracket or quote the value",
        'error: model.net.model_chanels is not an argument of model.arch=edm2; valid keys: model_channels, '
        'channel_mult, num_blocks, dropout, channel_mult_noise, channel_mult_emb, attn_resolutions, label_balance, '
        'concat_balance, logvar_channels, channels_per_head, res_balance, attn_balance, clip_act',
        'error: kernel.eta=3.0 must lie in (0, 1]',
        'error: model.teacher is required for task=eval: set it to the official checkpoint of model.arch=edm2',
        f'error: eval.ref={tmp_path}/refs.pkl does not exist: download or copy reference statistics (EDM2 '
        'dataset-refs/*.pkl or cosim-ref-stats) there, or fix the path',
        'error: eval.inception_weights is required for task=eval: set it to the inception weights file',
        'error: eval.dinov2_weights is required for task=eval: set it to the dinov2 weights file',
        'error: eval.vae is required for task=eval: set it to a local diffusers AutoencoderKL directory '
        '(stabilityai/sd-vae-ft-mse)']
    assert not (tmp_path / 'edm2-s-imagenet512').exists()             # nothing started

def test_net_kwargs_are_the_networks_constructor_arguments():
    """config_checks.NET_KWARGS (torch-free, for --dry-run) must list what each architecture's constructor takes."""
    import inspect

    from cosim_dist.config_checks import NET_KWARGS
    from cosim_dist.nets import ARCHS, edm2
    given = {'img_resolution', 'img_channels', 'label_dim', 'sigma_data', 'aux_t_embed', 'self', 'unet_kwargs',
             'block_kwargs', 'cin', 'cout', 'emb_channels', 'flavor', 'resample_mode', 'attention'}
    for arch, cls in ARCHS.items():
        ctors = [cls.__init__, cls.UNET.__init__] + ([edm2.Block.__init__] if arch == 'edm2' else [])
        takes = {n for f in ctors for n in inspect.signature(f).parameters} - given
        assert set(NET_KWARGS[arch]) == takes, arch

def test_schedule_kind_choices_are_the_t1_readings():
    """config_checks (torch-free) repeats cosim.T1_KINDS as a literal; a new reading must be allowed in both."""
    from cosim_dist.config_checks import CHOICES
    from cosim_dist.cosim import T1_KINDS
    assert CHOICES['schedule.kind'] == T1_KINDS

def test_training_snapshots_of_a_real_model_need_the_first_metric_only(tmp_path):
    from cosim_dist.config_checks import readiness
    args = ['model=edm2-s', 'task=train', f'model.teacher={tmp_path}', f'data.path={tmp_path}']
    keys = lambda *extra: sorted(p.split()[0].split('=')[0] for p in readiness(load_config([*args, *extra])))
    assert keys('eval.every_kimg=0') == []
    assert keys('eval.every_kimg=1024') == ['eval.inception_weights', 'eval.ref', 'eval.vae']

"""Component assembly (cosim_dist/build.py) for the published-model configs: the student's constructor arguments
against the teacher's, the dataset against the model config, and a short real training run of a (tiny) EDM2 latent
model from latent shards through the `edm2-xs` group."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cosim_dist import build, tasks
from cosim_dist.config import ConfigError, load_config
from cosim_dist.latents import latent_scale_bias
from cosim_dist.nets import build_network
from cosim_dist.shards import DatasetInfo, shard_name, write_manifest, write_shard
from cosim_dist.storage import open_store
from cosim_dist.teacher_io import load_snapshot, save_snapshot

TINY = ['model.resolution=8', 'model.label_dim=5', 'model.net.model_channels=16', 'model.net.channel_mult=[1,2]',
        'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]', 'data.num_workers=0']

def tiny_edm2(dropout: float = 0.0) -> torch.nn.Module:
    return build_network('edm2', img_resolution=8, img_channels=4, label_dim=5, model_channels=16, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[8], dropout=dropout)

def write_latents(url: str, raw_mean: list[float], raw_std: list[float], shards: int = 2, per_shard: int = 16) -> None:
    scale, bias = latent_scale_bias(raw_mean, raw_std)
    info = DatasetInfo(kind='latents', resolution=8, channels=4, label_count=5, latent_scale=scale, latent_bias=bias)
    store, rng = open_store(url), np.random.default_rng(0)
    sample = lambda key: {'__key__': key, 'mean.npy': rng.normal(raw_mean, raw_std, (8, 8, 4)).T.astype(np.float16),
                          'std.npy': np.full((4, 8, 8), 0.1, np.float16), 'cls': int(rng.integers(5))}
    entries = [write_shard(store, shard_name(s), [sample(f'{s:03d}{i:05d}') for i in range(per_shard)], info)
               for s in range(shards)]
    write_manifest(store, info, entries)

def test_student_takes_the_teachers_architecture_and_the_configs_dropout():
    cfg = load_config(['model=edm2-m', 'data.path=x', *TINY])          # edm2-m: Table 5 dropout 0.1
    kwargs = build.student_kwargs(cfg, tiny_edm2(dropout=0.0))
    assert kwargs['dropout'] == 0.1 and kwargs['model_channels'] == 16
    with pytest.raises(ConfigError, match=r'model_channels=256 \(teacher: 16\).*select the model group'):
        build.student_kwargs(load_config(['model=edm2-m', 'data.path=x', 'model.resolution=8', 'model.label_dim=5',
                                          'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]',
                                          'model.net.channel_mult=[1,2]']), tiny_edm2())

def test_dataset_must_match_the_model(tmp_path):
    cfg = load_config(['model=edm2-xs', f'data.path={tmp_path}', *TINY])
    write_latents(str(tmp_path), [0.0, 0, 0, 0], [1.0, 1, 1, 1])
    with pytest.raises(ConfigError, match=r'latent scale/bias .* differ from the model'):
        build.make_stream(cfg, 4, seed=0)
    with pytest.raises(ConfigError, match=r'holds 4x8x8 samples with 5 classes, but model edm2-xs expects 4x8x8 with '
                                          r'1000 classes'):
        build.make_stream(load_config(['model=edm2-xs', f'data.path={tmp_path}', *TINY, 'model.label_dim=1000']), 4, 0)
    with pytest.raises(ConfigError, match='holds latents but model toy is a pixel model'):
        build.make_stream(load_config([f'data.path={tmp_path}', 'data.kind=shards', 'model.resolution=8',
                                       'model.channels=4', 'model.label_dim=5']), 4, 0)

def test_edm2_latent_training_run(tmp_path):
    """model=edm2-xs (shrunk) distils a random tiny EDM2 teacher snapshot on EDM2-convention latent shards: the run
    resolves its data group, checks the shards, trains with dropout from the config and normalised weights."""
    cfg0 = load_config(['model=edm2-xs', 'data.path=x'])
    write_latents(str(tmp_path / 'shards'), cfg0.model.latent_raw_mean, cfg0.model.latent_raw_std)
    torch.manual_seed(0)
    teacher = tiny_edm2(dropout=0.3)
    save_snapshot(tmp_path / 'teacher.pt', teacher)
    cfg = load_config(['model=edm2-xs', 'task=train', f'data.path={tmp_path / "shards"}',
                       f'model.teacher={tmp_path / "teacher.pt"}', *TINY, 'engine.backend=torch',
                       'engine.precision=fp32', 'train.batch=8', 'train.batch_gpu=8', 'train.kimg=0.032',
                       'train.log_kimg=0.016', 'train.checkpoint_kimg=0', 'logging.wandb=disabled',
                       'logging.progress=false', f'run.root={tmp_path}', 'run.name=edm2', 'run.device=cpu'])
    assert cfg.groups['data'] == 'imagenet512'
    tasks.run(cfg)
    G, _ = load_snapshot(tmp_path / 'edm2' / 'generator.pt')
    assert G.init_kwargs['dropout'] == 0.0 and G.init_kwargs['model_channels'] == 16
    w = G.unet.enc['8x8_block0'].conv_res0.weight
    # normalize divides by eps + rms (eps = 1e-4) after every step: mean square (1 + 1e-4)^-2 up to the O(lr^2) drift of
    # 4 small steps and the EMA, plus ~log2(144) u32 = 5e-7 of fp32 summation (measured 1.8e-7): atol=1e-5 (was 2e-3
    # around 0.9998)
    torch.testing.assert_close(w.square().mean([1, 2, 3]), torch.full([w.shape[0]], (1 + 1e-4) ** -2),
                               atol=1e-5, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(G.state_dict().values(), teacher.state_dict().values()))

def test_default_task_checks_evaluation_inputs_before_training(tmp_path):
    """task=default on a real model trains for days and then evaluates: its missing inputs are named at launch."""
    save_snapshot(tmp_path / 't.pt', tiny_edm2())
    args = ['model=edm2-xs', f'data.path={tmp_path}', *TINY, f'model.teacher={tmp_path}/t.pt',
            f'eval.ref={tmp_path}/ref.pkl', f'run.root={tmp_path}', 'run.device=cpu']
    with pytest.raises(ConfigError) as e:
        load_config(args, ready=True)
    assert e.value.problems == [
        f'eval.ref={tmp_path}/ref.pkl does not exist: download or copy reference statistics (EDM2 '
        'dataset-refs/*.pkl or cosim-ref-stats) there, or fix the path',
        'eval.inception_weights is required for task=default: set it to the inception weights file',
        'eval.dinov2_weights is required for task=default: set it to the dinov2 weights file',
        'eval.vae is required for task=default: set it to a local diffusers AutoencoderKL directory '
        '(stabilityai/sd-vae-ft-mse)']

#----------------------------------------------------------------------------
# The run's records: config.yaml from the first invocation, one record per later invocation, none for a refusal.

RECORD_ARGS = ['run.name=rec', 'train.batch=32', 'train.kimg=0.064', 'train.checkpoint_kimg=0.064',
               'logging.wandb=disabled', 'logging.progress=false', 'model.net.model_channels=16']

def distil_invocation(root, *extra: str) -> None:
    cfg = load_config([f'run.root={root}', *RECORD_ARGS, *extra])
    build.prepare_run_dir(cfg)
    torch.manual_seed(0)
    build.distil(cfg, build.new_network(cfg).eval().requires_grad_(False), torch.device('cpu'))

def config_files(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in [run_dir / 'config.yaml',
                                                                  *(run_dir / 'invocations').glob('*.yaml')]}

def test_config_yaml_is_written_once_and_later_invocations_are_recorded(tmp_path):
    run_dir = tmp_path / 'rec'
    distil_invocation(tmp_path)
    first = config_files(run_dir)
    assert list(first) == ['config.yaml'] and load_config([]).run.overrides == []
    assert OmegaConf.load(run_dir / 'config.yaml').train.kimg == 0.064
    distil_invocation(tmp_path, 'train.kimg=0.128')                       # a longer run, resumed
    second = config_files(run_dir)
    [record] = set(second) - set(first)
    assert second['config.yaml'] == first['config.yaml'] and record.startswith('invocations/')
    saved = OmegaConf.load(run_dir / record)
    assert saved.overrides[-1] == 'train.kimg=0.128' and saved.config.train.kimg == 0.128 and 'time' in saved
    with pytest.raises(ConfigError, match='loss.lmbda: 1.0 in the checkpoint, 0.5 now'):
        distil_invocation(tmp_path, 'train.kimg=0.192', 'loss.lmbda=0.5')   # refused: nothing changes
    assert config_files(run_dir) == second

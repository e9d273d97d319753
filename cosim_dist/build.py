"""Assembly: the components a task runs on, built from the config. The run directory, the data stream, the teacher
(an official checkpoint or the cached toy teacher), the engines of the generator and the auxiliary, the checkpoint
manager, the logger and the Trainer that receives them all (Eq. L1). Dispatch lives in tasks.py."""

import dataclasses
import datetime
import getpass
import hashlib
import pathlib
import socket
import tempfile

import torch
from omegaconf import OmegaConf

from . import cosim, distributed
from .checkpoint import CheckpointManager
from .config import Config, ConfigError, batch_layout, config_hash, save_config
from .distributed import DistEnv, check_store_reachable, gather_object
from .engines import TorchEngine, compile_network, prepare_network
from .latents import latent_scale_bias
from .logging import RunLogger, log
from .nets import TRAINING_KWARGS, build_network, weight_constraint
from .nets.aux import make_auxiliary
from .pretrain import pretrain_teacher
from .resume import resume_fingerprint
from .storage import ObjectStore, missing_local, open_store, parse_url
from .teacher_io import arch_name, load_network, load_snapshot, save_snapshot
from .toy import ExactDenoiser, GMMStream, GMMWorld
from .trainer import Trainer
from .zero import DeepSpeedEngine, place_teacher

#----------------------------------------------------------------------------
# Run directory, data, logging.

def prepare_run_dir(cfg: Config) -> pathlib.Path:
    """Create <run.root>/<run.name>; a one-line error if not writable. The config is recorded once the start is
    accepted (`record_invocation`)."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / '.write-test'
        probe.write_text('')
        probe.unlink()
    except OSError as e:
        raise ConfigError(f'run directory {run_dir} is not writable ({e.strerror}); '
                          f'choose another with run.root=DIR or run.name=NAME') from None
    return run_dir

def record_invocation(cfg: Config) -> pathlib.Path:
    """Rank 0, once the start is accepted (for training: after the resume check). The run's first invocation writes
    <run_dir>/config.yaml, never rewritten; each later one <run_dir>/invocations/<UTC time>.yaml with its command-line
    overrides and the config they resolved to. A refused start writes nothing."""
    if not (cfg.run_dir / 'config.yaml').exists():
        return save_config(cfg, cfg.run_dir)
    now = datetime.datetime.now(datetime.UTC)
    path = cfg.run_dir / 'invocations' / f'{now:%Y%m%dT%H%M%S.%fZ}.yaml'
    path.parent.mkdir(exist_ok=True)
    path.write_text(OmegaConf.to_yaml({'time': now.isoformat(), 'overrides': list(cfg.run.overrides),
                                       'config': OmegaConf.structured(cfg)}))
    return path

def shared_store(cfg: Config) -> ObjectStore | None:
    """The object store every node reaches (`checkpoint.url` when it is s3://), or None for a local store."""
    url = cfg.checkpoint.url
    return open_store(url) if url and parse_url(url)[0] == 's3' else None

def publish(cfg: Config, *paths: pathlib.Path) -> None:
    """Rank 0: copies of run-directory outputs (generator.pt, snapshots, metrics, eval.json, grids) under
    `<checkpoint.url>/outputs/<path in the run dir>` when that store is s3://, so that no node's disk is the only
    home of a result."""
    if (store := shared_store(cfg)) is not None:
        for path in paths:
            store.put_file(path, f'outputs/{path.relative_to(cfg.run_dir).as_posix()}')

def make_world(cfg: Config) -> GMMWorld:
    if cfg.data.kind != 'gmm':
        raise ConfigError(f'data.kind={cfg.data.kind!r} has no exact ground truth; the toy pipeline needs data=gmm')
    if cfg.data.gmm.classes != cfg.model.label_dim:
        raise ConfigError(f'data.gmm.classes={cfg.data.gmm.classes} must equal model.label_dim={cfg.model.label_dim}')
    return GMMWorld(cfg.data.gmm, cfg.model.resolution, cfg.model.channels)

def make_stream(cfg: Config, batch_per_rank: int, seed: int, env: DistEnv = DistEnv()):
    if cfg.data.kind == 'gmm':
        return GMMStream(make_world(cfg), batch_per_rank, seed, env.rank, env.world_size)
    from .data import ShardStream
    stream = ShardStream(cfg.data.path, batch_size=batch_per_rank, seed=seed, num_workers=cfg.data.num_workers,
                         rank=env.rank, world_size=env.world_size)
    check_dataset(cfg, stream.info)
    return stream

def check_dataset(cfg: Config, info) -> None:
    """The shards must hold what the model config describes: shape, classes and, for latents, EDM2's scale/bias."""
    m, where = cfg.model, f'data.path={cfg.data.path} (manifest.parquet)'
    have = (info.channels, info.resolution, info.label_count)
    if have != (m.channels, m.resolution, m.label_dim):
        raise ConfigError(f'{where} holds {have[0]}x{have[1]}x{have[1]} samples with {have[2]} classes, but model '
                          f'{cfg.groups.get("model")} expects {m.channels}x{m.resolution}x{m.resolution} with '
                          f'{m.label_dim} classes; point data.path at the matching shards')
    latent_model = m.latent_raw_mean is not None
    if latent_model != (info.kind == 'latents'):
        raise ConfigError(f'{where} holds {info.kind} but model {cfg.groups.get("model")} is a '
                          f'{"latent" if latent_model else "pixel"} model; use cosim-encode-latents shards '
                          f'for latent models and pixel shards otherwise')
    if latent_model:
        want = latent_scale_bias(m.latent_raw_mean, m.latent_raw_std)
        if any(abs(a - b) > 1e-6 for w, h in zip(want, (info.latent_scale, info.latent_bias)) for a, b in zip(w, h)):
            raise ConfigError(f'{where} latent scale/bias {info.latent_scale}/{info.latent_bias} differ from the '
                              f'model\'s {want[0]}/{want[1]} (model.latent_raw_mean/std); re-encode the latents with '
                              f'--raw-mean/--raw-std matching the model, or fix the config')

def make_logger(cfg: Config, name: str, rank: int = 0) -> RunLogger:
    """The logger of one phase (`name`: pretrain, train, eval); wandb receives the full resolved config."""
    return RunLogger(cfg.run_dir, name, config=dataclasses.asdict(cfg), wandb_mode=cfg.logging.wandb,
                     project=cfg.logging.project, progress=cfg.logging.progress, rank=rank)

def noise_range(cfg: Config) -> cosim.NoiseRange:
    return cosim.NoiseRange(sigma_min=cfg.schedule.sigma_min, sigma_max=cfg.schedule.sigma_max, rho=cfg.schedule.rho)

def new_network(cfg: Config) -> torch.nn.Module:
    m = cfg.model
    return build_network(m.arch, img_resolution=m.resolution, img_channels=m.channels, label_dim=m.label_dim,
                         sigma_data=m.sigma_data, **m.net)

#----------------------------------------------------------------------------
# Teacher: an official checkpoint (model.teacher) or the toy teacher, pretrained once and cached.

def toy_teacher_path(cfg: Config) -> pathlib.Path:
    key = config_hash(cfg.model)[:6] + config_hash(cfg.data.gmm)[:6] + config_hash(cfg.pretrain)[:6]
    return pathlib.Path(cfg.run.root) / '_cache' / f'toy-teacher-{key}.pt'

def denoiser(cfg: Config, teacher: torch.nn.Module) -> torch.nn.Module:
    """D_phi of Eqs. A1 / G1 and the teacher baselines: the teacher network, or with teacher.kind=exact the toy
    world's closed-form denoiser."""
    return ExactDenoiser(make_world(cfg)) if cfg.teacher.kind == 'exact' else teacher

def get_teacher(cfg: Config, device: torch.device, retrain: bool = False) -> torch.nn.Module:
    """The official teacher (each rank loads it), or the toy teacher: pretrained (or reused from its cache) by rank 0,
    then shared with every rank (collective where a process group is up)."""
    if cfg.model.teacher is not None:
        if missing_local(cfg.model.teacher):
            raise ConfigError(f'teacher checkpoint model.teacher={cfg.model.teacher} does not exist: download the '
                              f'official .pkl and pass its path (or an s3:// URL) as model.teacher=...')
        return load_network(cfg.model.teacher).to(device)
    if cfg.model.arch != 'toy' or cfg.data.kind != 'gmm':
        raise ConfigError(f'model.teacher is not set for model.arch={cfg.model.arch!r}: download the official '
                          f'checkpoint and pass model.teacher=PATH (or s3://...)')
    path = toy_teacher_path(cfg)
    if distributed.rank() == 0 and path.is_file() and not retrain:
        log.info(f'reusing cached toy teacher {path}')
    elif distributed.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        net = new_network(cfg).to(device)
        stream = make_stream(cfg, cfg.pretrain.batch, seed=cfg.run.seed + 1)
        exact = ExactDenoiser(make_world(cfg)) if cfg.pretrain.target == 'exact' else None
        save_snapshot(path, pretrain_teacher(net, stream, cfg.pretrain, cfg.model.sigma_data, cfg.run.seed,
                                             make_logger(cfg, 'pretrain'), exact))
        log.info(f'toy teacher saved to {path}')
    distributed.share_file(path)                        # rank 0's teacher on every node's disk (run.root may be local)
    return load_snapshot(path)[0].to(device)

#----------------------------------------------------------------------------
# Distillation (Eq. L1).

def make_engine(cfg: Config, net: torch.nn.Module, lr: float, env: DistEnv):
    """The network's engine; EDM2 weights are normalised before the first step and after every step."""
    t, e = cfg.train, cfg.engine
    batch_gpu, rounds = batch_layout(t, env.world_size)
    if e.backend == 'torch':
        if env.world_size > 1:
            raise ConfigError(f'engine.backend=torch runs one process, but the world size is {env.world_size}: '
                              f'use engine.backend=deepspeed')
        return TorchEngine(net, lr, (t.beta1, t.beta2), t.eps, accum=rounds, constraint=weight_constraint(net))
    return DeepSpeedEngine(net, lr, (t.beta1, t.beta2), t.eps, micro_batch=batch_gpu, accum=rounds,
                           world_size=env.world_size, zero_stage=e.zero_stage, constraint=weight_constraint(net),
                           bf16_weights=e.precision == 'bf16' and (e.zero_stage == 3 if e.bf16_weights is None
                                                                   else e.bf16_weights))

def default_staging(cfg: Config) -> pathlib.Path:
    """A node-local directory for staging saves ($TMPDIR, else /tmp), one per user and run directory."""
    key = hashlib.sha256(str(cfg.run_dir.absolute()).encode()).hexdigest()[:8]
    return pathlib.Path(tempfile.gettempdir()) / f'cosim-dist-{getpass.getuser()}' / f'{cfg.run_dir.name}-{key}'

def make_checkpointer(cfg: Config, env: DistEnv) -> CheckpointManager:
    """Collective: the checkpoint store, refused if it is local and the ranks run on several hosts."""
    c = cfg.checkpoint
    check_store_reachable(c.url or str(cfg.run_dir), gather_object(socket.gethostname()))
    return CheckpointManager(c.url or str(cfg.run_dir / 'checkpoints'),
                             pathlib.Path(c.staging or default_staging(cfg)),
                             rank=env.rank, keep=c.keep, async_upload=c.async_upload,
                             storage=cfg.storage)

def student_kwargs(cfg: Config, teacher: torch.nn.Module) -> dict:
    """The teacher's constructor arguments with the config's training-only ones (dropout, Table 5) overlaid.
    The architecture the config names must be the teacher's: a mismatch is an error naming the keys."""
    want = {'arch': cfg.model.arch, 'img_resolution': cfg.model.resolution, 'img_channels': cfg.model.channels,
            'label_dim': cfg.model.label_dim, 'sigma_data': cfg.model.sigma_data, **cfg.model.net}
    have = {'arch': arch_name(teacher), **teacher.init_kwargs}
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    diff = [f'{k}={plain(v)!r} (teacher: {plain(have[k])!r})' for k, v in want.items()
            if k not in TRAINING_KWARGS and k in have and plain(v) != plain(have[k])]
    if diff:
        raise ConfigError(f'the model config ({cfg.groups.get("model")}) does not describe the teacher '
                          f'{cfg.model.teacher}: {", ".join(diff)}; select the model group that matches the teacher')
    return {**teacher.init_kwargs, **{k: want[k] for k in TRAINING_KWARGS if k in want}}

def build_trainer(cfg: Config, teacher: torch.nn.Module, device: torch.device, env: DistEnv = DistEnv(),
                  should_stop=lambda: False, data=None, checkpoints: bool = True, timer=None,
                  on_start=lambda: None, snapshot=None) -> Trainer:
    """Generator and auxiliary initialised from the teacher (fp32), their engines, data, schedule, checkpoints, with
    the engine's speed options (channels_last, activation checkpointing, torch.compile). The benchmark passes its
    synthetic `data`, `checkpoints=False` and a per-phase `timer`; `distil` an `on_start` and the `snapshot` of
    eval.every_kimg (see Trainer)."""
    t, s, e = cfg.train, cfg.schedule, cfg.engine
    G = build_network(cfg.model.arch, **student_kwargs(cfg, teacher))
    G.load_state_dict({k: v.float() for k, v in teacher.state_dict().items()})
    G = G.to(device).requires_grad_(True)
    aux = prepare_network(make_auxiliary(G, cfg.aux.t_embed).requires_grad_(True), e, trained=True)
    G = prepare_network(G, e, trained=True)
    batch_gpu, _ = batch_layout(t, env.world_size)
    schedule = cosim.TimeSchedule(ratio=s.ratio, r_lo=s.r_lo, sigma_s_max=s.sigma_s_max, noise=noise_range(cfg),
                                  kind=s.kind, gen_sigma_s_min=s.gen_sigma_s_min, ratio_mix=s.ratio_mix,
                                  mix_p=s.mix_p)
    g_engine, aux_engine = make_engine(cfg, G, t.lr_g, env), make_engine(cfg, aux, t.lr_aux, env)
    d_phi = denoiser(cfg, teacher)
    if d_phi is teacher:                                # the network teacher (not the toy's exact denoiser)
        d_phi = prepare_network(place_teacher(teacher, cfg.teacher, device, env.world_size), e, trained=False)
        compile_network(d_phi, e.compile)
    for net in (g_engine.module, aux_engine.module):
        compile_network(net, e.compile)
    return Trainer(teacher=d_phi, g_engine=g_engine, aux_engine=aux_engine,
                   data=data or make_stream(cfg, batch_gpu, cfg.run.seed + 2, env), schedule=schedule, train=t,
                   loss=cfg.loss, kernel=cfg.kernel, sigma_data=cfg.model.sigma_data, seed=cfg.run.seed,
                   logger=make_logger(cfg, 'train', env.rank), device=device, precision=e.precision,
                   checkpointer=make_checkpointer(cfg, env) if checkpoints else None, should_stop=should_stop,
                   rank=env.rank, world_size=env.world_size, batch_gpu=batch_gpu, fingerprint=resume_fingerprint(cfg),
                   timer=timer, on_start=on_start, snapshot=snapshot, snapshot_every=round(cfg.eval.every_kimg * 1000))

def distil(cfg: Config, teacher: torch.nn.Module, device: torch.device, env: DistEnv = DistEnv(),
           should_stop=lambda: False, snapshot=None) -> torch.nn.Module:
    """Train (or resume) the generator; returns its EMA, also saved (rank 0) as <run_dir>/generator.pt with its
    default Eq. S1 grid for every K of eval.steps and its kernel.eta (`extra['grids']`, `extra['eta']`, used by
    task=generate). The invocation is recorded once the checkpoint's config was accepted; `snapshot`
    (eval/snapshots.py) runs every eval.every_kimg."""
    trainer = build_trainer(cfg, teacher, device, env, should_stop,
                            on_start=(lambda: record_invocation(cfg)) if env.rank == 0 else lambda: None,
                            snapshot=snapshot)
    state = trainer.train()
    if env.rank == 0 and state.nimg >= cfg.train.kimg * 1000:
        grids = {K: cosim.default_grid(K, noise_range(cfg), cfg.eval.grid_scale) for K in cfg.eval.steps}
        save_snapshot(cfg.run_dir / 'generator.pt', trainer.ema, extra={'grids': grids, 'eta': cfg.kernel.eta})
        publish(cfg, cfg.run_dir / 'generator.pt')
    return trainer.ema

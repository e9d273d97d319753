"""Tasks behind `launch.py`: pretrain (toy teacher), train (CoSIM distillation), eval, and the embedded
default pipeline (teacher -> distil -> evaluate). Builds the components the trainer receives."""

import dataclasses
import pathlib
import time

import torch

from . import cosim
from .checkpoint import CheckpointManager
from .storage import StorageConfig
from .config import Config, ConfigError, batch_layout, config_hash, resume_fingerprint, save_config
from . import distributed
from .distributed import DistEnv
from .engines import DeepSpeedEngine, TorchEngine, compile_network, place_teacher, prepare_network
from .generate import evaluate_features
from .evaluate import (cosim_spec, dpm_spec, format_table, frechet_to_reference, heun_spec, sampler_moments,
                       seeded_inputs, tune_grid, write_results)
from .metrics import MomentAccumulator
from .logging import RunLogger, log, save_image_grid
from .nets import TRAINING_KWARGS, build_network, weight_constraint
from .nets.aux import make_auxiliary
from .pretrain import pretrain_teacher
from .teacher_io import arch_name, load_network, load_snapshot, save_snapshot
from .toy import GMMConfig, GMMStream, GMMWorld
from .trainer import Trainer

#----------------------------------------------------------------------------
# Run directory, device, components.

def prepare_run_dir(cfg: Config) -> pathlib.Path:
    """Create <run.root>/<run.name> and save the resolved config; a one-line error if not writable."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / '.write-test'
        probe.write_text('')
        probe.unlink()
    except OSError as e:
        raise ConfigError(f'run directory {run_dir} is not writable ({e.strerror}); '
                          f'choose another with run.root=DIR or run.name=NAME') from None
    save_config(cfg, run_dir)
    return run_dir

def make_world(cfg: Config) -> GMMWorld:
    if cfg.data.kind != 'gmm':
        raise ConfigError(f'data.kind={cfg.data.kind!r} has no exact ground truth; the toy pipeline needs data=gmm')
    if cfg.data.gmm.classes != cfg.model.label_dim:
        raise ConfigError(f'data.gmm.classes={cfg.data.gmm.classes} must equal model.label_dim={cfg.model.label_dim}')
    return GMMWorld(GMMConfig(**dataclasses.asdict(cfg.data.gmm), resolution=cfg.model.resolution,
                              channels=cfg.model.channels))

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
    from .data import latent_scale_bias
    m, where = cfg.model, f'data.path={cfg.data.path} (manifest.parquet)'
    have = (info.channels, info.resolution, info.label_count)
    if have != (m.channels, m.resolution, m.label_dim):
        raise ConfigError(f'{where} holds {have[0]}x{have[1]}x{have[1]} samples with {have[2]} classes, but model '
                          f'{cfg.groups.get("model")} expects {m.channels}x{m.resolution}x{m.resolution} with '
                          f'{m.label_dim} classes; point data.path at the matching shards')
    latent_model = m.latent_raw_mean is not None
    if latent_model != (info.kind == 'latents'):
        raise ConfigError(f'{where} holds {info.kind} but model {cfg.groups.get("model")} is a '
                          f'{"latent" if latent_model else "pixel"} model; use data_tools/encode_latents.py shards '
                          f'for latent models and pixel shards otherwise')
    if latent_model:
        want = latent_scale_bias(m.latent_raw_mean, m.latent_raw_std)
        if any(abs(a - b) > 1e-6 for w, h in zip(want, (info.latent_scale, info.latent_bias)) for a, b in zip(w, h)):
            raise ConfigError(f'{where} latent scale/bias {info.latent_scale}/{info.latent_bias} differ from the '
                              f'model\'s {want[0]}/{want[1]} (model.latent_raw_mean/std); re-encode the latents with '
                              f'--raw-mean/--raw-std matching the model, or fix the config')

def make_logger(cfg: Config, name: str, rank: int = 0) -> RunLogger:
    return RunLogger(cfg.run_dir, name, config=dict(groups=cfg.groups, task=cfg.task), wandb_mode=cfg.logging.wandb,
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

def get_teacher(cfg: Config, device: torch.device, retrain: bool = False) -> torch.nn.Module:
    if cfg.model.teacher is not None:
        local = cfg.model.teacher.removeprefix('file://')
        if '://' not in local and not pathlib.Path(local).is_file():
            raise ConfigError(f'teacher checkpoint model.teacher={cfg.model.teacher} does not exist: download the '
                              f'official .pkl and pass its path (or an s3:// URL) as model.teacher=...')
        return load_network(cfg.model.teacher).to(device)
    if cfg.model.arch != 'toy' or cfg.data.kind != 'gmm':
        raise ConfigError(f'model.teacher is not set for model.arch={cfg.model.arch!r}: download the official '
                          f'checkpoint and pass model.teacher=PATH (or s3://...)')
    path = toy_teacher_path(cfg)
    if path.is_file() and not retrain:
        log.info(f'reusing cached toy teacher {path}')
        return load_snapshot(path)[0].to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    net = new_network(cfg).to(device)
    stream = make_stream(cfg, cfg.pretrain.batch, seed=cfg.run.seed + 1)
    teacher = pretrain_teacher(net, stream, cfg.pretrain, cfg.model.sigma_data, cfg.run.seed, make_logger(cfg, 'pretrain'))
    save_snapshot(path, teacher)
    log.info(f'toy teacher saved to {path}')
    return teacher

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
                           world_size=env.world_size, zero_stage=e.zero_stage, constraint=weight_constraint(net))

def make_checkpointer(cfg: Config, env: DistEnv) -> CheckpointManager:
    c = cfg.checkpoint
    return CheckpointManager(c.url or str(cfg.run_dir / 'checkpoints'), pathlib.Path(c.staging or cfg.run_dir / 'staging'),
                             rank=env.rank, keep=c.keep, async_upload=c.async_upload,
                             storage=StorageConfig(endpoint_url=c.endpoint_url))

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
                  should_stop=lambda: False, data=None, checkpoints: bool = True, timer=None) -> Trainer:
    """Generator and auxiliary initialised from the teacher (fp32), their engines, data, schedule, checkpoints, with
    the engine's speed options (channels_last, activation checkpointing, torch.compile). The benchmark passes its
    synthetic `data`, `checkpoints=False` and a per-phase `timer` (see Trainer)."""
    t, s, e = cfg.train, cfg.schedule, cfg.engine
    G = build_network(cfg.model.arch, **student_kwargs(cfg, teacher))
    G.load_state_dict({k: v.float() for k, v in teacher.state_dict().items()})
    G = G.to(device).requires_grad_(True)
    aux = prepare_network(make_auxiliary(G, cfg.aux.t_embed).requires_grad_(True), e, trained=True)
    G = prepare_network(G, e, trained=True)
    batch_gpu, _ = batch_layout(t, env.world_size)
    schedule = cosim.TimeSchedule(ratio=s.ratio, r_lo=s.r_lo, sigma_s_max=s.sigma_s_max, noise=noise_range(cfg))
    g_engine, aux_engine = make_engine(cfg, G, t.lr_g, env), make_engine(cfg, aux, t.lr_aux, env)
    teacher = prepare_network(place_teacher(teacher, cfg.teacher, device, env.world_size), e, trained=False)
    for net in (g_engine.module, aux_engine.module, teacher):
        compile_network(net, e.compile)
    return Trainer(teacher=teacher, g_engine=g_engine, aux_engine=aux_engine,
                   data=data or make_stream(cfg, batch_gpu, cfg.run.seed + 2, env), schedule=schedule, train=t,
                   loss=cfg.loss, kernel=cfg.kernel, sigma_data=cfg.model.sigma_data, seed=cfg.run.seed,
                   logger=make_logger(cfg, 'train', env.rank), device=device, precision=e.precision,
                   checkpointer=make_checkpointer(cfg, env) if checkpoints else None, should_stop=should_stop,
                   rank=env.rank, world_size=env.world_size, batch_gpu=batch_gpu, fingerprint=resume_fingerprint(cfg),
                   timer=timer)

def distil(cfg: Config, teacher: torch.nn.Module, device: torch.device, env: DistEnv = DistEnv(),
           should_stop=lambda: False) -> torch.nn.Module:
    """Train (or resume) the generator; returns its EMA, also saved (rank 0) as <run_dir>/generator.pt."""
    trainer = build_trainer(cfg, teacher, device, env, should_stop)
    state = trainer.train()
    if env.rank == 0 and state.nimg >= cfg.train.kimg * 1000:
        save_snapshot(cfg.run_dir / 'generator.pt', trainer.ema)
    return trainer.ema

#----------------------------------------------------------------------------
# Toy evaluation: Frechet distance to the exact ground-truth moments.

def evaluate_toy(cfg: Config, teacher: torch.nn.Module, G: torch.nn.Module, device: torch.device,
                 env: DistEnv = DistEnv()) -> list[dict]:
    """Collective: every rank generates its share of the seeds; rank 0 writes eval.json and samples.png.
    Rows: the noise floor, the teacher's Heun and DPM-Solver++(2M) samplers, CoSIM at each K (grid in the row)."""
    world, e, noise = make_world(cfg), cfg.eval, noise_range(cfg)
    shape, label_dim = world.shape, cfg.model.label_dim
    ref_mu, ref_sigma = (m.numpy() for m in world.moments())

    def fd(spec, seeds: range, progress=lambda n: None) -> float:
        acc = sampler_moments(spec, seeds, shape, label_dim, e.batch, device, progress, env.rank, env.world_size)
        return frechet_to_reference(acc, ref_mu, ref_sigma)

    grids = {K: cosim.default_grid(K, noise, e.grid_scale) for K in e.steps}
    if e.tune_grid:
        tune_seeds = range(e.seed + e.num_samples, e.seed + e.num_samples + e.tune_samples)
        for K in e.steps:
            grids[K], score = tune_grid(grids[K], lambda g: fd(cosim_spec(G, g), tune_seeds))
            log.info(f'tuned grid K={K}: {[round(t, 4) for t in grids[K]]} (FD {score:.4f} on {e.tune_samples} seeds)')
    specs = ([heun_spec(teacher, e.heun_steps, noise)] + [dpm_spec(teacher, n, noise) for n in e.dpm_nfe]
             + [cosim_spec(G, grids[K]) for K in e.steps])
    logger = make_logger(cfg, 'eval', env.rank)
    logger.start(e.num_samples * (len(specs) + 1), 0, 'evaluate')
    exact = exact_moments(world, e.num_samples, e.seed, e.batch)
    logger.advance(e.num_samples)
    rows = [{'name': 'exact samples (noise floor)', 'nfe': 0, 'frechet_distance': frechet_to_reference(exact, ref_mu, ref_sigma)}]
    seeds = range(e.seed, e.seed + e.num_samples)
    for spec in specs:
        rows.append({'name': spec.name, 'nfe': spec.nfe, 'frechet_distance': fd(spec, seeds, logger.advance)})
        logger.scalars(0, {f'eval/{spec.name}': rows[-1]['frechet_distance']})
    for row, K in zip(rows[-len(e.steps):], e.steps):
        row['grid'] = grids[K]
    logger.close()
    grid_images = _sample_grid(cfg, world, specs, device)
    if env.rank == 0:
        write_results(rows, cfg.run_dir / 'eval.json')
        save_image_grid(grid_images, cfg.run_dir / 'samples.png', rows=len(specs) + 1)
    return rows

def exact_moments(world: GMMWorld, n: int, seed: int, batch: int) -> MomentAccumulator:
    """Moments of n exact samples: the Frechet distance they reach is the finite-sample noise floor."""
    acc, gen = MomentAccumulator(world.dim), torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        acc.update(world.sample(min(batch, n - start), gen)[0].flatten(1))
    return acc

def _sample_grid(cfg: Config, world: GMMWorld, specs, device: torch.device, cols: int = 20) -> torch.Tensor:
    """Images for samples.png: one row per sampler (ground truth first), the same seeds and labels in every row."""
    z, c, _ = seeded_inputs(range(cols), world.shape, cfg.model.label_dim, 0, device)
    rows = [world.sample(cols, torch.Generator().manual_seed(0), labels=c.argmax(1).cpu())[0].to(device)]
    for spec in specs:
        _, _, noise = seeded_inputs(range(cols), world.shape, cfg.model.label_dim, spec.extra_draws, device)
        rows.append(spec.fn(z, c, noise))
    return torch.cat(rows)

#----------------------------------------------------------------------------

def feature_evaluation(cfg: Config) -> bool:
    """Real models (an official teacher, a non-toy network or real data) are evaluated with FID / FD-DINOv2
    (generate.py); the toy world against its exact moments."""
    return cfg.model.teacher is not None or cfg.model.arch != 'toy' or cfg.data.kind != 'gmm'

def check_eval_inputs(cfg: Config) -> None:
    """task=default on a real model evaluates after training: fail now, not after days, if its files are missing."""
    e = cfg.eval
    needed = {f'eval.{m}_weights': getattr(e, f'{m}_weights') for m in e.metrics} | {'eval.ref': e.ref}
    if cfg.model.latent_raw_mean is not None:
        needed['eval.vae'] = e.vae
    missing = [f'{k}={v}' for k, v in needed.items()
               if v is None or ('://' not in v and not pathlib.Path(v.removeprefix('file://')).exists())]
    if missing:
        raise ConfigError(f'task=default evaluates after training, but these inputs are missing: {", ".join(missing)}; '
                          f'set them (README, "Evaluating real models") or run task=train now and task=eval later')

def run(cfg: Config, env: DistEnv | None = None, should_stop=lambda: False) -> list[dict] | None:
    """Execute cfg.task on this rank (all ranks call it); returns the evaluation rows on rank 0."""
    env = env or distributed.discover()
    try:
        device = distributed.init(env, cfg.run.device, always_group=cfg.engine.backend == 'deepspeed')
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_layout(cfg.train, env.world_size)
    run_dir = prepare_run_dir(cfg) if env.rank == 0 else cfg.run_dir
    log.info(f'task={cfg.task} run_dir={run_dir} device={device} world_size={env.world_size}')
    t0 = time.time()
    if cfg.task == 'pretrain':
        if env.rank == 0:
            get_teacher(cfg, device, retrain=True)
        return None
    if cfg.task == 'bench':
        from .bench import run_bench
        run_bench(cfg, device, env)
        return None
    real = feature_evaluation(cfg)
    evaluate_real = lambda get_teacher_: evaluate_features(cfg, device, env, should_stop, get_teacher_, noise_range(cfg),
                                                           make_logger(cfg, 'eval', env.rank))
    if cfg.task == 'eval' and real:
        return evaluate_real(lambda: get_teacher(cfg, device))
    if env.rank == 0:
        teacher = get_teacher(cfg, device)
    if cfg.task == 'default' and real:
        check_eval_inputs(cfg)
    distributed.barrier()
    if env.rank != 0:
        teacher = get_teacher(cfg, device)                 # the toy teacher is cached by rank 0 by now
    G = distil(cfg, teacher, device, env, should_stop) if cfg.task in ('train', 'default') else None
    distributed.barrier()                                  # rank 0 has written generator.pt
    if should_stop():
        return None
    rows = None
    if cfg.task != 'train' and real:                       # task=default: distil, then FID / FD-DINOv2
        rows = evaluate_real(lambda: teacher)
    elif cfg.task != 'train':
        G = G if G is not None else load_snapshot(run_dir / 'generator.pt')[0].to(device)
        rows = evaluate_toy(cfg, teacher, G, device, env)
        if env.rank == 0:
            print(format_table(rows))
            log.info(f'results in {run_dir / "eval.json"}, samples in {run_dir / "samples.png"}')
    log.info(f'done in {time.time() - t0:.0f} s')
    return rows

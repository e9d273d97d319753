"""Tasks behind `launch.py`: pretrain (toy teacher), train (CoSIM distillation), eval, generate, bench, and the embedded
default pipeline (teacher -> distil -> evaluate). Dispatch only: the components come from build.py."""

import time

from . import distributed, storage
from .bench import run_bench
from .build import denoiser, distil, get_teacher, make_logger, noise_range, prepare_run_dir, record_invocation
from .config import Config, ConfigError, batch_layout
from .config_checks import real_model
from .distributed import DistEnv
from .eval.generate import run_generate
from .eval.real import evaluate_features
from .eval.results import format_table
from .eval.snapshots import Snapshots
from .eval.toy import TOY_METRICS, evaluate_toy
from .logging import log
from .teacher_io import load_snapshot

def run(cfg: Config, env: DistEnv | None = None, should_stop=lambda: False) -> list[dict] | None:
    """Execute cfg.task on this rank (all ranks call it); returns the evaluation rows on rank 0."""
    env = env or distributed.discover()
    storage.configure(cfg.storage)                         # one S3 configuration for every s3:// URL of the run
    try:
        device = distributed.init(env, cfg.run.device, always_group=cfg.engine.backend == 'deepspeed',
                                  timeout_s=cfg.engine.timeout_min * 60)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_layout(cfg.train, env.world_size)
    run_dir = prepare_run_dir(cfg) if env.rank == 0 else cfg.run_dir
    if env.rank == 0 and cfg.task not in ('train', 'default'):
        record_invocation(cfg)                             # training records once its resume check passed (distil)
    log.info(f'task={cfg.task} run_dir={run_dir} device={device} world_size={env.world_size}')
    t0 = time.time()
    if cfg.task == 'pretrain':
        get_teacher(cfg, device, retrain=True)
        return None
    if cfg.task == 'bench':
        run_bench(cfg, device, env)
        return None
    if cfg.task == 'generate':
        log.info(f'images in {run_generate(cfg, device, env, noise_range(cfg))}')
        return None
    real = real_model(cfg)
    evaluate_real = lambda get_teacher_: evaluate_features(cfg, device, env, should_stop, get_teacher_,
                                                           noise_range(cfg), make_logger(cfg, 'eval', env.rank))
    if cfg.task == 'eval' and real:
        return evaluate_real(lambda: get_teacher(cfg, device))
    teacher = get_teacher(cfg, device)
    if cfg.task in ('train', 'default'):
        snapshot = Snapshots(cfg, device, env, real) if cfg.eval.every_kimg > 0 else None
        G = distil(cfg, teacher, device, env, should_stop, snapshot)
    else:
        G = None
    distributed.barrier()                                  # rank 0 has written generator.pt
    if distributed.any_rank(should_stop()):                # agreed: no rank goes on to evaluate alone
        return None
    rows = None
    if cfg.task != 'train' and real:                       # task=default: distil, then FID / FD-DINOv2
        rows = evaluate_real(lambda: teacher)
    elif cfg.task != 'train':
        G = G if G is not None else load_snapshot(run_dir / 'generator.pt')[0].to(device)
        rows = evaluate_toy(cfg, denoiser(cfg, teacher), G, device, env)
        if env.rank == 0:
            print(format_table(rows, TOY_METRICS))
            log.info(f'results in {run_dir / "eval.json"}, samples in {run_dir / "samples.png"}')
    log.info(f'done in {time.time() - t0:.0f} s')
    return rows

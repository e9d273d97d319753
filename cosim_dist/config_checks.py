"""Validation of the configuration, in one place: the allowed choices, value ranges, the model.net keys of every
architecture, required values and cross-field rules. Every problem is collected and reported together, one line each,
before any work starts (also before a Slurm submission). The schema itself is config.py."""

import os
from typing import Any

from .storage import missing_local

TASKS = ('default', 'pretrain', 'train', 'eval', 'generate', 'bench')
ARCHS = ('toy', 'songunet', 'dhariwalunet', 'edm2')        # model.arch: the networks of cosim_dist.nets.ARCHS
# model.net keys each architecture accepts (tests/test_config.py holds them against the networks' constructors).
_UNET = ('model_channels', 'channel_mult', 'num_blocks', 'dropout')
_EDM = _UNET + ('augment_dim', 'channel_mult_emb', 'attn_resolutions')
NET_KWARGS = {'toy': _UNET, 'songunet': _EDM, 'dhariwalunet': _EDM,
              'edm2': _UNET + ('channel_mult_noise', 'channel_mult_emb', 'attn_resolutions', 'label_balance',
                               'concat_balance', 'logvar_channels', 'channels_per_head', 'res_balance',
                               'attn_balance', 'clip_act')}

class ConfigError(ValueError):
    """Bad configuration values or keys: one line per problem, each naming the key (or file) and the fix."""

    def __init__(self, *problems: str) -> None:
        super().__init__('\n'.join(problems))
        self.problems = list(problems)

#----------------------------------------------------------------------------
# Choices (key -> allowed values), ranges and rules, checked after merging.

CHOICES = {
    'task': TASKS,
    'model.arch': ARCHS,
    'run.device': ('auto', 'cpu', 'cuda'),
    'aux.t_embed': ('gated', 'sum'),
    'data.kind': ('gmm', 'shards'),
    'logging.wandb': ('offline', 'online', 'disabled'),
    'engine.backend': ('torch', 'deepspeed'),
    'engine.zero_stage': (0, 1, 2, 3),
    'engine.precision': ('fp32', 'bf16'),
    'teacher.kind': ('network', 'exact'),
    'pretrain.target': ('data', 'exact'),
    'schedule.kind': ('rho', 'sigma', 'logsigma'),          # cosim.T1_KINDS (tests/test_config.py holds them equal)
    'engine.compile': ('none', 'default', 'reduce-overhead', 'max-autotune'),
    'teacher.precision': ('auto', 'bf16', 'fp32'),
    'teacher.offload': ('none', 'cpu'),
}

def batch_layout(train: Any, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation rounds) with batch = micro-batch x world size x rounds."""
    batch_gpu = train.batch_gpu or train.batch // world_size
    if batch_gpu < 1 or train.batch % (batch_gpu * world_size):
        raise ConfigError(f'train.batch={train.batch} must be a multiple of '
                          f'train.batch_gpu={train.batch_gpu or batch_gpu} x world size {world_size}; '
                          f'change one of the three numbers')
    return batch_gpu, train.batch // (batch_gpu * world_size)

def lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split('.'):
        cfg = getattr(cfg, part)
    return cfg

def validate(cfg: Any) -> None:
    """Check choices, ranges, architecture keys and cross-field constraints; raise one ConfigError listing every
    problem, one line each. (Batch / micro-batch / world size and `readiness` are checked at launch.)"""
    problems: list[str] = []
    problem = problems.append
    for key, allowed in CHOICES.items():
        if lookup(cfg, key) not in allowed:
            problem(f'{key}={lookup(cfg, key)!r} is invalid; valid choices: {", ".join(map(str, allowed))}')
    unknown = sorted(set(cfg.model.net) - set(NET_KWARGS.get(cfg.model.arch, cfg.model.net)))
    if unknown:
        problem(f'model.net.{unknown[0]}' + (f' (and {", ".join(unknown[1:])})' if unknown[1:] else '')
                + f' is not an argument of model.arch={cfg.model.arch}; valid keys: '
                + ', '.join(NET_KWARGS[cfg.model.arch]))
    for keys, ok, rule in ((('train.lr_g', 'train.lr_aux', 'train.eps', 'pretrain.lr', 'pretrain.kimg',
                             'model.sigma_data', 'model.resolution', 'model.channels', 'schedule.sigma_min',
                             'schedule.rho', 'schedule.ratio', 'checkpoint.keep', 'train.batch', 'train.kimg',
                             'pretrain.batch', 'eval.num_samples', 'eval.batch', 'eval.heun_steps',
                             'train.aux_steps_per_gen', 'eval.chunk', 'eval.decode_batch',
                             'data.gmm.noise_std', 'generate.steps', 'eval.quick_samples', 'engine.timeout_min',
                             'checkpoint.stop_budget_s'),
                            lambda v: v > 0, '> 0'),
                           (('data.gmm.classes', 'data.gmm.components', 'data.gmm.rank'), lambda v: v >= 1, '>= 1'),
                           (('train.beta1', 'train.beta2', 'schedule.r_lo'), lambda v: 0 <= v < 1, 'in [0, 1)'),
                           (('train.ema_halflife_kimg', 'data.num_workers', 'model.label_dim', 'eval.every_kimg',
                             'train.aux_warmup_kimg'),
                            lambda v: v >= 0, '>= 0')):
        # values that would otherwise fail late (Adam, networks) or silently (EMA, retention)
        for key in keys:
            if not ok(lookup(cfg, key)):
                problem(f'{key}={lookup(cfg, key)} must be {rule}')
    if cfg.schedule.sigma_max <= cfg.schedule.sigma_min:
        problem(f'schedule.sigma_max={cfg.schedule.sigma_max} must exceed '
                f'schedule.sigma_min={cfg.schedule.sigma_min}')
    if cfg.schedule.ratio_mix is not None and cfg.schedule.ratio_mix <= 0:
        problem(f'schedule.ratio_mix={cfg.schedule.ratio_mix} must be > 0 (or null: one R)')
    if not 0 <= cfg.schedule.mix_p <= 1:
        problem(f'schedule.mix_p={cfg.schedule.mix_p} must be in [0, 1] (the share of pairs drawn with ratio_mix)')
    if cfg.train.aux_warmup_kimg >= cfg.train.kimg:
        problem(f'train.aux_warmup_kimg={cfg.train.aux_warmup_kimg} must be below train.kimg={cfg.train.kimg} (the '
                f'warm-up is part of the run: auxiliary steps only, then the generator trains)')
    if any(k < 1 for k in cfg.eval.steps):
        problem(f'eval.steps={cfg.eval.steps}: every sampler step count K must be >= 1')
    for key, allowed in (('eval.samplers', ('heun', 'dpm', 'cosim')), ('eval.metrics', ('inception', 'dinov2'))):
        values = lookup(cfg, key)
        if not values or any(v not in allowed for v in values):
            problem(f'{key}={values} is invalid; give a non-empty list of: {", ".join(allowed)}')
    if cfg.loss.lmbda < 0:
        problem(f'loss.lmbda={cfg.loss.lmbda} must be >= 0')
    if not 0 < cfg.kernel.eta <= 1:
        problem(f'kernel.eta={cfg.kernel.eta} must lie in (0, 1]')
    if cfg.engine.compile != 'none' and (cfg.engine.zero_stage == 3 or cfg.teacher.offload == 'cpu'):
        problem(f'engine.compile={cfg.engine.compile} does not combine with ZeRO-3 parameter partitioning '
                f'(engine.zero_stage=3 or teacher.offload=cpu): use engine.compile=none or ZeRO stage <= 2')
    if cfg.teacher.kind == 'exact' and (cfg.data.kind != 'gmm' or cfg.model.teacher is not None):
        problem('teacher.kind=exact is the toy world\'s closed-form denoiser: it needs data=gmm (data.kind=gmm) and '
                'no model.teacher; use teacher.kind=network for a real teacher')
    if cfg.pretrain.spread != 1 and (cfg.pretrain.target != 'exact' or cfg.pretrain.spread <= 0):
        problem(f'pretrain.spread={cfg.pretrain.spread} needs pretrain.target=exact and a value > 0 (a widened sample '
                f'has no clean target of its own)')
    if cfg.pretrain.target == 'exact' and cfg.data.kind != 'gmm':
        problem('pretrain.target=exact regresses onto the toy world\'s closed-form denoiser: it needs data=gmm; real '
                'data trains on its samples (pretrain.target=data)')
    e = cfg.engine
    if e.bf16_weights and (e.backend != 'deepspeed' or e.zero_stage == 0 or e.precision != 'bf16'):
        problem(f'engine.bf16_weights=true keeps bf16 weights beside fp32 master weights in DeepSpeed ZeRO 1-3 under '
                f'bf16 autocast, but engine.backend={e.backend}, engine.zero_stage={e.zero_stage}, '
                f'engine.precision={e.precision}: set engine.backend=deepspeed engine.zero_stage=1..3 '
                f'engine.precision=bf16, or engine.bf16_weights=null')
    if cfg.teacher.offload == 'cpu' and cfg.engine.backend != 'deepspeed':
        problem('teacher.offload=cpu runs the teacher as a DeepSpeed ZeRO-3 engine: set engine.backend=deepspeed')
    problems += generate_problems(cfg.generate, cfg.model.label_dim) + cfg.storage.problems()
    if cfg.data.kind == 'shards' and not cfg.data.path and cfg.task not in ('bench', 'eval', 'generate'):  # no data
        problem('data.kind=shards needs data.path=<shard directory or s3:// prefix>')
    if problems:
        raise ConfigError(*problems)

def parse_seeds(text: str) -> list[int]:
    """generate.seeds: comma-separated numbers and inclusive ranges ('0-63', '0,5,10-19') -> the seeds in order."""
    parts = [p.partition('-') for p in str(text).replace(' ', '').split(',')]
    if not all(lo.isdigit() and (hi.isdigit() and int(hi) >= int(lo) if dash else not hi) for lo, dash, hi in parts):
        raise ConfigError(f'generate.seeds={text!r} cannot be parsed: give numbers and ranges A-B (A <= B) separated '
                          f'by commas, e.g. generate.seeds=0-63 or generate.seeds=\'0,5,10-19\'')
    return [s for lo, _, hi in parts for s in range(int(lo), int(hi or lo) + 1)]

def generate_problems(g: Any, label_dim: int) -> list[str]:
    """The generate.* keys: parsable seeds, classes within model.label_dim, a grid of generate.steps levels."""
    problems = []
    try:
        parse_seeds(g.seeds)
    except ConfigError as e:
        problems += e.problems
    if g.classes is not None and not (g.classes and all(0 <= c < label_dim for c in g.classes)):
        problems.append(f'generate.classes={g.classes} must be a non-empty list of classes in [0, {label_dim}) '
                        f'(model.label_dim), or null for each seed\'s own label')
    if g.grid is not None and not (len(g.grid) == g.steps and min(g.grid) > 0 and sorted(set(g.grid))[::-1] == g.grid):
        problems.append(f'generate.grid={g.grid} must hold generate.steps={g.steps} positive, strictly decreasing '
                        f'noise levels tau_K > ... > tau_1, or be null for the generator\'s stored grid')
    if not (g.png or g.npz):
        problems.append('generate.png=false and generate.npz=false would write nothing: enable one of them')
    return problems

def required_inputs(cfg: Any) -> dict[str, str]:
    """The input files a launch reads, {config key: what it is} (the key's value may still be unset)."""
    e = cfg.eval
    teacher_used = cfg.task in ('train', 'default') or (cfg.task == 'eval' and {'heun', 'dpm'} & set(e.samplers))
    needed = {'model.teacher': f'the official checkpoint of model.arch={cfg.model.arch}'} \
        if teacher_used and (cfg.model.arch != 'toy' or cfg.model.teacher is not None) else {}
    snapshots = cfg.task == 'train' and e.every_kimg > 0      # their quick FD uses the first metric only
    if (cfg.task in ('eval', 'default') or snapshots) and real_model(cfg):
        needed['eval.ref'] = 'reference statistics (EDM2 dataset-refs/*.pkl or cosim-ref-stats)'
        needed |= {f'eval.{m}_weights': f'the {m} weights file' for m in (e.metrics[:1] if snapshots else e.metrics)}
        if cfg.model.latent_raw_mean is not None:
            needed['eval.vae'] = 'a local diffusers AutoencoderKL directory (stabilityai/sd-vae-ft-mse)'
    if cfg.task == 'eval' and 'cosim' in e.samplers and e.generator is not None:
        needed['eval.generator'] = 'the distilled generator'
    return needed

def reads_data(cfg: Any) -> bool:
    return cfg.data.kind == 'shards' and cfg.task not in ('bench', 'eval', 'generate')

def readiness(cfg: Any) -> list[str]:
    """What a launch needs beyond valid values: every required input set and every local file present (objects in a
    store: `store_readiness`). Checked by launch.py before any work starts and before a Slurm submission."""
    problems = []
    for key, what in required_inputs(cfg).items():
        value = lookup(cfg, key)
        if value is None:
            problems.append(f'{key} is required for task={cfg.task}: set it to {what}')
        elif missing_local(value):
            problems.append(f'{key}={value} does not exist: download or copy {what} there, or fix the path')
    if reads_data(cfg) and cfg.data.path and missing_local(cfg.data.path):
        problems.append(f'data.path={cfg.data.path} does not exist: build the shards with cosim-make-shards')
    if cfg.logging.wandb == 'online' and not wandb_logged_in():
        problems.append('logging.wandb=online needs a wandb login: run `wandb login` (or set WANDB_API_KEY), '
                        'or use logging.wandb=offline')
    return problems

def store_readiness(cfg: Any) -> list[str]:
    """The s3:// inputs present and the s3:// checkpoint store reachable, one problem per key (network calls: checked
    before a Slurm submission, so that a job never waits in the queue only to fail on a missing object)."""
    from .shards import MANIFEST
    from .storage import open_store, parse_url
    inside = {'eval.vae': 'config.json', 'data.path': MANIFEST}     # directories: the file that must be in them
    keys = [*required_inputs(cfg), *(['data.path'] if reads_data(cfg) else [])]
    checks = {k: f'{str(lookup(cfg, k)).rstrip("/")}/{inside[k]}' if k in inside else lookup(cfg, k) for k in keys
              if lookup(cfg, k) is not None}
    problems = []
    for key, url in checks.items():
        if parse_url(url)[0] != 's3':
            continue
        parent, _, name = str(url).rstrip('/').rpartition('/')
        try:
            if not open_store(parent).exists(name):
                problems.append(f'{key}={lookup(cfg, key)} does not exist ({url} not found): upload it or fix the URL')
        except Exception as e:   # botocore: no endpoint, no credentials, access denied, no such bucket
            problems.append(f'{key}={lookup(cfg, key)} cannot be read: {unreachable(e)}')
    if cfg.checkpoint.url and parse_url(cfg.checkpoint.url)[0] == 's3':
        try:
            open_store(cfg.checkpoint.url).list('latest')
        except Exception as e:
            problems.append(f'checkpoint.url={cfg.checkpoint.url} cannot be listed: {unreachable(e)}')
    return problems

def unreachable(e: Exception) -> str:
    return (f'{type(e).__name__}: {e}; check the bucket name, storage.endpoint_url and the credentials '
            f'(AWS_* variables or storage.profile)')

def wandb_logged_in() -> bool:
    """Whether wandb has credentials (WANDB_API_KEY, netrc or its settings): no prompt, no network."""
    os.environ.setdefault('WANDB_SILENT', 'true')
    import wandb
    return bool(wandb.login(prompt=False, verify=False))

def real_model(cfg: Any) -> bool:
    """Real models (an official teacher, a non-toy network or real data) are evaluated with FID / FD-DINOv2;
    the toy world against its exact moments."""
    return cfg.model.teacher is not None or cfg.model.arch != 'toy' or cfg.data.kind != 'gmm'

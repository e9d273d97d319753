"""Typed configuration: dataclass schema, omegaconf groups (`model=toy data=gmm`), dotted overrides,
validation that names the offending key and the valid choices, and the resolved-YAML dump.

This module is the one home of every key (its default and its one-line meaning); config_checks.py validates them, once.
Neither imports torch, so parsing arguments (`cosim-launch --help`, `--dry-run`, Slurm submission) stays fast."""

import dataclasses
import difflib
import hashlib
import json
import pathlib
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .config_checks import ARCHS, TASKS, ConfigError, batch_layout, lookup, parse_seeds, readiness, validate  # noqa: F401 (re-exported)
from .storage import StorageConfig

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'   # package data: shipped in the wheel
DEFAULT_GROUPS = {'model': 'toy', 'data': 'gmm'}

def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob('*.yaml'))

#----------------------------------------------------------------------------
# Schema. Every field carries a one-line comment; group YAMLs under cosim_dist/configs/ override these defaults.

@dataclasses.dataclass
class RunConfig:
    name: str | None = None          # run name; the run lives in <root>/<name> (default: <model>-<data>)
    root: str = 'runs'               # directory that holds all run directories
    seed: int = 0                    # global seed (data order, noise, initialisation)
    device: str = 'auto'             # auto | cpu | cuda
    overrides: list[str] = dataclasses.field(default_factory=list)  # this invocation's arguments (set by load_config)

@dataclasses.dataclass
class ModelConfig:
    arch: str = 'toy'                # network architecture: toy | songunet | dhariwalunet | edm2
    teacher: str | None = None       # teacher checkpoint path or URL; null = pretrain the toy teacher
    resolution: int = 16             # image (or latent) resolution
    channels: int = 3                # image (or latent) channels
    label_dim: int = 10              # number of classes (0 = unconditional)
    sigma_data: float = 0.5          # EDM sigma_data
    latent_raw_mean: list[float] | None = None  # latent models: per-channel mean of the VAE latents (EDM2 convention)
    latent_raw_std: list[float] | None = None   # latent models: per-channel std; network space = (x - mean) * 0.5 / std
    # architecture kwargs
    net: dict[str, Any] = dataclasses.field(default_factory=lambda: {'model_channels': 32, 'channel_mult': [1, 2]})

@dataclasses.dataclass
class AuxConfig:
    t_embed: str = 'gated'           # second noise embedding for sigma_t: gated | sum

@dataclasses.dataclass
class GMMConfig:
    classes: int = 10                # toy classes (labels 0..classes-1; must equal model.label_dim)
    components: int = 3              # Gaussian components per class
    rank: int = 4                    # rank of each component's structured variation
    template_std: float = 0.35       # std of the smooth class templates (pixels live in about [-1, 1])
    offset_std: float = 0.2          # std of each component's offset from its class template
    variation_std: float = 0.25      # scale of the low-rank variation
    noise_std: float = 0.03          # isotropic std that keeps every covariance full rank
    seed: int = 0                    # seed of the world itself (templates, bases)

@dataclasses.dataclass
class DataConfig:
    kind: str = 'gmm'                # gmm (exact toy world) | shards (WebDataset shards)
    path: str | None = None          # shard directory or s3:// prefix (kind=shards)
    num_workers: int = 0             # data loader worker processes per rank
    gmm: GMMConfig = dataclasses.field(default_factory=GMMConfig)

@dataclasses.dataclass
class ScheduleConfig:
    # Eq. T1's reading of the gap (under study, docs/ALGORITHM.md "Choices"): rho (r_s = r_t (1 - g) in rho-space)
    # | sigma (sigma_s = sigma_t (1 - g)) | logsigma (log sigma_s = log sigma_t - g (log sigma_t - log sigma_min)).
    # sigma for the published teachers: at the paper's R it is the only reading that does not collapse the toy's modes
    # (docs/benchmarks.md, T1 study, full-grid slice); the toy keeps rho at its small R (configs/model/toy.yaml).
    kind: str = 'sigma'
    ratio: float = 4.0               # R of Eq. T1 (gap fraction ~ Beta(R, 1)): larger values favour large gaps t - s
    ratio_mix: float | None = None   # optional second R: a pair's gap is drawn from Beta(ratio_mix, 1) with probability
    mix_p: float = 0.5               # mix_p, else from Beta(ratio, 1) (short and long jumps in one run; under study)
    r_lo: float = 0.0                # r_t ~ U(r_lo, 1) in rho-space
    sigma_s_max: float | None = None # optional cap on sigma_s
    gen_sigma_s_min: float | None = None  # optional floor on sigma_s in the generator step (Eq. G1) only
    sigma_min: float = 0.002         # smallest noise level
    sigma_max: float = 80.0          # largest noise level
    rho: float = 7.0                 # rho of the EDM grid

@dataclasses.dataclass
class KernelConfig:
    eta: float = 1.0                 # Eq. K1 noise fraction (1 = fresh noise, the CoSIM kernel)

@dataclasses.dataclass
class LossConfig:
    lmbda: float = 1.0               # lambda of Eq. A1 (auxiliary regularisation strength)
    alpha: float | None = None       # Eq. G1 alpha override (default (1 + lambda) / 2)
    gen_scale: float = 100.0         # Eq. G1 loss scale of w_g (SiD's lsg)

@dataclasses.dataclass
class TrainConfig:
    kimg: float = 60.0               # distillation length in thousands of real images (per network step)
    batch: int = 64                  # global batch size
    batch_gpu: int | None = None     # micro-batch per rank (default: batch / world size)
    lr_g: float = 1e-4               # generator learning rate
    lr_aux: float = 1e-4             # auxiliary learning rate
    beta1: float = 0.0               # Adam beta1 (Table 5: 0)
    beta2: float = 0.999             # Adam beta2 (Table 5)
    eps: float = 1e-8                # Adam epsilon
    ema_halflife_kimg: float = 2.0   # generator EMA half-life in kimg
    ema_rampup: float | None = 0.05  # EMA ramp-up ratio (null = off)
    aux_steps_per_gen: int = 1       # auxiliary steps per generator step
    aux_warmup_kimg: float = 0.0     # images (within kimg) of auxiliary steps only at the start: D_psi fits Eq. A1's
                                     # target for the initial G before G moves (needed where D_psi(init) != D_phi)
    log_kimg: float = 4.0            # status line / scalar logging interval
    checkpoint_kimg: float = 20.0    # training-state checkpoint interval (0 = only at the end / on stop)

@dataclasses.dataclass
class CheckpointConfig:
    # file path, file:// or s3:// prefix for checkpoints (default: <run dir>/checkpoints)
    url: str | None = None
    # rank-local staging directory of a save (default: node-local $TMPDIR/cosim-dist-<user>/<run name>-<hash>, not the
    # run directory, which may be a shared filesystem); emptied after each upload
    staging: str | None = None
    keep: int = 2                    # committed checkpoints to retain
    async_upload: bool = True        # upload in a background thread while training continues
    # seconds a stop-save (after USR2 or SIGTERM) may take to commit; past it, rank 0 of a Slurm job requeues the job
    # anyway (the run resumes from the previous commit) rather than be killed at its time limit and not requeued.
    # Keep it below the launcher's --signal-delay-s and the partition's GraceTime
    stop_budget_s: float = 90.0

@dataclasses.dataclass
class EngineConfig:
    backend: str = 'torch'           # torch (one process, plain Adam) | deepspeed (ZeRO, any number of processes)
    zero_stage: int = 0              # DeepSpeed ZeRO stage 0-3 (generator and auxiliary)
    precision: str = 'fp32'          # fp32 | bf16 (autocast for G and aux; master weights stay fp32)
    # with precision=bf16 under DeepSpeed ZeRO 1-3: G's and aux's module weights in bf16 (the fp32 master weights in
    # the optimiser), so parameter all-gathers move half the bytes; gradient reductions stay fp32 (engines.py).
    # null (auto: under ZeRO-3, where gathers are most of the bytes) | true | false (docs/benchmarks.md: the cost is
    # bf16 gradients for biases and norm gains too)
    bf16_weights: bool | None = None
    # torch.compile mode for G, aux and teacher: none | default | reduce-overhead (CUDA graphs) | max-autotune
    compile: str = 'none'
    channels_last: bool = False      # NHWC memory format for the networks (faster bf16 convolutions on GPUs)
    checkpointing: bool = False      # activation checkpointing of every residual block of G and aux (memory option)
    timeout_min: float = 30.0        # a collective (NCCL / gloo) that waits longer for a peer fails on this rank, and
                                     # the job with it: a hung or dead rank ends the run instead of holding the nodes

@dataclasses.dataclass
class TeacherConfig:
    # network: the teacher network is D_phi (model.teacher, or the learned toy teacher) | exact (toy world only): the
    # closed-form GMM denoiser E[x0 | x_sigma, c] is D_phi in Eqs. A1 and G1 and in the Heun / DPM baselines, while G
    # and the auxiliary still start from the learned toy teacher's weights (teacher error apart from the algorithm's)
    kind: str = 'network'
    precision: str = 'auto'          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    offload: str = 'none'            # none | cpu (ZeRO-3 inference engine with parameters in host memory)

@dataclasses.dataclass
class PretrainConfig:
    kimg: float = 300.0              # toy teacher training length in kimg
    batch: int = 256                 # batch size
    lr: float = 2e-3                 # Adam learning rate (cosine-decayed to 0)
    p_mean: float = -1.0             # ln sigma ~ N(p_mean, p_std^2) (EDM training noise)
    p_std: float = 1.4               # std of ln sigma
    ema_halflife_kimg: float = 10.0  # teacher EMA half-life in kimg
    # regression target: data = the clean sample x0 (EDM denoising score matching) | exact = the toy world's
    # closed-form E[x0 | x_sigma, c] (the same minimiser without the target's noise: a teacher fitted to the exact
    # denoiser, so that teacher.kind=exact runs start G and the auxiliary from a network close to their D_phi)
    target: str = 'data'
    # with target=exact: each clean sample's offset inside its component's subspace is scaled by `spread` before the
    # noise is added (spread > 1 trains the teacher off the data, where a generator's errors land; the target stays
    # the true world's E[x0 | x_sigma, c])
    spread: float = 1.0

@dataclasses.dataclass
class EvalConfig:
    num_samples: int = 10000         # samples per sampler for the Frechet distance
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])  # CoSIM sampler step counts K
    heun_steps: int = 18             # teacher Heun steps N (NFE = 2N - 1)
    grid_scale: float = 1.0          # scale of the interior sampler grid points (Eq. S1)
    tune_grid: bool = False          # greedy search of the interior grid points on tune_samples seeds first
    tune_samples: int = 2000         # seeds used by the grid search (disjoint from the evaluation seeds)
    dpm_nfe: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8])  # DPM-Solver++(2M) baselines (NFE)
    batch: int = 1000                # generation batch
    seed: int = 0                    # first sample seed (sample i uses seed + i)
    # training snapshots: every every_kimg the generator EMA (<run dir>/snapshots/), a quick Frechet distance at each
    # K of eval.steps on quick_samples seeds (metrics.jsonl; real models: the first of eval.metrics against eval.ref)
    # and progress.png; 0 = off
    every_kimg: float = 0.0
    quick_samples: int = 2000        # seeds of a snapshot's quick Frechet distance (the first of the evaluation's)
    # Real models (model.teacher set or a non-toy arch): FID / FD-DINOv2 against reference statistics (eval/real.py).
    # rows: heun | dpm | cosim
    samplers: list[str] = dataclasses.field(default_factory=lambda: ['heun', 'dpm', 'cosim'])
    # distilled generator file (snapshot, export dir, s3://); default <run dir>/generator.pt
    generator: str | None = None
    metrics: list[str] = dataclasses.field(default_factory=lambda: ['inception', 'dinov2'])  # feature extractors
    inception_weights: str | None = None  # weights-inception-2015-12-05-6726825d.pth (torch-fidelity release)
    dinov2_weights: str | None = None     # dinov2_vitl14_pretrain.pth (facebookresearch/dinov2 release)
    ref: str | None = None           # reference statistics: EDM2 .pkl (fid, fd_dinov2) or EDM .npz (fid)
    # latent models: local diffusers AutoencoderKL directory (stabilityai/sd-vae-ft-mse)
    vae: str | None = None
    decode_batch: int = 8            # latents per VAE decoder call
    chunk: int = 1000                # seeds per resumable chunk (per-rank sums are committed after each)
    png_dir: str | None = None       # also write <png_dir>/<sampler>/<seed // 1000 * 1000>/<seed>.png

@dataclasses.dataclass
class GenerateConfig:
    generator: str | None = None     # snapshot, export, s3:// or checkpoint step dir (EMA); default <run>/generator.pt
    seeds: str = '0-63'              # seeds, one image each: ranges and numbers, comma-separated ('0-63', '0,5,10-19')
    classes: list[int] | None = None # class of the i-th seed: classes[i % len]; null = each seed's own random label
    steps: int = 1                   # sampler steps K (Eq. S1)
    grid: list[float] | None = None  # tau_K > ... > tau_1; null = the grid stored with the generator, else the default
    out: str | None = None           # output directory (default <run dir>/generated)
    png: bool = True                 # write <out>/<seed // 1000 * 1000>/<seed>.png (eval.png_dir's layout)
    npz: bool = False                # write <out>/images.npz: images (uint8, N x H x W x C), labels, seeds

@dataclasses.dataclass
class BenchConfig:
    warmup: int = 3                  # task=bench: untimed iterations first (allocator, autotuning, torch.compile)
    iters: int = 10                  # timed iterations
    peak_size: int = 8192            # matrix size of the matmul peak measurement (CPU: capped at 2048)

@dataclasses.dataclass
class LoggingConfig:
    wandb: str = 'offline'           # offline | online | disabled
    project: str = 'cosim-dist'      # wandb project
    progress: bool = True            # show progress bars

@dataclasses.dataclass
class Config:
    # default (pretrain toy if needed, distil, evaluate) | pretrain | train | eval | generate | bench
    task: str = 'default'
    groups: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_GROUPS))  # selected groups
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    aux: AuxConfig = dataclasses.field(default_factory=AuxConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    kernel: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # S3 settings of every s3:// URL (data.path, model.teacher, checkpoint.url, eval files): storage.StorageConfig
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.run.root) / self.run.name

#----------------------------------------------------------------------------
# Loading: schema defaults <- group files <- dotted overrides.

def _unknown_key_error(key: str, node: Any) -> ConfigError:
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    hint = difflib.get_close_matches(key.split('.')[-1], valid, n=1)
    return ConfigError(f'unknown config key {key!r}' + (f' (did you mean {hint[0]!r}?)' if hint else '')
                       + (f'; valid keys here: {", ".join(valid)}' if valid else ''))

def _parent(cfg: DictConfig, dotted: str) -> Any:
    node = cfg
    for part in dotted.split('.')[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return node
        node = node[part]
    return node

def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        err = _unknown_key_error(key, _parent(base, key))
        raise ConfigError(f'{source}: {err}') from None
    except OmegaConfBaseException as e:
        key = e.full_key
        if isinstance(OmegaConf.select(base, key), ListConfig):
            raise ConfigError(f'{source}: {key} takes a list, e.g. {key}=[1,2]') from None
        raise ConfigError(f'{source}: bad value for {key!r}: {e.msg.splitlines()[0]}') from None

def _dotlist(item: str) -> DictConfig:
    """One `key=value` override; a value that is not YAML (an unbalanced bracket, a stray quote) is a ConfigError."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        raise ConfigError(f'override {item!r} is not valid YAML ({getattr(e, "problem", None) or e}): '
                          f'close the bracket or quote the value') from None

def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `group=name` selections from dotted `key=value` overrides."""
    groups, dotlist = {}, []
    group_names = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    for arg in args:
        if '=' not in arg:
            raise ConfigError(f'cannot parse argument {arg!r}: expected group=name or key=value')
        key, value = arg.split('=', 1)
        if key in group_names:
            groups[key] = value
        else:
            dotlist.append(arg)
    return groups, dotlist

def load_group(group: str, name: str,
               chain: tuple[str, ...] = ()) -> tuple[list[tuple[str, DictConfig]], dict[str, str]]:
    """The fragments of cosim_dist/configs/<group>/<name>.yaml in merge order, with the group defaults it declares.
    A fragment may say `extends: <other name in the group>` (merged first) and `defaults: {group: name}` (groups
    selected when the command line does not select them)."""
    path = CONFIG_DIR / group / f'{name}.yaml'
    if not path.is_file():
        raise ConfigError(f'{group}={name!r} is not a known {group} config; valid choices: '
                          f'{", ".join(group_choices(group))}')
    if name in chain:
        raise ConfigError(f'{path}: `extends` forms a cycle: {" -> ".join(chain + (name,))}')
    node = OmegaConf.load(path)
    parent, defaults = node.pop('extends', None), dict(node.pop('defaults', None) or {})
    fragments: list[tuple[str, DictConfig]] = []
    if parent is not None:
        fragments, inherited = load_group(group, str(parent), chain + (name,))
        defaults = {**inherited, **defaults}
    return fragments + [(str(path.relative_to(CONFIG_DIR.parent)), node)], defaults

def load_config(args: list[str] = (), ready: bool = False) -> Config:
    """Resolve a Config from command-line style arguments (`model=toy train.kimg=50`). Every problem is reported
    together in one ConfigError; with `ready` (cosim-launch) also every missing required value or local file."""
    selected, dotlist = parse_overrides(list(args))
    groups, problems = {**DEFAULT_GROUPS, **selected}, []
    cfg = OmegaConf.structured(Config)
    for group in list(groups):          # model first: its `defaults` may pick the data group
        try:
            fragments, defaults = load_group(group, groups[group])
            groups.update({g: n for g, n in defaults.items() if g not in selected and g != group})
            for source, node in fragments:
                cfg = _merge(cfg, node, source)
        except ConfigError as e:
            problems += e.problems
    cfg = _merge(cfg, OmegaConf.create({'groups': groups}), 'groups')
    for item in dotlist:                # every bad override is reported, the good ones still apply
        try:
            cfg = _merge(cfg, _dotlist(item), f'override {item!r}')
        except ConfigError as e:
            problems += e.problems
    obj: Config = OmegaConf.to_object(cfg)
    if obj.run.name is None:
        obj.run.name = '-'.join(groups.values())
    obj.run.overrides = list(args)
    if not any(p.startswith(tuple(f'{g}=' for g in groups)) for p in problems):   # else its values are noise
        try:
            validate(obj)
        except ConfigError as e:
            problems += e.problems
        problems += readiness(obj) if ready else []
    if problems:
        raise ConfigError(*problems)
    return obj

def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

def config_hash(section: Any) -> str:
    """Short stable hash of a config section (used to key caches and detect incompatible resumes)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

def save_config(cfg: Config, run_dir: pathlib.Path) -> pathlib.Path:
    """Write the resolved YAML to <run_dir>/config.yaml."""
    path = run_dir / 'config.yaml'
    path.write_text(to_yaml(cfg))
    return path

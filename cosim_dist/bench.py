"""`task=bench`: the full CoSIM iteration (Eq. L1: auxiliary step, generator step, EMA, optimisers) with random
weights and synthetic data on the available device. Prints images/s, milliseconds per phase, peak memory and the
model FLOP utilisation (FLOPs counted by torch's flop counter for one iteration, against this device's measured
matrix-multiply peak in the training precision). Results also go to <run dir>/bench.json."""

import collections
import contextlib
import json
import resource
import time
import weakref
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from .build import build_trainer, new_network
from .comm import CommMeter, StepShape, lower_bound
from .config import Config, batch_layout
from .distributed import DistEnv
from .logging import log

class SyntheticStream:
    """A BatchStream of fixed random images (N(0, sigma_data^2)) and uniform one-hot labels."""

    def __init__(self, shape: tuple[int, ...], label_dim: int, batch: int, sigma_data: float, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(batch, *shape, generator=gen) * sigma_data
        labels = torch.randint(max(label_dim, 1), (batch,), generator=gen)
        self.c = torch.nn.functional.one_hot(labels, label_dim).float() if label_dim else torch.zeros(batch, 0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x0, self.c

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

class PhaseTimer:
    """Wall time per phase, the device synchronised at both ends of every phase (so phases do not overlap); off
    (no synchronisation) until `enabled` is set. `current` names the phase being run (the CommMeter's phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.total, self.enabled, self.current = device, collections.defaultdict(float), False, 'other'

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        outer, self.current = self.current, phase
        try:
            if not self.enabled:
                yield
                return
            synchronize(self.device)
            t0 = time.perf_counter()
            yield
            synchronize(self.device)
            self.total[phase] += time.perf_counter() - t0
        finally:
            self.current = outer

def trained_params(module: torch.nn.Module) -> tuple[int, int]:
    """Parameters of a trained network (full sizes, also where ZeRO-3 keeps only a partition on this rank), and how
    many of them ZeRO-3 keeps whole on every rank (below its persistence threshold)."""
    params = list(module.parameters())
    return (sum(getattr(p, 'ds_numel', p.numel()) for p in params),
            sum(p.ds_numel for p in params if getattr(p, 'ds_persist', False)))

def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Measured dense matrix-multiply rate in FLOP/s (2 n^3 per product) for dtype on device."""
    size = size if device.type == 'cuda' else min(size, 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0)

class SavedTensorMeter:
    """Peak bytes of tensors autograd keeps for backward (activations; parameters excluded), device independent:
    storages are counted once while any tensor saved from them is alive."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.exclude and ptr not in self.live and t.device.type != 'meta':
            self.live[ptr] = t.untyped_storage().nbytes()
            self.current += self.live[ptr]
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __enter__(self) -> 'SavedTensorMeter':
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak, or the process's peak resident set on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, 'CUDA max allocated'
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 'process peak RSS'

def run_bench(cfg: Config, device: torch.device, env: DistEnv = DistEnv()) -> dict:
    """Collective: build the trainer around a random-weight teacher, time cfg.bench.iters iterations without and with
    per-phase synchronisation, count one iteration's FLOPs; rank 0 prints and writes bench.json."""
    b, m = cfg.bench, cfg.model
    torch.manual_seed(cfg.run.seed)
    teacher = new_network(cfg).to(device)
    batch_gpu, rounds = batch_layout(cfg.train, env.world_size)
    data = SyntheticStream((m.channels, m.resolution, m.resolution), m.label_dim, batch_gpu, m.sigma_data, cfg.run.seed)
    timer = PhaseTimer(device)
    trainer = build_trainer(cfg, teacher, device, env, data=data, checkpoints=False, timer=timer)
    for _ in range(b.warmup):
        trainer.iteration()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(b.iters):
        trainer.iteration()
    synchronize(device)
    seconds = (time.perf_counter() - t0) / b.iters
    timer.enabled = True
    for _ in range(b.iters):
        trainer.iteration()
    timer.enabled = False
    with CommMeter(phase=lambda: timer.current) as comm:
        trainer.iteration()
    (params_g, persistent_g), (params_aux, persistent_aux) = map(trained_params, (trainer.g.module, trainer.aux.module))
    shape = StepShape(params_g=params_g, params_aux=params_aux, world=env.world_size, rounds=rounds,
                      aux_steps=cfg.train.aux_steps_per_gen, persistent_g=persistent_g, persistent_aux=persistent_aux,
                      param_bytes=next(trainer.g.module.parameters()).element_size())   # 2 with bf16 weights
    bound = lower_bound(cfg.engine.zero_stage, shape) if env.world_size > 1 else {'total': 0}
    params = [p for net in (trainer.g.module, trainer.aux.module, trainer.teacher) for p in net.parameters()]
    with (FlopCounterMode(display=False) as counter, SavedTensorMeter(params) as saved,
          torch.compiler.set_stance('force_eager')):
        trainer.iteration()                              # eager, so compiled kernels are counted too
    flops = counter.get_total_flops() * env.world_size     # every rank runs its slice of the global batch
    dtype = torch.bfloat16 if cfg.engine.precision == 'bf16' else torch.float32
    peak = matmul_peak(device, dtype, b.peak_size) * env.world_size
    memory, memory_kind = peak_memory(device)
    result = {
        'model': cfg.groups.get('model'),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'world_size': env.world_size, 'batch': cfg.train.batch, 'batch_gpu': batch_gpu, 'rounds': rounds,
        'precision': cfg.engine.precision, 'teacher_precision': cfg.teacher.precision, 'compile': cfg.engine.compile,
        'channels_last': cfg.engine.channels_last, 'checkpointing': cfg.engine.checkpointing,
        'backend': cfg.engine.backend, 'zero_stage': cfg.engine.zero_stage,
        'images_per_s': cfg.train.batch / seconds, 'ms_per_iteration': seconds * 1e3,
        'ms_per_phase': {k: v / b.iters * 1e3 for k, v in timer.total.items()},
        'gflop_per_iteration': flops / 1e9, 'gflop_per_image': flops / cfg.train.batch / 1e9,
        'matmul_peak_tflops': peak / 1e12, 'mfu': flops / seconds / peak,
        'peak_memory_gib': memory, 'peak_memory_kind': memory_kind,
        'activation_gib_per_rank': saved.peak / 2 ** 30,
        'trained_params': {'generator': params_g, 'auxiliary': params_aux, 'generator_persistent': persistent_g,
                           'auxiliary_persistent': persistent_aux},
        'comm_bytes_per_iter': comm.total, 'comm_bytes_by_op': dict(comm.by_op),
        'comm_bytes_by_phase': dict(comm.by_phase), 'comm_calls_by_op': dict(comm.calls),
        'comm_bytes_lower_bound': bound['total'], 'comm_lower_bound_by_network': bound,
    }
    if env.rank == 0:
        print(format_result(result))
        (cfg.run_dir / 'bench.json').write_text(json.dumps(result, indent=2))
        log.info(f'benchmark written to {cfg.run_dir / "bench.json"}')
    return result

def format_result(r: dict) -> str:
    lines = [f'{r["model"]} on {r["device"]} x{r["world_size"]}: batch {r["batch"]} ({r["batch_gpu"]} per rank x '
             f'{r["rounds"]} rounds), {r["precision"]}, compile={r["compile"]}, channels_last={r["channels_last"]}, '
             f'checkpointing={r["checkpointing"]}, '
             + (f'deepspeed ZeRO-{r["zero_stage"]}' if r['backend'] == 'deepspeed' else 'torch engine'),
             f'  {r["images_per_s"]:.3g} images/s, {r["ms_per_iteration"]:.1f} ms/iteration, '
             f'{r["gflop_per_image"]:.1f} GFLOP/image, MFU {100 * r["mfu"]:.1f}% of a measured '
             f'{r["matmul_peak_tflops"]:.1f} TFLOP/s, peak memory {r["peak_memory_gib"]:.2f} GiB '
             f'({r["peak_memory_kind"]}), saved activations {r["activation_gib_per_rank"]:.2f} GiB per rank',
             '  phase (synchronised)            ms/iteration']
    lines += [f'  {k:<32} {v:10.2f}' for k, v in r['ms_per_phase'].items()]
    if r['world_size'] > 1:
        mib = lambda n: f'{n / 2 ** 20:.2f} MiB'
        lines.append(f'  collectives per rank per iteration: {mib(r["comm_bytes_per_iter"])} '
                     f'({r["comm_bytes_per_iter"] / max(r["comm_bytes_lower_bound"], 1):.2f}x the ZeRO-'
                     f'{r["zero_stage"]} lower bound {mib(r["comm_bytes_lower_bound"])}); by operation: '
                     + ', '.join(f'{k} {mib(v)}' for k, v in sorted(r['comm_bytes_by_op'].items())))
        lines += [f'    {k:<30} {mib(v):>12}' for k, v in sorted(r['comm_bytes_by_phase'].items())]
    return '\n'.join(lines)

"""Training engines (a network, its optimiser and the step around them) and the frozen teacher's placement.

Both engine kinds expose what the trainer uses: `module`, `backward(loss)` (scaled by 1 / accumulation
steps), `step()` (called after every micro-batch, applied at the accumulation boundary), `save(dir)`,
`load(dir) -> client state`, and `full_parameters()` (a context in which every parameter is materialised,
for the EMA under ZeRO-3). An optional `WeightConstraint` (EDM2's forced weight normalisation) is applied once at
construction and after every optimiser step, to the module's weights and to the optimiser's master copy.
`TorchEngine` is one process with plain Adam; `DeepSpeedEngine` wraps `deepspeed.initialize` with ZeRO stage 0-3.
Precision is autocast (fp32 master weights, see `autocast`)."""

import contextlib
import os
import pathlib

import torch

from .config import EngineConfig, TeacherConfig
from .nets import WeightConstraint, checkpoint_blocks

def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward passes, or nothing for fp32."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

def sanitize_gradients(module: torch.nn.Module) -> None:
    """Eq. L1: gradients are nan_to_num'ed; hooks run before any accumulation or ZeRO reduction."""
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5))

#----------------------------------------------------------------------------

def on_cuda(module: torch.nn.Module) -> bool:
    """Whether module's parameters live on a GPU (then Adam runs as one fused kernel)."""
    return next(module.parameters()).is_cuda

def prepare_network(net: torch.nn.Module, cfg: EngineConfig, trained: bool) -> torch.nn.Module:
    """The speed and memory options that act on the module itself: NHWC memory format and, for trained networks,
    activation checkpointing of every residual block. (torch.compile wraps the module after engine set-up.)"""
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.checkpointing and trained:
        checkpoint_blocks(net)
    return net

def compile_network(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile net's forward in place (engine.compile); 'reduce-overhead' also records CUDA graphs."""
    if mode != 'none':
        net.compile(mode=mode, dynamic=False)
    return net

@torch.no_grad()
def project_(constraint: WeightConstraint | None) -> None:
    """Apply a weight constraint to plain (unpartitioned) parameters in place."""
    for p in constraint.params if constraint else []:
        p.copy_(constraint.project(p.float()))

class TorchEngine:
    """One process: Adam on fp32 parameters, gradient accumulation over `accum` micro-batches."""

    def __init__(self, module: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, accum: int = 1,
                 constraint: WeightConstraint | None = None) -> None:
        self.module, self.accum, self.micro, self.constraint = module, accum, 0, constraint
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=betas, eps=eps, fused=on_cuda(module))
        sanitize_gradients(module)
        project_(constraint)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            project_(self.constraint)

    def full_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(self, directory: pathlib.Path, client_state: dict | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({'module': self.module.state_dict(), 'optimizer': self.optimizer.state_dict(),
                    'client_state': client_state or {}}, directory / 'engine.pt')

    def load(self, directory: pathlib.Path) -> dict:
        path = directory / 'engine.pt'
        if not path.is_file():
            raise FileNotFoundError(f'no engine state at {path} '
                                    '(was the checkpoint written by engine.backend=deepspeed?)')
        sd = torch.load(path, map_location='cpu', weights_only=True)
        self.module.load_state_dict(sd['module'])
        self.optimizer.load_state_dict(sd['optimizer'])
        return sd['client_state']

def saved_client_state(directory: pathlib.Path) -> dict:
    """The client state of an engine save of either backend, read without building an engine (DeepSpeed keeps it
    in the module-states file of model-parallel rank 0)."""
    for path in (directory / 'engine.pt', directory / 'state' / 'mp_rank_00_model_states.pt'):
        if path.is_file():
            state = torch.load(path, map_location='cpu', weights_only=True)
            return state['client_state'] if path.name == 'engine.pt' else state
    raise FileNotFoundError(f'{directory} holds no engine state (engine.pt or state/mp_rank_00_model_states.pt): '
                            f'pass a committed checkpoint step directory, <checkpoints>/step-<nimg>')

#----------------------------------------------------------------------------

def import_deepspeed():
    """Import DeepSpeed, selecting its CPU accelerator when no GPU is visible."""
    if not torch.cuda.is_available():
        os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    import deepspeed
    return deepspeed

def deepspeed_config(micro_batch: int, accum: int, world_size: int, zero_stage: int, optimizer: dict | None) -> dict:
    cfg = {
        'train_batch_size': micro_batch * accum * world_size,
        'train_micro_batch_size_per_gpu': micro_batch,
        'gradient_accumulation_steps': accum,
        'zero_optimization': {'stage': zero_stage},
        'gradient_clipping': 0.0,
        'steps_per_print': 2 ** 62,
    }
    if optimizer is not None:
        cfg['optimizer'] = optimizer
    return cfg

def _share_scalar_parameters(module: torch.nn.Module, zero_stage: int) -> None:
    """DeepSpeed's broadcasts view every parameter as bytes, which fails for 0-dim tensors (EDM2's gains, our t_gain).
    Under ZeRO-3 they become shape [1] (they broadcast identically; the EMA and exports keep the canonical shape);
    otherwise we broadcast them ourselves and mark them so that DeepSpeed skips them."""
    for p in module.parameters():
        if p.dim() == 0:
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(p.data, src=0)
            if zero_stage == 3:
                p.data = p.data.reshape(1)
            else:
                p.ds_optim_param = True

class DeepSpeedEngine:
    """A DeepSpeed engine with its own optimiser and config (one per trained network)."""

    def __init__(self, module: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, *, micro_batch: int,
                 accum: int, world_size: int, zero_stage: int, constraint: WeightConstraint | None = None) -> None:
        deepspeed = import_deepspeed()
        sanitize_gradients(module)
        _share_scalar_parameters(module, zero_stage)
        adam = {'type': 'AdamW', 'params': {'lr': lr, 'betas': list(betas), 'eps': eps, 'weight_decay': 0.0,
                                            'torch_adam': True, 'fused': on_cuda(module)}}
        self.zero_stage, self.constraint = zero_stage, constraint
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()],
                                               config=deepspeed_config(micro_batch, accum, world_size,
                                                                       zero_stage, adam))
        self._project()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self._project()

    @torch.no_grad()
    def _project(self) -> None:
        """The constraint on the module's weights and on ZeRO's fp32 master partitions (which would otherwise
        overwrite the module's at the next step). Under ZeRO-3 the parameters are gathered and rank 0's result
        re-partitioned."""
        if self.constraint is None:
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param
        params = self.constraint.params
        gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=0) if self.zero_stage == 3
                    else contextlib.nullcontext())
        with gathered:
            for p in params:
                value = self.constraint.project(p.data.float())
                if self.zero_stage > 0:
                    safe_set_full_fp32_param(p, value)
                p.data.copy_(value)

    def full_parameters(self) -> contextlib.AbstractContextManager:
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def save(self, directory: pathlib.Path, client_state: dict | None = None) -> None:
        """Collective: every rank must call it."""
        self.engine.save_checkpoint(str(directory), tag='state', client_state=client_state or {}, save_latest=False)

    def load(self, directory: pathlib.Path) -> dict:
        path, client = self.engine.load_checkpoint(str(directory), tag='state', load_module_strict=True,
                                                   load_optimizer_states=True)
        if path is None:   # DeepSpeed only warns when it finds nothing: a silent fresh start would lose the run
            raise RuntimeError(f'DeepSpeed loaded nothing from {directory}/state; the checkpoint is incomplete')
        return client

#----------------------------------------------------------------------------
# The frozen teacher: a low-precision module, or a ZeRO-3 inference engine offloaded to host memory.

def place_teacher(teacher: torch.nn.Module, cfg: TeacherConfig, device: torch.device,
                  world_size: int) -> torch.nn.Module:
    """Eval mode, no parameter gradients (inputs stay differentiable), in the configured precision and place."""
    precision = cfg.precision if cfg.precision != 'auto' else ('bf16' if device.type == 'cuda' else 'fp32')
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    teacher = teacher.eval().requires_grad_(False).to(dtype=dtype)
    if cfg.offload == 'none':
        return teacher.to(device)
    if cfg.offload != 'cpu':
        raise ValueError(f'teacher.offload={cfg.offload!r} is invalid; valid choices: none, cpu')
    deepspeed = import_deepspeed()
    ds = deepspeed_config(1, 1, world_size, 3, None)
    ds['zero_optimization'].update(offload_param={'device': 'cpu', 'pin_memory': device.type == 'cuda'})
    ds['bf16'] = {'enabled': precision == 'bf16'}
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    return engine.module.eval()

"""Training engines (a network, its optimiser and the step around them).

Both engine kinds expose what the trainer uses: `module`, `backward(loss)` (scaled by 1 / accumulation steps), `step()`
(called after every micro-batch, applied at the accumulation boundary), `local_parameters()` (this rank's elements of
every parameter: its ZeRO-3 partition, or all; the EMA follows them without a gather) with `gather_local` (collective:
the full tensor from every rank's elements) and the training state per parameter and kind, which elastic.py
stores independently of the world size: `get_full` (the full fp32 tensor), `state_range` (the elements this rank holds:
its ZeRO partition, or all) and `set_state` (those elements, on resume), `save_range` and `get_local` (the elements this
rank writes at save, read without a collective), `adam_step` / `set_adam_step`. An optional
`WeightConstraint` (EDM2's forced weight normalisation) is applied once at construction and after every optimiser step,
to the module's weights and to the optimiser's master copy. `TorchEngine` is one process with plain Adam;
`DeepSpeedEngine` (zero.py) wraps `deepspeed.initialize` with ZeRO stage 0-3. Precision is autocast (fp32 master
weights, see `autocast`; under ZeRO the module's own weights may be bf16, zero.py)."""

import contextlib

import torch

from .config import EngineConfig
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

#----------------------------------------------------------------------------
# The training state of an engine as full fp32 tensors: each parameter and its two Adam moments (elastic.py stores
# them independently of the world size), plus Adam's step count.

MOMENTS = ('exp_avg', 'exp_avg_sq')      # Adam's state per parameter (torch.optim.Adam / AdamW)

def state_specs(module: torch.nn.Module, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, canonical shape) of every state tensor of a trained module, in a fixed order."""
    return [(f'{prefix}/{name}/{kind}', tuple(getattr(p, 'ds_shape', p.shape)))     # ZeRO-3: the unpartitioned shape
            for name, p in module.named_parameters() for kind in ('param', *MOMENTS)]

def torch_adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, step: int | None = None) -> dict:
    """The Adam state of p, created (zero moments) if the optimiser has not stepped yet."""
    state = optimizer.state[p]
    if not state:
        # (ZeRO-3 swaps its flat partitions into the param groups only while stepping: the first group's flags)
        group = next((g for g in optimizer.param_groups if any(q is p for q in g['params'])), optimizer.param_groups[0])
        on_device = group.get('fused') or group.get('capturable')
        state.update(step=torch.tensor(0.0, device=p.device if on_device else 'cpu'),
                     exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    if step is not None:
        state['step'].fill_(step)
    return state

def plain_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, kind: str) -> torch.Tensor:
    """The full tensor of kind `param` / an Adam moment of an unpartitioned parameter (no ZeRO)."""
    return p.data if kind == 'param' else torch_adam_state(optimizer, p)[kind]

def adam_step_of(optimizer: torch.optim.Optimizer) -> int:
    return max((int(st['step']) for st in optimizer.state.values() if 'step' in st), default=0)

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

    def local_parameters(self) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        return {name: (p.data.reshape(-1), (0, p.numel())) for name, p in self.module.named_parameters()}

    def gather_local(self, name: str, local: torch.Tensor) -> torch.Tensor:
        return local

    # Training state as full tensors (see state_specs).

    def get_full(self, name: str, kind: str) -> torch.Tensor:
        return plain_state(self.optimizer, self.module.get_parameter(name), kind)

    def state_range(self, name: str, kind: str) -> tuple[int, int]:
        return 0, self.module.get_parameter(name).numel()

    def save_range(self, name: str, kind: str) -> tuple[int, int]:
        return self.state_range(name, kind)

    def get_local(self, name: str, kind: str) -> torch.Tensor:
        return self.get_full(name, kind)

    @torch.no_grad()
    def set_state(self, name: str, kind: str, values: torch.Tensor) -> None:
        target = self.get_full(name, kind)
        target.copy_(values.reshape(target.shape))

    def adam_step(self) -> int:
        return adam_step_of(self.optimizer)

    def set_adam_step(self, step: int) -> None:
        for p in self.module.parameters():
            torch_adam_state(self.optimizer, p, step)

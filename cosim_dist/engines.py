"""Training engines (a network, its optimiser and the step around them) and the frozen teacher's placement.

Both engine kinds expose what the trainer uses: `module`, `backward(loss)` (scaled by 1 / accumulation steps), `step()`
(called after every micro-batch, applied at the accumulation boundary), `local_parameters()` (this rank's elements of
every parameter: its ZeRO-3 partition, or all; the EMA follows them without a gather) with `gather_local` (collective:
the full tensor from every rank's elements) and the training state per parameter and kind, which elastic.py
stores independently of the world size: `get_full` (the full fp32 tensor), `state_range` (the elements this rank holds:
its ZeRO partition, or all) and `set_state` (those elements), `adam_step` / `set_adam_step`. An optional
`WeightConstraint` (EDM2's forced weight normalisation) is applied once at construction and after every optimiser step,
to the module's weights and to the optimiser's master copy. `TorchEngine` is one process with plain Adam;
`DeepSpeedEngine` wraps `deepspeed.initialize` with ZeRO stage 0-3. Precision is autocast (fp32 master weights, see
`autocast`)."""

import contextlib
import os

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

#----------------------------------------------------------------------------
# The training state of an engine as full fp32 tensors: each parameter and its two Adam moments (elastic.py stores
# them independently of the world size), plus Adam's step count.

MOMENTS = ('exp_avg', 'exp_avg_sq')      # Adam's state per parameter (torch.optim.Adam / AdamW)

def state_specs(module: torch.nn.Module, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, canonical shape) of every state tensor of a trained module, in a fixed order."""
    return [(f'{prefix}/{name}/{kind}', tuple(getattr(p, 'ds_shape', p.shape)))     # ZeRO-3: the unpartitioned shape
            for name, p in module.named_parameters() for kind in ('param', *MOMENTS)]

def _torch_adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, step: int | None = None) -> dict:
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

def _plain_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, kind: str) -> torch.Tensor:
    """The full tensor of kind `param` / an Adam moment of an unpartitioned parameter (no ZeRO)."""
    return p.data if kind == 'param' else _torch_adam_state(optimizer, p)[kind]

def _adam_step(optimizer: torch.optim.Optimizer) -> int:
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
        return _plain_state(self.optimizer, self.module.get_parameter(name), kind)

    def state_range(self, name: str, kind: str) -> tuple[int, int]:
        return 0, self.module.get_parameter(name).numel()

    @torch.no_grad()
    def set_state(self, name: str, kind: str, values: torch.Tensor) -> None:
        target = self.get_full(name, kind)
        target.copy_(values.reshape(target.shape))

    def adam_step(self) -> int:
        return _adam_step(self.optimizer)

    def set_adam_step(self, step: int) -> None:
        for p in self.module.parameters():
            _torch_adam_state(self.optimizer, p, step)

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
        # overlap_comm: gradient reductions run on their own stream while the backward pass goes on (the default
        # under stage 3 only); it changes when bytes move, not how many (comm.py counts the same)
        'zero_optimization': {'stage': zero_stage, **({'overlap_comm': True} if zero_stage > 0 else {})},
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
        overwrite the module's at the next step). Under ZeRO-3 a row-wise constraint works on the partitions
        (`_project_rows`): no parameter is gathered."""
        if self.constraint is None:
            return
        if self.zero_stage == 3 and self.constraint.row_scale is not None:
            self._project_rows()
            return
        from deepspeed.utils import safe_set_full_fp32_param
        for p in self.constraint.params:
            value = self.constraint.project(p.data.float())
            if self.zero_stage > 0:
                safe_set_full_fp32_param(p, value)
            p.data.copy_(value)

    def _project_rows(self) -> None:
        """A row-wise constraint (EDM2's Eq. 66: each output row scaled by a function of its sum of squares) on ZeRO-3
        partitions: every rank adds up the squares of its own elements per row, one all-reduce of those sums (a
        vector of output channels per weight, all weights at once), and every rank scales its own elements of the
        fp32 master partition and of the module's partition. A weight below DeepSpeed's persistence threshold is
        held whole by every rank once first gathered: it is projected whole, locally, its partitions taken from the
        result."""
        opt, pieces = self.engine.optimizer, []
        for p in self.constraint.params:
            start, end = self._partition(p)
            valid = end - start
            master = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=None)[0][:valid]
            if getattr(p, 'ds_persist', False) and p.data.numel() == p.ds_numel:     # whole here (after a gather)
                p.data.copy_(self.constraint.project(p.data.float()))
                master.copy_(p.data.view(-1)[start:start + valid])
                p.ds_tensor.data.view(-1)[:valid].copy_(master)
                continue
            rows = p.ds_shape[0]
            row = torch.arange(start, start + valid, device=master.device) // (p.ds_numel // rows)
            pieces.append((p, master, row, rows))
        if not pieces:
            return
        sums = torch.cat([torch.zeros(rows, device=m.device).index_add_(0, row, m.float().square())
                          for _, m, row, rows in pieces])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        at = 0
        for p, m, row, rows in pieces:
            scale = self.constraint.row_scale(sums[at:at + rows], p.ds_numel // rows)
            at += rows
            m.mul_(scale[row].to(m.dtype))
            p.ds_tensor.data.view(-1)[:m.numel()].copy_(m)

    def _partition(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """ZeRO-3: the elements [start, end) of the flattened parameter in this rank's partition (`ds_tensor`, whose
        padding past the last element is cut; a rank past the end holds none)."""
        n = p.ds_tensor.numel()
        start = min(n * self.engine.optimizer._get_param_partition_rank(p), p.ds_numel)
        return start, min(start + n, p.ds_numel)

    def local_parameters(self) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """(flat values, (start, end)) of this rank's elements of every parameter: under ZeRO-3 the partition (a view
        of `ds_tensor`, padding cut), otherwise the whole parameter."""
        out = {}
        for name, p in self.module.named_parameters():
            start, end = self.state_range(name, 'param')
            out[name] = ((p.ds_tensor.data.view(-1)[:end - start] if self.zero_stage == 3 else p.data.reshape(-1)),
                         (start, end))
        return out

    def gather_local(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Collective under ZeRO-3: the flat full tensor from every rank's `local` elements of parameter `name` (laid
        out as `local_parameters` gives them); otherwise `local` itself."""
        if self.zero_stage < 3:
            return local
        p = self.module.get_parameter(name)
        n = p.ds_tensor.numel()
        padded = torch.zeros(n, dtype=local.dtype, device=local.device)
        padded[:local.numel()] = local
        out = torch.empty(n * torch.distributed.get_world_size(), dtype=local.dtype, device=local.device)
        torch.distributed.all_gather_into_tensor(out, padded)
        return out[:p.ds_numel]

    # Training state as full tensors (see state_specs): DeepSpeed's safe_get/set_full helpers gather and scatter the
    # fp32 master partitions and Adam moments of ZeRO 1-3; without ZeRO the optimiser holds plain parameters.

    def _inner(self) -> torch.optim.Optimizer:
        """The torch Adam that holds the moments (of the flat fp32 partitions under ZeRO)."""
        opt = self.engine.optimizer
        return opt if self.zero_stage == 0 else opt.optimizer

    def _adam_params(self) -> list[torch.Tensor]:
        """The tensors Adam's state is keyed by: the parameters, or ZeRO's flat fp32 partitions."""
        opt = self.engine.optimizer
        if self.zero_stage == 0:
            return list(self.module.parameters())
        return opt.fp32_partitioned_groups_flat if self.zero_stage == 3 else opt.single_partition_of_fp32_groups

    def _ensure_moments(self) -> None:
        """ZeRO creates Adam's moments lazily at the first step; a resume sets them before that."""
        inner, flats = self._inner(), self._adam_params()
        if self.zero_stage == 0 or all(inner.state[f] for f in flats):
            return
        for f in flats:
            _torch_adam_state(inner, f)
        if self.zero_stage < 3:            # link each parameter's fragment to the new moments
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def get_full(self, name: str, kind: str) -> torch.Tensor:
        """Collective under ZeRO (every rank gets the full tensor)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        p = self.module.get_parameter(name)
        if self.zero_stage == 0:
            return _plain_state(self._inner(), p, kind)
        self._ensure_moments()
        return safe_get_full_fp32_param(p) if kind == 'param' else safe_get_full_optimizer_state(p, kind)

    def state_range(self, name: str, kind: str) -> tuple[int, int]:
        """The elements of the flattened full tensor that this rank holds: under ZeRO-3 its partition (parameter and
        moments alike), under ZeRO-1/2 its fragment of the moments (the parameter itself is replicated), else all."""
        p = self.module.get_parameter(name)
        if self.zero_stage == 3:
            return self._partition(p)
        if self.zero_stage == 0 or kind == 'param':
            return 0, p.numel()
        fragment = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
        return (fragment.start, fragment.start + fragment.numel) if fragment else (0, 0)

    @torch.no_grad()
    def set_state(self, name: str, kind: str, values: torch.Tensor) -> None:
        """`values`: the elements `state_range` names. A parameter is set in the module and in the fp32 master copy."""
        p = self.module.get_parameter(name)
        if self.zero_stage == 0:
            target = _plain_state(self._inner(), p, kind)
            target.copy_(values.reshape(target.shape))
            return
        self._ensure_moments()
        key = None if kind == 'param' else kind
        if self.zero_stage == 3:                       # the padded partition (DeepSpeed's set_full_hp_param assumes
            opt = self.engine.optimizer                # no padding: a gain on more ranks than elements fails there)
            targets = [opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)[0]]
            for t in targets + ([p.ds_tensor.data.view(-1)] if key is None else []):
                t.zero_()
                t[:values.numel()].copy_(values)
            return
        if key is None:
            p.data.copy_(values.reshape(p.shape))
        if p._hp_mapping is not None:                  # this rank's fragment of the flat fp32 partition
            fragment = p._hp_mapping.lp_fragment_address
            source = values if key is not None else values[fragment.start:fragment.start + fragment.numel]
            p._hp_mapping.get_hp_fragment(key).data.copy_(source.reshape(-1))

    def adam_step(self) -> int:
        return _adam_step(self._inner())

    def set_adam_step(self, step: int) -> None:
        inner = self._inner()
        for p in self._adam_params():
            _torch_adam_state(inner, p, step)

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

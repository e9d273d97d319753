"""DeepSpeed ZeRO: the trained networks' engine (`DeepSpeedEngine`, the interface engines.py describes) and the
frozen teacher's placement (a low-precision module, or a ZeRO-3 inference engine offloaded to host memory)."""

import os

import torch

from .config import TeacherConfig
from .engines import adam_step_of, on_cuda, plain_state, sanitize_gradients, torch_adam_state
from .nets import WeightConstraint

def import_deepspeed():
    """Import DeepSpeed, selecting its CPU accelerator when no GPU is visible."""
    if not torch.cuda.is_available():
        os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    import deepspeed
    return deepspeed

def deepspeed_config(micro_batch: int, accum: int, world_size: int, zero_stage: int, optimizer: dict | None,
                     bf16_weights: bool = False) -> dict:
    cfg = {
        'train_batch_size': micro_batch * accum * world_size,
        'train_micro_batch_size_per_gpu': micro_batch,
        'gradient_accumulation_steps': accum,
        # overlap_comm: gradient reductions run on their own stream while the backward pass goes on (the default
        # under stage 3 only); it changes when bytes move, not how many (comm.py counts the same).
        # use_multi_rank_bucket_allreduce off: stages 1/2 reduce each gradient slice to the rank that owns it (one
        # reduce per owner, a reduce-scatter's bytes) instead of all-reducing whole buckets (twice those bytes);
        # measured with comm.py (2 micro-batches), stage 1 goes from 1.50x to 1.00x of comm.lower_bound, stage 2 from
        # 1.67x to 1.00x (from 2.50x to 1.50x of stage 1's bound, one reduce-scatter per optimiser step)
        'zero_optimization': {'stage': zero_stage, **({'overlap_comm': True} if zero_stage > 0 else {}),
                              **({'use_multi_rank_bucket_allreduce': False} if zero_stage in (1, 2) else {})},
        'gradient_clipping': 0.0,
        'steps_per_print': 2 ** 62,
    }
    if optimizer is not None:
        cfg['optimizer'] = optimizer
    if bf16_weights:
        # The module's weights in bf16, the fp32 master weights and Adam's moments in the optimiser: parameter
        # all-gathers move 2 bytes per element. Gradient reductions stay fp32: a bf16 sum over W ranks rounds at every
        # addition (8-bit significand), so small per-rank contributions vanish as W grows; fp32 keeps them.
        # Gradients accumulate over micro-batches in fp32 too, except under stage 1, where DeepSpeed would then switch
        # to its BF16_Optimizer (another state layout); there the accumulation stays bf16 (one rounding per round).
        cfg['bf16'] = {'enabled': True}
        cfg['communication_data_type'] = 'fp32'
        if zero_stage > 1:
            cfg['data_types'] = {'grad_accum_dtype': 'fp32'}
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
                 accum: int, world_size: int, zero_stage: int, constraint: WeightConstraint | None = None,
                 bf16_weights: bool = False) -> None:
        """`bf16_weights` (ZeRO 1-3): the module's weights in bf16 (for autocast training; see deepspeed_config);
        the fp32 master weights start from the module's fp32 values, not from their bf16 rounding."""
        deepspeed = import_deepspeed()
        sanitize_gradients(module)
        _share_scalar_parameters(module, zero_stage)
        adam = {'type': 'AdamW', 'params': {'lr': lr, 'betas': list(betas), 'eps': eps, 'weight_decay': 0.0,
                                            'torch_adam': True, 'fused': on_cuda(module)}}
        self.zero_stage, self.constraint, self.bf16 = zero_stage, constraint, bf16_weights and zero_stage > 0
        self.rows = zero_stage > 0 and constraint is not None       # the constraint works on the master elements
        if self.rows and constraint.row_scale is None:
            raise ValueError('a weight constraint under ZeRO 1-3 must be row-wise (WeightConstraint.row_scale)')
        initial = {name: p.detach() for name, p in module.named_parameters()} if self.bf16 else {}  # DeepSpeed casts
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()],
                                               config=deepspeed_config(micro_batch, accum, world_size,
                                                                       zero_stage, adam, self.bf16))
        for name, values in initial.items():      # rank 0's values, as DeepSpeed's broadcast of the module
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(values, src=0)
            start, end = self.state_range(name, 'param')
            self.set_state(name, 'param', values.reshape(-1)[start:end])
        if self.rows:
            self._project_rows()
            self._refresh_module()
            self._project_inside_step()
        else:
            self._project()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary and not self.rows:
            self._project()

    @torch.no_grad()
    def _project(self) -> None:
        """Without ZeRO: the constraint on the module's weights (they are the optimiser's)."""
        for p in self.constraint.params if self.constraint else []:
            p.data.copy_(self.constraint.project(p.data.float()))

    def _project_inside_step(self) -> None:
        """Under ZeRO 1-3 the row-wise constraint runs inside DeepSpeed's step, right after Adam has updated the fp32
        master partitions (the last of the optimiser's calls for its groups) and before DeepSpeed copies them into the
        module's weights and gathers those: the module then holds the projected master, rounded once, with no gather
        of our own. A step DeepSpeed skips (an overflow) calls no Adam and projects nothing."""
        opt, inner = self.engine.optimizer, self.engine.optimizer.optimizer
        groups = len(opt.fp16_groups if self.zero_stage == 3 else opt.bit16_groups)
        adam_step, calls = inner.step, [0]

        def step(*args, **kwargs):
            out = adam_step(*args, **kwargs)
            calls[0] += 1
            if calls[0] % groups == 0:
                self._project_rows()
            return out
        inner.step = step

    @torch.no_grad()
    def _refresh_module(self) -> None:
        """Collective: the module's weights from the master elements of every rank, outside a step (construction).
        ZeRO-3 gathers its partitions at the first forward."""
        opt = self.engine.optimizer
        if self.zero_stage < 3:
            opt.update_lp_params()                      # each rank's master partition into the weights, all-gathered
        else:
            assert not any(p.data.numel() for p in opt.persistent_parameters), 'ZeRO-3 weights gathered at start'

    @torch.no_grad()
    def _project_rows(self) -> None:
        """A row-wise constraint (EDM2's Eq. 66: each output row scaled by a function of its sum of squares) on the fp32
        master elements each rank holds (`_master`): every rank adds up the squares of its own elements per row, one
        all-reduce of those sums (a vector of output channels per weight, all weights at once), and every rank scales
        its master elements and writes them into its own part of the module's weights (the ZeRO-3 partition, or its
        ZeRO-1/2 fragment of the replicated weight); DeepSpeed's gather (or `_refresh_module`) brings the rest."""
        pieces = []
        for p in self.constraint.params:
            master, (start, end) = self._master(p)
            numel, rows = (p.ds_numel, p.ds_shape[0]) if self.zero_stage == 3 else (p.numel(), p.shape[0])
            row = torch.arange(start, end, device=master.device) // (numel // rows)
            pieces.append((p, master, (start, end), row, rows, numel))
        if not pieces:
            return
        sums = torch.cat([torch.zeros(rows, device=m.device).index_add_(0, row, m.float().square())
                          for _, m, _, row, rows, _ in pieces])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        at = 0
        for p, m, (start, end), row, rows, numel in pieces:
            scale = self.constraint.row_scale(sums[at:at + rows], numel // rows)
            at += rows
            m.mul_(scale[row].to(m.dtype))
            own = p.ds_tensor.data.view(-1)[:m.numel()] if self.zero_stage == 3 else p.data.view(-1)[start:end]
            own.copy_(m)

    def _master(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, tuple[int, int]]:
        """This rank's fp32 master elements of `p` (flat, a detached view of the optimiser's partition: writes reach it,
        autograd does not) and which elements of
        the flattened parameter they are: its ZeRO-3 partition, or its ZeRO-1/2 fragment (none: (0, 0))."""
        if self.zero_stage == 3:
            start, end = self._partition(p)
            opt = self.engine.optimizer
            return (opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=None)[0]
                    .detach()[:end - start], (start, end))
        if p._hp_mapping is None:
            return torch.empty(0, device=p.device), (0, 0)
        return p._hp_mapping.get_hp_fragment().detach().view(-1), self._fragment(p)

    @staticmethod
    def _fragment(p: torch.nn.Parameter) -> tuple[int, int]:
        """ZeRO-1/2: the elements [start, end) of the flattened parameter in this rank's fragment of the flat fp32
        partition ((0, 0): none)."""
        if p._hp_mapping is None:
            return 0, 0
        fragment = p._hp_mapping.lp_fragment_address
        return fragment.start, fragment.start + fragment.numel

    def _partition(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """ZeRO-3: the elements [start, end) of the flattened parameter in this rank's partition (`ds_tensor`, whose
        padding past the last element is cut; a rank past the end holds none)."""
        n = p.ds_tensor.numel()
        start = min(n * self.engine.optimizer._get_param_partition_rank(p), p.ds_numel)
        return start, min(start + n, p.ds_numel)

    def local_parameters(self) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """(flat values, (start, end)) of this rank's elements of every parameter: with bf16 weights its fp32 master
        elements (`_master`); else under ZeRO-3 the partition (a view of `ds_tensor`, padding cut), otherwise the
        whole parameter."""
        if self.bf16:
            return {name: self._master(p) for name, p in self.module.named_parameters()}
        out = {}
        for name, p in self.module.named_parameters():
            start, end = self.state_range(name, 'param')
            out[name] = ((p.ds_tensor.data.view(-1)[:end - start] if self.zero_stage == 3 else p.data.reshape(-1)),
                         (start, end))
        return out

    def gather_local(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Collective under ZeRO-3, and under ZeRO 1/2 with bf16 weights: the flat full tensor from every rank's
        `local` elements of parameter `name` (laid out as `local_parameters` gives them); otherwise `local` itself."""
        p = self.module.get_parameter(name)
        if self.zero_stage < 3 and self.bf16:                 # fragments of any length: each rank adds its own
            start, end = self._fragment(p)
            full = torch.zeros(p.numel(), dtype=local.dtype, device=local.device)
            full[start:end] = local
            torch.distributed.all_reduce(full)
            return full
        if self.zero_stage < 3:
            return local
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
            torch_adam_state(inner, f)
        if self.zero_stage < 3:            # link each parameter's fragment to the new moments
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def get_full(self, name: str, kind: str) -> torch.Tensor:
        """Collective under ZeRO (every rank gets the full tensor)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        p = self.module.get_parameter(name)
        if self.zero_stage == 0:
            return plain_state(self._inner(), p, kind)
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
        return self._fragment(p)

    def save_range(self, name: str, kind: str) -> tuple[int, int]:
        """The elements this rank writes at save: `state_range`, except that under ZeRO-1/2 a parameter's own elements
        are its fragment of the fp32 master (the module's replicated copy is restored whole)."""
        if self.zero_stage in (1, 2) and kind == 'param':
            return self._fragment(self.module.get_parameter(name))
        return self.state_range(name, kind)

    def get_local(self, name: str, kind: str) -> torch.Tensor:
        """The fp32 elements `save_range` names, without a collective (whole tensors, at stage 0: `get_full`)."""
        p = self.module.get_parameter(name)
        if self.zero_stage == 0:
            return self.get_full(name, kind)
        if kind == 'param':
            return self._master(p)[0]                  # the ZeRO-3 partition, or the ZeRO-1/2 fragment
        self._ensure_moments()
        if self.zero_stage == 3:
            start, end = self._partition(p)
            moment = self.engine.optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                                         optim_state_key=kind)[0]
            return moment[:end - start]
        if p._hp_mapping is None:
            return torch.empty(0, device=p.device)
        return p._hp_mapping.get_hp_fragment(kind).view(-1)

    @torch.no_grad()
    def set_state(self, name: str, kind: str, values: torch.Tensor) -> None:
        """`values`: the elements `state_range` names. A parameter is set in the module and in the fp32 master copy."""
        p = self.module.get_parameter(name)
        if self.zero_stage == 0:
            target = plain_state(self._inner(), p, kind)
            target.copy_(values.reshape(target.shape))
            return
        key = None if kind == 'param' else kind
        if key is not None:
            self._ensure_moments()
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
            start, end = self._fragment(p)
            source = values if key is not None else values[start:end]
            p._hp_mapping.get_hp_fragment(key).data.copy_(source.reshape(-1))

    def adam_step(self) -> int:
        return adam_step_of(self._inner())

    def set_adam_step(self, step: int) -> None:
        inner = self._inner()
        for p in self._adam_params():
            torch_adam_state(inner, p, step)

#----------------------------------------------------------------------------
# The frozen teacher: a low-precision module, or a ZeRO-3 inference engine offloaded to host memory.

def place_teacher(teacher: torch.nn.Module, cfg: TeacherConfig, device: torch.device,
                  world_size: int) -> torch.nn.Module:
    """Eval mode, no parameter gradients (inputs stay differentiable), the parameters in the configured precision
    (the buffers stay as built: EDM2's Fourier frequencies in bf16 would shift the noise embedding's phase by up to
    ~0.1 rad; DeepSpeed's bf16 mode casts parameters only), in the configured place."""
    precision = cfg.precision if cfg.precision != 'auto' else ('bf16' if device.type == 'cuda' else 'fp32')
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    teacher = teacher.eval().requires_grad_(False)
    for p in teacher.parameters():
        p.data = p.data.to(dtype)
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

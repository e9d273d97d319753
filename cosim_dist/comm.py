"""Collective communication of the distributed step, counted and bounded.

`CommMeter` sees every c10d collective the process issues (DeepSpeed's, ours, torch's) at the dispatcher, the way
torch's own `CommDebugMode` does, and adds up the bytes each rank moves, by operation and by training phase. A
collective's bytes per rank follow the bandwidth-optimal algorithm (the 'bus bytes' of nccl-tests): with a group of W
ranks and a full tensor of S bytes, an all-gather or reduce-scatter moves (W-1)/W S per rank, an all-reduce
2 (W-1)/W S (a reduce-scatter and an all-gather), an all-to-all (W-1)/W of what a rank sends, a broadcast, gather or
scatter S. A reduce to one root is counted as what this rank sends under a ring or tree: S, nothing at the root (so W
reduces of S/W, one to each owner, move (W-1)/W S per rank, a reduce-scatter's bytes). Point-to-point and barriers are
not counted.

`lower_bound` is the analytic minimum of the CoSIM iteration (Eq. L1) for a ZeRO stage, in the same units."""

import collections
import dataclasses
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

c10d = torch.ops.c10d
OPS = {  # dispatcher op -> (kind, index of the argument that holds the full tensor S)
    c10d.allreduce_: ('all_reduce', 0), c10d.allreduce_coalesced_: ('all_reduce', 0),
    c10d.broadcast_: ('broadcast', 0), c10d.reduce_: ('reduce', 0),
    c10d.allgather_: ('all_gather', 0), c10d._allgather_base_: ('all_gather', 0),
    c10d.allgather_coalesced_: ('all_gather', 0), c10d.allgather_into_tensor_coalesced_: ('all_gather', 0),
    c10d.reduce_scatter_: ('reduce_scatter', 1), c10d._reduce_scatter_base_: ('reduce_scatter', 1),
    c10d.reduce_scatter_tensor_coalesced_: ('reduce_scatter', 1),
    c10d.alltoall_: ('all_to_all', 1), c10d.alltoall_base_: ('all_to_all', 1),
    c10d.gather_: ('gather', 1), c10d.scatter_: ('scatter', 0),
}
SHARE = {'all_reduce': lambda w: 2 * (w - 1) / w, 'all_gather': lambda w: (w - 1) / w,
         'reduce_scatter': lambda w: (w - 1) / w, 'all_to_all': lambda w: (w - 1) / w,
         'broadcast': lambda w: 1.0, 'reduce': lambda w: 1.0, 'gather': lambda w: 1.0, 'scatter': lambda w: 1.0}

def _nbytes(x) -> int:
    """Bytes of the tensors in a (nested) argument."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0

def _group(args) -> tuple[int, int]:
    """(ranks, this rank) in the collective's process group (the first TorchScript-boxed ProcessGroup among the
    arguments)."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                group = torch.distributed.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):         # another boxed object (a ReduceOp)
                continue
            return group.size(), group.rank()
    return torch.distributed.get_world_size(), torch.distributed.get_rank()

class CommMeter(TorchDispatchMode):
    """Context manager: bytes per rank of every collective issued inside, `by_op` and `by_phase` (the phase named by
    `phase()` when the collective is issued, e.g. the benchmark's PhaseTimer.current)."""

    def __init__(self, phase: Callable[[], str] = lambda: 'step') -> None:
        super().__init__()
        self.phase = phase
        self.by_op: collections.Counter[str] = collections.Counter()
        self.by_phase: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = OPS.get(func._overloadpacket)
        if entry is not None:
            kind, at = entry
            w, rank = _group(args)
            if w > 1 and not (kind == 'reduce' and args[3] == rank):        # c10d.reduce_: args[3] is the root
                moved = round(SHARE[kind](w) * _nbytes(args[at]))
                self.by_op[kind] += moved
                self.by_phase[self.phase()] += moved
                self.calls[kind] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

@dataclasses.dataclass(frozen=True)
class StepShape:
    """What the analytic bound needs to know of one CoSIM iteration on one rank."""
    params_g: int                # trained parameters of the generator
    params_aux: int              # trained parameters of the auxiliary
    world: int                   # data-parallel ranks
    rounds: int = 1              # micro-batches per optimiser step (gradient accumulation)
    aux_steps: int = 1           # auxiliary steps per generator step (train.aux_steps_per_gen)
    persistent_g: int = 0        # ZeRO-3: parameters of G kept whole on every rank (DeepSpeed's persistence threshold)
    persistent_aux: int = 0      # ZeRO-3: the same for the auxiliary
    grad_bytes: int = 4          # bytes per element of a gradient reduction (4: fp32)
    param_bytes: int = 4         # bytes per element of a parameter gather (2: bf16 working copy)

def lower_bound(stage: int, s: StepShape) -> dict[str, int]:
    """Minimal bytes per rank per Eq. L1 iteration for ZeRO `stage`, per network, bandwidth-optimal collectives:
    - stage 0 (replicated weights): one all-reduce of the gradients per optimiser step;
    - stage 1 (replicated weights, sharded optimiser): one reduce-scatter of the gradients and one all-gather of the
      updated parameters per optimiser step;
    - stage 2 (the gradients partitioned too): the same, but a reduce-scatter of each micro-batch's gradients, as
      under stage 3: no rank keeps a whole gradient from one micro-batch to the next (that is the memory stage 2
      saves), so each micro-batch's gradients leave before the next backward pass;
    - stage 3 (no rank keeps a full network between phases): an all-gather of the parameters for every phase of
      every micro-batch in which the network runs (kept from its forward to its backward pass), and a
      reduce-scatter of each micro-batch's gradients. Per micro-batch G runs in each auxiliary step (forward, no
      grad) and in the generator step; the auxiliary in its own steps and in the generator step (gradients to its
      input only). Parameters below DeepSpeed's persistence threshold stay whole on every rank: they are gathered
      once per optimiser step, after the update, as under stages 1 and 2."""
    f = (s.world - 1) / s.world
    grads = {'generator': f * s.params_g * s.grad_bytes, 'auxiliary': f * s.params_aux * s.grad_bytes}
    gather = {'generator': f * s.params_g * s.param_bytes, 'auxiliary': f * s.params_aux * s.param_bytes}
    steps = {'generator': 1, 'auxiliary': s.aux_steps}               # optimiser steps per iteration
    if stage == 0:
        out = {k: 2 * grads[k] * steps[k] for k in steps}
    elif stage in (1, 2):
        out = {k: ((s.rounds if stage == 2 else 1) * grads[k] + gather[k]) * steps[k] for k in steps}
    else:
        kept = {'generator': f * s.persistent_g * s.param_bytes, 'auxiliary': f * s.persistent_aux * s.param_bytes}
        passes = s.rounds * (s.aux_steps + 1)
        out = {k: passes * (gather[k] - kept[k]) + steps[k] * (kept[k] + s.rounds * grads[k]) for k in steps}
    out = {k: round(v) for k, v in out.items()}
    out['total'] = out['generator'] + out['auxiliary']
    return out

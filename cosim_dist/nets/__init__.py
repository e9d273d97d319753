"""Denoiser networks: every architecture is an EDM-preconditioned module (`precond.Precond`) called as
`net(x, sigma, class_labels=None, sigma_t=None, return_logvar=False)`.

`class_labels` is one-hot [N, label_dim] (or None), `sigma` a scalar or [N] tensor. `sigma_t` is only
accepted by auxiliary networks (built with `aux_t_embed`), see `aux.py`. Each class records its
constructor arguments in `self.init_kwargs` so that copies (generator, auxiliary) and exports can rebuild it.
"""

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint

from . import edm, edm2, toy

ARCHS: dict[str, type[torch.nn.Module]] = {
    'toy': toy.ToyPrecond,
    'songunet': edm.SongUNetPrecond,
    'dhariwalunet': edm.DhariwalUNetPrecond,
    'edm2': edm2.EDM2Precond,
}

def build_network(arch: str, **kwargs) -> torch.nn.Module:
    """Instantiate a preconditioned denoiser of architecture `arch` (a key of ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f'model.arch={arch!r} is not a known architecture; valid choices: {sorted(ARCHS)}')
    try:
        return ARCHS[arch](**kwargs)
    except TypeError as e:
        raise ValueError(f'model.net: bad arguments for architecture {arch!r}: {e}') from e

# Constructor arguments that only act in training (a student may differ from its teacher in these).
TRAINING_KWARGS = ('dropout',)

@dataclasses.dataclass
class WeightConstraint:
    """A projection applied to some parameters, in place and without gradient, once before training and after every
    optimiser step (the engines apply it to the master weights too)."""
    params: list[torch.nn.Parameter]
    project: Callable[[torch.Tensor], torch.Tensor]
    # the same projection when it scales each output row (dim 0) by a function of the row's sum of squares and
    # length: (sums, row length) -> scales; lets ZeRO-3 project partitions without gathering (engines.py). Both forms
    # are kept: `project` is the official expression, bit for bit (tests/nets/test_edm2.py trains against the official
    # in-forward normalisation with torch.equal), which a scale from summed squares only matches within rounding.
    row_scale: Callable[[torch.Tensor, int], torch.Tensor] | None = None

def weight_constraint(net: torch.nn.Module) -> WeightConstraint | None:
    """EDM2's forced weight normalisation (Eq. 66) for every MPConv of net; None for other architectures."""
    params = [m.weight for m in net.modules() if isinstance(m, edm2.MPConv)]
    return WeightConstraint(params, edm2.normalize, edm2.normalize_scale) if params else None

# The residual blocks: units of activation checkpointing.
BLOCKS = (toy.ResBlock, edm.UNetBlock, edm2.Block)

def checkpoint_blocks(net: torch.nn.Module) -> int:
    """Activation checkpointing: every residual block of net recomputes its activations in the backward pass instead of
    keeping them (memory for ~1 extra forward). Dropout masks are replayed exactly (RNG state preserved). Returns the
    number of blocks wrapped."""
    blocks = [m for m in net.modules() if isinstance(m, BLOCKS)]
    for m in blocks:
        m.forward = functools.partial(_recompute, m.forward)
    return len(blocks)

def _recompute(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

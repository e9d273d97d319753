"""Gradient probe (run by tests under torch.distributed.run): build the real trainer from `launch.py`-style overrides,
run the first auxiliary (Eq. A1) and generator (Eq. G1) micro-steps of a fresh run and save, from rank 0, the full
all-reduced fp32 gradient each engine would hand to its optimiser (DeepSpeed's `safe_get_full_grad`, which
assembles ZeRO 1-3 partitions). The optimiser steps are not taken, so both phases see the initial weights. Also
saved: G's initial fp32 master weights (gathered), its EMA network and the dtype of its module weights.

    python -m torch.distributed.run --nproc_per_node=2 tests/helpers/grad_probe.py OUT.pt key=value ...
"""

import contextlib
import os
import sys

import torch

from cosim_dist import build, distributed
from cosim_dist.config import load_config

class _Grabbed(Exception):
    """Raised at an optimiser phase once its gradients are read: the step is skipped, the weights stay initial."""

def full_grads(module: torch.nn.Module) -> torch.Tensor:
    """The flattened, all-reduced gradient of every parameter (collective under DeepSpeed)."""
    from deepspeed.utils import safe_get_full_grad
    return torch.cat([safe_get_full_grad(p).detach().float().flatten() for p in module.parameters()])

def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(overrides)
    env = distributed.discover()
    device = distributed.init(env, cfg.run.device, always_group=True)
    if env.rank == 0:
        build.prepare_run_dir(cfg)
    distributed.barrier()
    teacher = build.get_teacher(cfg, device)        # the cached toy teacher (pretrained by the test beforehand)
    result, trainer = {}, None

    def timer(phase: str):
        if phase.endswith('optimiser'):
            net = trainer.aux.module if phase.startswith('aux') else trainer.g.module
            result[phase] = full_grads(net)
            raise _Grabbed(phase)
        return contextlib.nullcontext()
    trainer = build.build_trainer(cfg, teacher, device, env, checkpoints=False, timer=timer)
    g = trainer.g
    result['g: master'] = torch.cat([g.get_full(n, 'param').flatten() for n, _ in g.module.named_parameters()])
    trainer.averaged.sync()
    result['g: ema'] = torch.cat([p.flatten() for p in trainer.averaged.net.parameters()])
    result['g: weight dtype'] = str(next(g.module.parameters()).dtype)
    gen = torch.Generator(device).manual_seed(cfg.run.seed)
    for step in (trainer.aux_step, trainer.generator_step):
        try:
            step(gen)
        except _Grabbed:
            pass
    if env.rank == 0:
        torch.save(result, out)
    distributed.barrier()
    # The engines were left between backward and step on purpose; their C++ teardown at interpreter exit can abort
    # ('terminate called without an active exception', seen once in a fresh-clone run after the result was saved).
    # The probe's work is done and saved: leave without running destructors.
    os._exit(0)

if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:])

"""Training-state probe (run by tests under torch.distributed.run): build the real trainer from `launch.py`-style
overrides, resume it from its run's newest checkpoint on however many ranks it is started with, and save from rank 0
every tensor of the training state as the engines hold it (full fp32 parameters and Adam moments, assembled from the
ZeRO partitions; the EMA), Adam's step counts and the bytes each rank read from the store.

    python -m torch.distributed.run --nproc_per_node=3 tests/helpers/state_probe.py OUT.pt key=value ...
"""

import os
import sys

import torch

from cosim_dist import build, distributed
from cosim_dist.config import load_config

def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(overrides)
    env = distributed.discover()
    device = distributed.init(env, cfg.run.device, always_group=True)
    teacher = build.get_teacher(cfg, device)        # the cached toy teacher (pretrained by the test beforehand)
    trainer = build.build_trainer(cfg, teacher, device, env)
    assert trainer.load_checkpoint(), 'no checkpoint to resume from'
    specs = trainer._state_specs()
    get = trainer._state_access(specs)[0]
    state = {key: get(i).detach().cpu().clone() for i, (key, _) in enumerate(specs)}   # collective under ZeRO
    read = [None] * env.world_size
    torch.distributed.all_gather_object(read, trainer.restored_bytes)
    if env.rank == 0:
        torch.save({'state': state, 'adam_step': [trainer.g.adam_step(), trainer.aux.adam_step()],
                    'nimg': trainer.state.nimg, 'bytes_read': read}, out)
    distributed.barrier()
    os._exit(0)                                     # see grad_probe.py: no C++ teardown after the result is saved

if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:])

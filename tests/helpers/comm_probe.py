"""Known collectives under cosim_dist.comm.CommMeter, run by tests/test_comm.py under torch.distributed.run (gloo):
`comm_probe.py OUT` writes rank 0's counts to OUT (JSON)."""

import json
import sys

import torch

from cosim_dist.comm import CommMeter

torch.distributed.init_process_group('gloo')
w, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
phase = ['one']
with CommMeter(phase=lambda: phase[0]) as meter:
    torch.distributed.all_reduce(torch.ones(1000))                                  # S = 4000 bytes
    torch.distributed.broadcast(torch.ones(300, dtype=torch.bfloat16), src=0)       # S = 600
    phase[0] = 'two'
    torch.distributed.all_gather_into_tensor(torch.empty(100 * w), torch.ones(100))  # S = 400 w
    torch.distributed.all_gather([torch.empty(10) for _ in range(w)], torch.ones(10))  # S = 40 w
    torch.distributed.reduce_scatter_tensor(torch.empty(50), torch.ones(50 * w))      # S = 200 w
    torch.distributed.all_to_all_single(torch.empty(8 * w), torch.ones(8 * w))        # S = 32 w
    torch.distributed.reduce(torch.ones(100), dst=0)                                 # S = 400, rank 0 the root
    torch.distributed.reduce(torch.ones(25), dst=w - 1)                              # S = 100
    torch.distributed.barrier()
    torch.distributed.all_reduce(torch.ones(7), group=torch.distributed.new_group([rank]))  # a group of one: nothing
if rank == 0:
    with open(sys.argv[1], 'w') as f:
        json.dump({'world': w, 'by_op': meter.by_op, 'by_phase': meter.by_phase, 'calls': meter.calls}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()

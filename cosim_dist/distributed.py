"""Process-group discovery and set-up: torchrun variables, else a Slurm task, else a single process.
A partially set environment is an error that lists what is missing."""

import dataclasses
import datetime
import os
import pathlib
import re
import socket
import subprocess
from collections.abc import Mapping

import torch

from .config import ConfigError
from .storage import parse_url, write_atomic

TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
SLURM_VARS = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_JOB_NODELIST', 'SLURM_JOB_ID')

class DistributedEnvError(ConfigError):
    """The environment describes a distributed job only partially."""

@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = '127.0.0.1'
    master_port: int = 29500
    source: str = 'single'      # torchrun | slurm | single

    def export(self) -> None:
        """Write the torchrun-style variables that `init_process_group(init_method='env://')` reads."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))

def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: `scontrol show hostnames` (Slurm's own expansion), else a parse of the
    simple forms such as 'gpu[007-009,012],cpu1' -> 'gpu007' where scontrol is not installed."""
    try:
        done = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r'([^,\[]+)(\[([^\]]+)\])?', nodelist.strip())
    if m is None:
        raise DistributedEnvError(f'cannot parse SLURM_JOB_NODELIST={nodelist!r}')
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(',')[0].split('-')[0]

def rendezvous_port(job_id: str | int) -> int:
    """The job's rendezvous port, the same on every task: below Linux's ephemeral range (32768-60999), where the
    kernel never hands a port to an outgoing connection that could hold it already."""
    return 20000 + int(str(job_id).split('_')[0]) % 12000

def _require(env: Mapping[str, str], names: tuple[str, ...], what: str) -> None:
    missing = [k for k in names if k not in env]
    if missing:
        present = [k for k in names if k in env]
        raise DistributedEnvError(f'{what} environment is partial: {", ".join(present)} set but {", ".join(missing)} '
                                  f'missing; set all of {", ".join(names)} or none of them')

def discover(env: Mapping[str, str] = os.environ) -> DistEnv:
    """torchrun variables win (also inside a Slurm allocation), then a Slurm task (srun), then one process."""
    if any(k in env for k in TORCHRUN_VARS):
        _require(env, TORCHRUN_VARS, 'torchrun')
        return DistEnv(int(env['RANK']), int(env['WORLD_SIZE']), int(env['LOCAL_RANK']), env['MASTER_ADDR'],
                       int(env['MASTER_PORT']), 'torchrun')
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        _require(env, SLURM_VARS, 'Slurm')
        nodes = env.get('SLURM_STEP_NODELIST', env['SLURM_JOB_NODELIST'])   # the step's hosts (srun inside a job)
        return DistEnv(int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env['SLURM_LOCALID']),
                       first_host(nodes), rendezvous_port(env['SLURM_JOB_ID']), 'slurm')
    return DistEnv()

#----------------------------------------------------------------------------

def pick_device(device: str = 'auto', index: int = 0) -> torch.device:
    """`auto` | `cpu` | `cuda` (`run.device`) -> this process's device: GPU `index` modulo the visible GPUs."""
    use_cuda = torch.cuda.is_available() if device == 'auto' else device == 'cuda'
    if use_cuda and not torch.cuda.is_available():
        raise ValueError('run.device=cuda but no CUDA device is visible; use run.device=cpu or auto')
    return torch.device('cuda', index % torch.cuda.device_count()) if use_cuda else torch.device('cpu')

def init(env: DistEnv, device: str = 'auto', always_group: bool = False, timeout_s: float = 1800) -> torch.device:
    """Join the process group (gloo on CPU, nccl on GPU; also for one process if `always_group`, as DeepSpeed
    needs one) and return this rank's device (`run.device`)."""
    dev = pick_device(device, env.local_rank)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if (env.world_size > 1 or always_group) and not torch.distributed.is_initialized():
        backend, timeout = 'nccl' if dev.type == 'cuda' else 'gloo', datetime.timedelta(seconds=timeout_s)
        if env.source == 'single':
            # A group of one needs no rendezvous: an in-process store, so no port can be taken in between (a TCP
            # store on a port found free a moment earlier raced with concurrent runs). The exported port only keeps
            # the names of DeepSpeed's shared-memory segments apart between concurrent single-process runs.
            dataclasses.replace(env, master_port=free_port()).export()
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 timeout=timeout)
        else:
            env.export()
            torch.distributed.init_process_group(backend, init_method='env://', timeout=timeout)
    return dev

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

def rank_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (every rank must call it with the same keys)."""
    if not torch.distributed.is_initialized():
        return values
    device = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(values, (t / torch.distributed.get_world_size()).tolist()))

def rank_max(value: int) -> int:
    """The largest of an integer over all ranks, on every rank."""
    if not torch.distributed.is_initialized():
        return value
    device = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())

def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (the step-boundary agreement for preemption)."""
    return bool(rank_max(int(flag)))

def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def share_file(path: pathlib.Path) -> None:
    """Collective: rank 0's `path` is written at the same path on every rank that lacks that content (ranks on other
    nodes see their own disk: a file rank 0 wrote is not theirs until they receive it)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    box = [path.read_bytes() if rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if rank() != 0 and not (path.is_file() and path.read_bytes() == box[0]):
        write_atomic(path, lambda tmp: tmp.write_bytes(box[0]))

def gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out

def check_store_reachable(url: str, hosts: list[str]) -> None:
    """Checkpoints must be readable by every rank without a shared filesystem: a local store (path, file://) is
    refused when the ranks run on more than one host (`hosts`: each rank's host name)."""
    if parse_url(url)[0] != 's3' and len(set(hosts)) > 1:
        raise ConfigError(f'checkpoint.url={url} is a local path, but the ranks run on {len(set(hosts))} hosts '
                          f'({", ".join(sorted(set(hosts))[:4])}): no filesystem is assumed shared between nodes; '
                          f'set checkpoint.url=s3://<bucket>/<prefix>')

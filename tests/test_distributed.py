"""Environment discovery: torchrun, Slurm, single process; partial environments are errors."""

import pytest

from cosim_dist.config import ConfigError
from cosim_dist.distributed import DistEnv, DistributedEnvError, check_store_reachable, discover, first_host

TORCHRUN = dict(RANK='1', WORLD_SIZE='4', LOCAL_RANK='1', MASTER_ADDR='node1', MASTER_PORT='29511')
SLURM = dict(SLURM_PROCID='5', SLURM_NTASKS='8', SLURM_LOCALID='1', SLURM_JOB_NODELIST='gpu[007-009,012]',
             SLURM_JOB_ID='4242')

def test_single_process_by_default():
    assert discover({}) == DistEnv()
    assert discover({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}).source == 'single'    # sbatch batch step

def test_torchrun_wins_even_inside_slurm():
    env = discover({**SLURM, **TORCHRUN})
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ('torchrun', 1, 4, 1, 'node1', 29511)

def test_slurm_tasks():
    env = discover(SLURM)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_addr) == ('slurm', 5, 8, 1, 'gpu007')
    assert 20000 <= env.master_port < 32768 and discover(SLURM).master_port == env.master_port   # not ephemeral
    assert discover({**SLURM, 'SLURM_JOB_ID': '4243'}).master_port != env.master_port
    step = discover({**SLURM, 'SLURM_STEP_NODELIST': 'gpu[009,012]'})      # srun inside a larger allocation
    assert step.master_addr == 'gpu009'

@pytest.mark.parametrize('env, missing', [
    ({k: v for k, v in TORCHRUN.items() if k != 'MASTER_PORT'}, 'MASTER_PORT'),
    ({'RANK': '0'}, 'WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT'),
    ({k: v for k, v in SLURM.items() if k != 'SLURM_JOB_NODELIST'}, 'SLURM_JOB_NODELIST'),
])
def test_partial_environment_is_an_error(env, missing):
    with pytest.raises(DistributedEnvError, match=f'{missing} missing'):
        discover(env)

@pytest.mark.parametrize('nodelist, host', [('node1', 'node1'), ('a[01-04]', 'a01'), ('gpu[3,5-7],cpu1', 'gpu3'),
                                            ('x-y[10]', 'x-y10')])
def test_first_host(nodelist, host, monkeypatch):
    """Through `scontrol show hostnames` where Slurm is installed, and through the fallback parse without it."""
    assert first_host(nodelist) == host
    monkeypatch.setenv('PATH', '/nonexistent')
    assert first_host(nodelist) == host

def test_a_local_checkpoint_store_is_refused_across_hosts(tmp_path):
    check_store_reachable(str(tmp_path), ['node1', 'node1'])                     # one host: a local store is fine
    check_store_reachable('s3://bucket/run', ['node1', 'node2'])                   # S3 reaches every host
    with pytest.raises(ConfigError, match=r'checkpoint.url=\S+ is a local path, but the ranks run on 2 hosts '
                                          r'\(node1, node2\).*set checkpoint.url=s3://'):
        check_store_reachable(f'file://{tmp_path}', ['node1', 'node2', 'node1'])

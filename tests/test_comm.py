"""cosim_dist/comm.py: the collective meter in real gloo processes, the analytic lower bound by hand, and task=bench's
communication report for a 2-rank DeepSpeed run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from cosim_dist.comm import StepShape, lower_bound

REPO = pathlib.Path(__file__).resolve().parents[1]

@pytest.mark.parametrize('world', [2, 3])
def test_meter_counts_every_collective_at_its_bytes_per_rank(tmp_path, world):
    """tests/helpers/comm_probe.py issues one collective of each kind with known sizes S; each rank moves
    2 (w-1)/w S for an all-reduce, (w-1)/w S for an all-gather, reduce-scatter or all-to-all, S for a broadcast,
    S for a reduce to another rank and nothing for a reduce to itself; a barrier and a collective in a group of one
    move nothing."""
    out = tmp_path / 'counts.json'
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={world}', '--standalone',
                    str(REPO / 'tests' / 'helpers' / 'comm_probe.py'), str(out)], check=True, timeout=120,
                   capture_output=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
    r, f = json.loads(out.read_text()), (world - 1) / world
    want = {'all_reduce': round(2 * f * 4000), 'broadcast': 600, 'all_gather': round(f * (400 + 40) * world),
            'reduce_scatter': round(f * 200 * world), 'all_to_all': round(f * 32 * world), 'reduce': 100}
    assert r['by_op'] == want
    assert r['by_phase'] == {'one': want['all_reduce'] + 600, 'two': sum(want.values()) - want['all_reduce'] - 600}
    assert r['calls'] == {'all_reduce': 1, 'broadcast': 1, 'all_gather': 2, 'reduce_scatter': 1, 'all_to_all': 1,
                          'reduce': 1}

def test_lower_bound_per_stage():
    """Hand arithmetic, 4 ranks (f = 3/4), G of 1000 and auxiliary of 1200 parameters, fp32 gradients, bf16 gathers,
    2 micro-batches, 1 auxiliary step."""
    s = StepShape(params_g=1000, params_aux=1200, world=4, rounds=2, grad_bytes=4, param_bytes=2)
    assert lower_bound(0, s) == {'generator': 6000, 'auxiliary': 7200, 'total': 13200}          # 2 f P 4
    assert lower_bound(1, s) == {'generator': 4500, 'auxiliary': 5400, 'total': 9900}          # f P (4 + 2)
    # stage 2: the gradients of each of the 2 micro-batches reduce-scattered (2 f P 4), one gather (f P 2)
    assert lower_bound(2, s) == {'generator': 7500, 'auxiliary': 9000, 'total': 16500}
    # stage 3: 2 rounds x 2 phases of gathers (f P 2 each) + 2 rounds of gradient reduce-scatters (f P 4)
    assert lower_bound(3, s) == {'generator': 4 * 1500 + 2 * 3000, 'auxiliary': 4 * 1800 + 2 * 3600,
                                 'total': 12000 + 14400}
    two = StepShape(params_g=1000, params_aux=1200, world=4, aux_steps=2)                       # 2 auxiliary steps
    assert lower_bound(2, two)['auxiliary'] == 2 * 7200 and lower_bound(3, two)['generator'] == 3 * 3000 + 3000
    # 200 of G's parameters persistent: gathered once per step (f 200 4 = 600) instead of in each of the 3 phases
    kept = StepShape(params_g=1000, params_aux=1200, world=4, aux_steps=2, persistent_g=200)
    assert lower_bound(3, kept)['generator'] == 3 * (3000 - 600) + 600 + 3000

@pytest.mark.slow
@pytest.mark.parametrize('stage, rounds', [(1, 2), (2, 2), (3, 1)])
def test_bench_reports_collective_bytes_against_the_lower_bound(tmp_path, stage, rounds):
    """A 2-rank DeepSpeed toy benchmark: bench.json carries the measured bytes per rank by operation and by phase
    (which add up to the total) and the lower bound, which the measurement never beats; the EMA step moves nothing.
    Under stages 1 and 2 the gradients go to their owners by reduces (a reduce-scatter's bytes), not by all-reduces
    (twice that): within 1.5x of the bound."""
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                           str(REPO / 'launch.py'), 'task=bench', f'run.root={tmp_path}', 'run.name=b',
                           'engine.backend=deepspeed', f'engine.zero_stage={stage}', 'bench.warmup=1', 'bench.iters=1',
                           f'train.batch={4 * rounds}', 'train.batch_gpu=2',
                           'logging.wandb=disabled', 'logging.progress=false', 'model.net.model_channels=16'],
                          timeout=600, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'DS_ACCELERATOR': 'cpu'})
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads((tmp_path / 'b' / 'bench.json').read_text())
    total = r['comm_bytes_per_iter']
    assert total == sum(r['comm_bytes_by_op'].values()) == sum(r['comm_bytes_by_phase'].values())
    assert r['trained_params']['generator'] > 0 and r['trained_params']['auxiliary'] > r['trained_params']['generator']
    p = r['trained_params']
    assert r['comm_bytes_lower_bound'] == lower_bound(stage, StepShape(
        params_g=p['generator'], params_aux=p['auxiliary'], world=2, rounds=rounds,
        persistent_g=p['generator_persistent'], persistent_aux=p['auxiliary_persistent']))['total']
    assert (p['generator_persistent'] > 0) == (stage == 3)
    assert r['comm_bytes_lower_bound'] <= total
    if stage in (1, 2):
        assert total <= 1.5 * r['comm_bytes_lower_bound'], r['comm_bytes_by_op']
        assert r['comm_bytes_by_op'].get('all_reduce', 0) < 1024, r['comm_bytes_by_op']       # scalars only
    assert 'ema' not in r['comm_bytes_by_phase']                  # the EMA follows each rank's own elements

"""DeepSpeed engines in real processes (torchrun, gloo, DS_ACCELERATOR=cpu): ZeRO stages, 1 vs 2 ranks,
teacher offload, save/load resume. A teacher is pretrained once (tiny) and shared through the cache."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
LAUNCH = [sys.executable, str(REPO / 'launch.py')]
PROBE = REPO / 'tests' / 'helpers' / 'grad_probe.py'
BASE = ['task=train', 'engine.backend=deepspeed', 'pretrain.kimg=1', 'pretrain.batch=64', 'model.net.model_channels=16',
        'train.batch=16', 'train.log_kimg=0.016', 'train.checkpoint_kimg=0', 'logging.wandb=disabled',
        'logging.progress=false']

@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return tmp_path_factory.mktemp('engines')

def launch(root, name, *args, nproc=1):
    cmd = LAUNCH + ([f'--nproc={nproc}'] if nproc > 1 else []) + [f'run.root={root}', f'run.name={name}', *BASE, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300,
                         env={'OMP_NUM_THREADS': '1', **_env()})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out

def _env():
    import os
    return dict(os.environ)

def generator(root, name):
    return torch.load(root / name / 'generator.pt', weights_only=True)['state_dict']

def losses(root, name):
    return [(r['nimg'], r['loss/aux'], r['loss/gen'])
            for r in map(json.loads, (root / name / 'train.jsonl').read_text().splitlines())]

def assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)

@pytest.fixture(scope='module')
def toy_teacher(root):
    """The tiny toy teacher, pretrained once into the shared cache (ranks of a probe must not race to pretrain it)."""
    launch(root, 'pretrain', 'task=pretrain')

def run_probe(script, out, root, name, *args, nproc):
    """Run a tests/helpers probe on `nproc` ranks (torch.distributed.run) and load what rank 0 saved to `out`."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(script),
           str(out), f'run.root={root}', f'run.name={name}', *BASE, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300,
                          env={**_env(), 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return torch.load(out, weights_only=True)

def probe_grads(root, name, *args, nproc):
    """The all-reduced gradients of the first Eq. A1 and Eq. G1 micro-steps (tests/helpers/grad_probe.py)."""
    return run_probe(PROBE, root / f'{name}.pt', root, name, *args, nproc=nproc)

@pytest.mark.numeric
@pytest.mark.parametrize('stage', [1, 2, 3])
def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(root, toy_teacher, stage):
    """Same samples, times and noise per global index on 1 x 16 and 2 x 8: the gradients each optimiser receives are
    the same sums taken in another order. Compared before the optimiser, because Adam (beta1 = 0) turns rounding noise
    in near-zero gradient elements into full lr-sized steps. aux.t_embed=sum makes D_psi != D_phi at initialisation
    (with the gated embedding the first Eq. G1 gradient is exactly 0 up to rounding, ~1e-6 of the Eq. A1 one).
    Tolerance 1e-4 in norm: fp32 reduction-order noise is u sqrt(n) ~ 4e-6 per sum of n = 4096 terms (batch x pixels),
    compounded over at most 3 networks on the Eq. G1 path (measured <= 5e-6 on AVX-512 and AVX2, 1 and 2 threads),
    while a wrong data slice, seed or gradient average is an O(1) error."""
    args = [f'engine.zero_stage={stage}', 'aux.t_embed=sum']
    one = probe_grads(root, f'one-{stage}', *args, nproc=1)
    two = probe_grads(root, f'two-{stage}', *args, 'train.batch_gpu=8', nproc=2)
    assert one.keys() == two.keys() == {'aux: optimiser', 'gen: optimiser', 'g: master', 'g: ema', 'g: weight dtype'}
    for k in ('aux: optimiser', 'gen: optimiser'):
        assert one[k].norm() > 0, k
        error = ((one[k] - two[k]).norm() / one[k].norm()).item()
        assert error < 1e-4, (k, error)

@pytest.mark.numeric
@pytest.mark.parametrize('stage', [1, 3])
def test_bf16_weights_keep_fp32_masters_and_the_gradients(root, toy_teacher, stage):
    """engine.bf16_weights (precision=bf16, 2 ranks): the modules hold bf16 weights, while G's fp32 master weights and
    its EMA start from the fp32 initial values, bit for bit (not from their bf16 rounding; gathered from ZeRO-1
    fragments or ZeRO-3 partitions). The forward is unchanged (autocast feeds the same bf16 weights to the matmuls);
    the gradients change where autograd now works in bf16 (biases and norm gains, and through them the activations'
    gradients). Claim: that costs at most 4x the error bf16 autocast already makes against fp32 (measured 2.0x for
    Eq. A1, 2.7x for Eq. G1, whose small gradient is a difference of larger terms); a gradient taken at the wrong
    weights, reduced on a wrong slice or left unscaled is an O(1) error."""
    args = [f'engine.zero_stage={stage}', 'aux.t_embed=sum', 'train.batch_gpu=8']
    exact = probe_grads(root, f'fp32-{stage}', *args, nproc=2)
    autocast = probe_grads(root, f'autocast-{stage}', *args, 'engine.precision=bf16', 'engine.bf16_weights=false',
                           nproc=2)
    bf16 = probe_grads(root, f'bf16w-{stage}', *args, 'engine.precision=bf16', 'engine.bf16_weights=true', nproc=2)
    assert (exact['g: weight dtype'], autocast['g: weight dtype'], bf16['g: weight dtype']) == (
        'torch.float32', 'torch.float32', 'torch.bfloat16')
    for k in ('g: master', 'g: ema'):
        assert torch.equal(bf16[k], exact[k]), k
    for k in ('aux: optimiser', 'gen: optimiser'):
        ours, autocast_only = (((p[k] - exact[k]).norm() / exact[k].norm()).item() for p in (bf16, autocast))
        assert 0 < ours <= 4 * autocast_only, (k, ours, autocast_only)

def test_teacher_offload_and_resume_are_exact(root):
    args = ['engine.zero_stage=2', 'teacher.offload=cpu', 'train.batch_gpu=8']
    launch(root, 'straight', *args, 'train.kimg=0.096', nproc=2)
    launch(root, 'resumed', *args, 'train.kimg=0.048', nproc=2)
    out = launch(root, 'resumed', *args, 'train.kimg=0.096', nproc=2)
    assert 'resumed at 0.0 kimg' in out.stderr                 # 48 images = 3 steps of 16
    assert_close(generator(root, 'straight'), generator(root, 'resumed'), rtol=0, atol=0)
    assert losses(root, 'straight') == losses(root, 'resumed')

def test_batch_mismatch_is_a_clear_error(root):
    out = subprocess.run(LAUNCH + ['--nproc=2', f'run.root={root}', *BASE, 'train.batch=16', 'train.batch_gpu=3'],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert 'train.batch=16 must be a multiple of train.batch_gpu=3 x world size 2' in out.stderr

@pytest.fixture(scope='module')
def edm2_teacher(root):
    """A small random EDM2 teacher snapshot (gains away from 0, so every layer learns)."""
    from cosim_dist.nets import build_network
    from cosim_dist.teacher_io import save_snapshot
    torch.manual_seed(0)
    net = build_network('edm2', **EDM2_SMALL)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    save_snapshot(root / 'edm2-teacher.pt', net)
    return root / 'edm2-teacher.pt'

EDM2_SMALL = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[8])
EDM2_ARGS = ['model.arch=edm2', 'model.channels=4', 'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]',
             'train.lr_g=0.2', 'train.lr_aux=0.2', 'train.kimg=0.064', 'train.ema_halflife_kimg=0',
             'eval.every_kimg=0']          # a real teacher on the toy group: snapshots would need FID inputs

def mpconv_weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith('unet.') and k.endswith('.weight') and v.ndim in (2, 4)}

@pytest.mark.parametrize('stage', [2, 3])
def test_edm2_weight_normalisation_reaches_zero_master_weights(root, edm2_teacher, stage):
    """EDM2's forced weight normalisation after every step must reach ZeRO's fp32 master copy (and, under ZeRO-3, every
    partition); otherwise the next step restores unnormalised weights. With large Adam steps (lr 0.2, every element
    moves ~0.2) an unnormalised master would have row RMS ~1.04 per step; both the module (generator.pt, EMA = G here)
    and the master weights reassembled from the ZeRO checkpoint must have unit-RMS rows."""
    from cosim_dist.trainer import open_step_dir, saved_tensors
    name = f'edm2-zero{stage}'
    launch(root, name, f'model.teacher={edm2_teacher}', *EDM2_ARGS, f'engine.zero_stage={stage}', 'train.batch_gpu=8',
           nproc=2)
    [ckpt] = (root / name / 'checkpoints').glob('step-*')
    saved = saved_tensors(open_step_dir(ckpt), 'g/')[1]
    master = {k[:-len('/param')]: v for k, v in saved.items() if k.endswith('/param')}
    for state in (generator(root, name), master):
        weights = mpconv_weights(state)
        assert len(weights) > 20
        for k, w in weights.items():
            rms = w.square().mean(list(range(1, w.ndim)))
            torch.testing.assert_close(rms, torch.full_like(rms, 0.9998), atol=1e-3, rtol=0, msg=k)

@pytest.mark.parametrize('stage', [1, 3])
def test_bf16_weights_resume_is_exact(root, edm2_teacher, stage):
    """EDM2 with bf16 weights (precision=bf16, ZeRO 1 and 3): the checkpoint holds the fp32 masters, moments and EMA; a
    resume rounds the masters into the bf16 weights once, as DeepSpeed's step does after the weight normalisation ran
    inside it (zero.py `_project_inside_step`), so an interrupted run equals a straight one: same losses, same EMA.
    (lr 0.2 makes the losses chaotic: a weight one bf16 step off changes them after one step.)"""
    args = [f'model.teacher={edm2_teacher}', *EDM2_ARGS, f'engine.zero_stage={stage}', 'engine.precision=bf16',
            'engine.bf16_weights=true', 'train.batch_gpu=8', 'train.ema_halflife_kimg=0.05']
    launch(root, f'bf16-straight-{stage}', *args, nproc=2)                 # 4 steps of 16 (train.kimg=0.064)
    launch(root, f'bf16-resumed-{stage}', *args, 'train.kimg=0.032', nproc=2)
    out = launch(root, f'bf16-resumed-{stage}', *args, nproc=2)
    assert 'resumed at 0.0 kimg' in out.stderr
    assert_close(generator(root, f'bf16-straight-{stage}'), generator(root, f'bf16-resumed-{stage}'), rtol=0, atol=0)
    assert losses(root, f'bf16-straight-{stage}') == losses(root, f'bf16-resumed-{stage}')

#----------------------------------------------------------------------------
# Elastic resume: a checkpoint of N ranks resumes on M ranks (docs/ARCHITECTURE.md, "Checkpoints").

STATE_PROBE = REPO / 'tests' / 'helpers' / 'state_probe.py'

def probe_state(root, name, *args, nproc):
    """The training state as the engines hold it after resuming on `nproc` ranks (tests/helpers/state_probe.py)."""
    return run_probe(STATE_PROBE, root / f'{name}-state-{nproc}.pt', root, name, *args, nproc=nproc)

def assert_same_state(a: dict, b: dict) -> None:
    assert a['nimg'] == b['nimg'] and a['adam_step'] == b['adam_step'] and a['state'].keys() == b['state'].keys()
    for k in a['state']:
        assert torch.equal(a['state'][k], b['state'][k]), k          # resharding moves bytes; no arithmetic

@pytest.mark.parametrize('stage,sizes', [(0, (3,)), (1, (3,)), (3, (1, 3))])
def test_a_two_rank_checkpoint_resumes_on_other_world_sizes(root, toy_teacher, stage, sizes, request):
    """Written by 2 ranks, the state read back by 1 or 3 ranks equals, bit for bit, what 2 ranks read; each rank reads
    at most 1.2x its share of the shard bytes (its share plus at most two verification blocks). ZeRO-3 goes through
    the SeaweedFS S3 store and trains on with 3, then 4, then 1 rank(s); 4 writers store no more than 1."""
    name, args = f'elastic-{stage}', [f'engine.zero_stage={stage}', 'train.batch=48', 'train.log_kimg=0.048']
    if stage == 3:
        s3 = request.getfixturevalue('s3_env')
        args.append(f'checkpoint.url=s3://{s3.bucket}/{root.name}-{name}')
    launch(root, name, *args, 'train.kimg=0.096', nproc=2)               # 2 steps, checkpoint at the end
    written = probe_state(root, name, *args, 'train.kimg=0.096', nproc=2)
    assert written['nimg'] == 96 and written['adam_step'] == [2, 2]
    shard_bytes = sum(written['bytes_read'])                            # 2 ranks read everything once
    for m in sizes:
        resumed = probe_state(root, name, *args, 'train.kimg=0.096', nproc=m)
        assert_same_state(written, resumed)
        assert all(b <= 1.2 * shard_bytes / m for b in resumed['bytes_read']), (resumed['bytes_read'], shard_bytes)
    if stage == 3:     # trains on with 3, 4, then 1 rank(s): the state is stored once, whatever the number of writers
        from cosim_dist.build import default_staging
        from cosim_dist.checkpoint import CheckpointManager
        from cosim_dist.config import load_config
        out = launch(root, name, *args, 'train.kimg=0.144', nproc=3)
        assert 'resumed at 0.1 kimg' in out.stderr and 'written by 2 ranks' in out.stderr
        out = launch(root, name, *args, 'train.kimg=0.192', nproc=4)
        assert 'written by 3 ranks' in out.stderr
        out = launch(root, name, *args, 'train.kimg=0.240')
        assert 'written by 4 ranks' in out.stderr and [r[0] for r in losses(root, name)][-1] == 240
        ck = CheckpointManager(args[-1].split('=', 1)[1], root / 'unused')
        size = {n: sum(e['size'] for e in ck.open_step(n).files.values()) for n in (192, 240)}
        assert size[192] <= 1.1 * size[240], size                       # 4 writers vs 1 (indexes and meta.pt aside)
        staging = default_staging(load_config([f'run.root={root}', f'run.name={name}']))
        assert not [p for p in staging.rglob('*') if p.is_file()]        # nothing staged is left behind

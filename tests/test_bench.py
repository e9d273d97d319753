"""task=bench (cosim_dist/bench.py) and the speed options it measures: every option keeps one CoSIM iteration's losses
and gradients (Eq. A1 auxiliary step, Eq. G1 generator step) within tolerance of the fp32 reference path."""

import contextlib
import json

import pytest
import torch

from cosim_dist import tasks
from cosim_dist.bench import SyntheticStream
from cosim_dist.config import ConfigError, load_config

TINY = {
    'toy': ['model.net.channel_mult=[1]'],
    'songunet': ['model.net.augment_dim=9', 'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
    'dhariwalunet': ['model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
    'edm2': ['model.channels=4', 'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
}

def tiny_config(tmp_path, arch: str, *args: str):
    return load_config([f'model.arch={arch}', *TINY[arch], 'model.net.model_channels=16', 'model.net.dropout=0',
                        'train.batch=8', 'engine.backend=torch', 'logging.wandb=disabled', 'logging.progress=false',
                        f'run.root={tmp_path}', 'run.device=cpu', *args])

def random_teacher(cfg) -> torch.nn.Module:
    """Random weights with every gain away from 0 (EDM2 initialises some to 0, which would hide gradients)."""
    torch.manual_seed(0)
    net = tasks.new_network(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    return net

def iteration_grads(cfg) -> tuple[tuple[float, float], dict[str, torch.Tensor]]:
    """Losses of one Eq. L1 iteration and the gradients each optimiser receives (read at the optimiser phases)."""
    grads, trainer = {}, None

    def grab(phase: str):
        if phase.endswith('optimiser'):
            net = trainer.aux.module if phase.startswith('aux') else trainer.g.module
            grads[phase] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        return contextlib.nullcontext()
    m = cfg.model
    data = SyntheticStream((m.channels, m.resolution, m.resolution), m.label_dim, cfg.train.batch, m.sigma_data)
    tasks.prepare_run_dir(cfg)
    trainer = tasks.build_trainer(cfg, random_teacher(cfg), torch.device('cpu'), data=data, checkpoints=False, timer=grab)
    return trainer.iteration(), grads

def assert_same_step(ref, got, rtol: float, gen_rtol: float | None = None) -> None:
    """Losses and gradients of one iteration against the reference. The Eq. G1 gradient gets its own tolerance: it
    multiplies the difference of two denoisers (teacher minus auxiliary, nearly equal early in training), which is
    where reduced precision shows most (docs/benchmarks.md, "bf16 and Eq. G1")."""
    (ref_losses, ref_grads), (losses, grads) = ref, got
    assert grads.keys() == ref_grads.keys() == {'aux: optimiser', 'gen: optimiser'}
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=rtol, atol=0)
    if gen_rtol is None:
        torch.testing.assert_close(losses[1], ref_losses[1], rtol=rtol, atol=0)
    for k, tol in (('aux: optimiser', rtol), ('gen: optimiser', gen_rtol or rtol)):
        assert grads[k].norm() > 0
        error = ((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item()
        assert error <= tol, (k, error)
        assert torch.nn.functional.cosine_similarity(grads[k], ref_grads[k], dim=0) > 0.99, k

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The fp32 reference iteration of each architecture, computed once."""
    cache = {}
    def get(arch: str):
        if arch not in cache:
            cache[arch] = iteration_grads(tiny_config(tmp_path_factory.mktemp(arch), arch))
        return cache[arch]
    return get

@pytest.mark.parametrize('arch', sorted(set(TINY) - {'toy'}))
def test_bf16_keeps_losses_and_gradients(tmp_path, reference, arch):
    """bf16 autocast for G and aux and a bf16 teacher (the GPU configuration) against the fp32 path: Eq. A1 within 5%,
    Eq. G1 gradient within 30% and cosine > 0.99 (measured: 3-23% on these random nets)."""
    got = iteration_grads(tiny_config(tmp_path, arch, 'engine.precision=bf16', 'teacher.precision=bf16'))
    assert_same_step(reference(arch), got, rtol=0.05, gen_rtol=0.3)

@pytest.mark.parametrize('arch', sorted(set(TINY) - {'toy'}))
@pytest.mark.parametrize('option, rtol', [('engine.channels_last=true', 1e-4), ('engine.checkpointing=true', 1e-6)])
def test_layout_and_checkpointing_keep_losses_and_gradients(tmp_path, reference, arch, option, rtol):
    """NHWC and activation checkpointing (exact recomputation, dropout replayed) are fp32-exact up to summation order."""
    assert_same_step(reference(arch), iteration_grads(tiny_config(tmp_path, arch, option)), rtol)

@pytest.mark.slow
def test_torch_compile_keeps_losses_and_gradients(tmp_path, reference):
    """Inductor-compiled G, aux and teacher (the small toy UNet: compiling on 2 CPU cores is slow)."""
    assert_same_step(reference('toy'), iteration_grads(tiny_config(tmp_path, 'toy', 'engine.compile=default')), 1e-3)

def test_compile_refuses_zero3(tmp_path):
    with pytest.raises(ConfigError, match='engine.compile=default does not combine with ZeRO-3'):
        tiny_config(tmp_path, 'edm2', 'engine.compile=default', 'engine.backend=deepspeed', 'engine.zero_stage=3')

def test_bench_task_reports_phases_flops_and_memory(tmp_path):
    """FLOPs are counted, not assumed: doubling the batch doubles them; every phase of Eq. L1 is timed."""
    results = {}
    for name, args in {4: ['train.batch=4'], 8: ['train.batch=8'], 'ckpt': ['train.batch=8', 'engine.checkpointing=true']}.items():
        tasks.run(tiny_config(tmp_path, 'edm2', 'task=bench', *args, f'run.name=b{name}', 'bench.warmup=1', 'bench.iters=1'))
        results[name] = json.loads((tmp_path / f'b{name}' / 'bench.json').read_text())
    r = results[8]
    assert set(r['ms_per_phase']) == {'aux: generator (no grad)', 'aux: teacher', 'aux: forward', 'aux: backward',
                                      'aux: optimiser', 'gen: generator forward', 'gen: teacher', 'gen: aux forward',
                                      'gen: backward', 'gen: optimiser', 'ema'}
    assert r['images_per_s'] > 0 and r['peak_memory_gib'] > 0 and 0 < r['mfu'] < 1
    assert r['gflop_per_iteration'] == pytest.approx(2 * results[4]['gflop_per_iteration'], rel=0.02)
    assert r['activation_gib_per_rank'] == pytest.approx(2 * results[4]['activation_gib_per_rank'], rel=0.1)
    assert results['ckpt']['activation_gib_per_rank'] < 0.7 * r['activation_gib_per_rank']    # recomputed, not kept

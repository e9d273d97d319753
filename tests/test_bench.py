"""task=bench (cosim_dist/bench.py) and the speed options it measures: every option keeps one CoSIM iteration's losses
and gradients (Eq. A1 auxiliary step, Eq. G1 generator step) within tolerance of the fp32 reference path. Each
tolerance follows from the option's error model: fp32 reassociation for layout and recomputation, bf16 rounding
(u = 2^-8) times the conditioning of the loss for autocast."""

import contextlib
import json

import pytest
import torch

from cosim_dist import build, cosim, tasks
from cosim_dist.bench import SyntheticStream
from cosim_dist.config import ConfigError, load_config

TINY = {
    'toy': ['model.net.channel_mult=[1]'],
    'songunet': ['model.net.augment_dim=9', 'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
    'dhariwalunet': ['model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
    'edm2': ['model.channels=4', 'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]'],
}

def tiny_config(tmp_path, arch: str, *args: str):
    """train.lr_aux=1e-2: the auxiliary's first Adam step moves it well away from the teacher, so that D_phi - D_psi in
    Eq. G1 is not a difference of nearly equal denoisers (conditioning <= ~6 instead of 15-220 at lr 1e-4)."""
    return load_config([f'model.arch={arch}', *TINY[arch], 'model.net.model_channels=16', 'model.net.dropout=0',
                        'train.batch=8', 'train.lr_aux=1e-2', 'engine.backend=torch', 'logging.wandb=disabled',
                        'logging.progress=false', f'run.root={tmp_path}', 'run.device=cpu', *args])

def random_teacher(cfg) -> torch.nn.Module:
    """Random weights with every gain away from 0 (EDM2 initialises some to 0, which would hide gradients)."""
    torch.manual_seed(0)
    net = build.new_network(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    return net

def iteration_grads(cfg) -> tuple[tuple[float, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of one Eq. L1 iteration, the gradients each optimiser receives (read at the optimiser phases) and the
    denoiser outputs entering the Eq. A1 / G1 losses (recorded on their way in; the real loss functions run)."""
    grads, seen, trainer = {}, {}, None

    def grab(phase: str):
        if phase.endswith('optimiser'):
            net = trainer.aux.module if phase.startswith('aux') else trainer.g.module
            grads[phase] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        return contextlib.nullcontext()

    def aux_loss(D_psi, target, D_phi, *args, **kwargs):
        seen.update(aux_D_psi=D_psi.detach(), aux_target=target.detach(), aux_D_phi=D_phi.detach())
        return real_aux_loss(D_psi, target, D_phi, *args, **kwargs)

    def generator_loss(target, D_phi, D_psi, *args, **kwargs):
        seen.update(gen_D_phi=D_phi.detach(), gen_D_psi=D_psi.detach())
        return real_generator_loss(target, D_phi, D_psi, *args, **kwargs)
    real_aux_loss, real_generator_loss = cosim.aux_loss, cosim.generator_loss
    m = cfg.model
    data = SyntheticStream((m.channels, m.resolution, m.resolution), m.label_dim, cfg.train.batch, m.sigma_data)
    build.prepare_run_dir(cfg)
    trainer = build.build_trainer(cfg, random_teacher(cfg), torch.device('cpu'), data=data, checkpoints=False,
                                  timer=grab)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cosim, 'aux_loss', aux_loss)
        patch.setattr(cosim, 'generator_loss', generator_loss)
        losses = trainer.iteration()
    return losses, grads, seen

def relative_error(got: torch.Tensor | float, ref: torch.Tensor | float) -> float:
    """||got - ref|| / ||ref|| as a Python float."""
    got, ref = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return float((got - ref).norm() / ref.norm())

def assert_same_step(ref, got, rtol: float) -> None:
    """Losses and gradients of one iteration against the reference, each within `rtol` (relative, in norm)."""
    (ref_losses, ref_grads, _), (losses, grads, _) = ref, got
    assert grads.keys() == ref_grads.keys() == {'aux: optimiser', 'gen: optimiser'}
    for name, a, b in (('loss/aux', losses['loss/aux'], ref_losses['loss/aux']),
                       ('loss/gen', losses['loss/gen'], ref_losses['loss/gen']),
                       *((k, grads[k], ref_grads[k]) for k in grads)):
        assert float(torch.as_tensor(b).norm()) > 0, name
        assert relative_error(a, b) <= rtol, (name, relative_error(a, b), rtol)

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The fp32 reference iteration of each architecture, computed once."""
    cache = {}
    def get(arch: str):
        if arch not in cache:
            cache[arch] = iteration_grads(tiny_config(tmp_path_factory.mktemp(arch), arch))
        return cache[arch]
    return get

BF16_U = 2.0 ** -8     # bf16 unit roundoff: 8 significant bits

@pytest.mark.numeric
@pytest.mark.parametrize('arch', sorted(set(TINY) - {'toy'}))
def test_bf16_keeps_losses_and_gradients(tmp_path, reference, arch):
    """bf16 autocast for G and aux and a bf16 teacher (the GPU configuration) against the fp32 path, bounded by the bf16
    rounding model. (1) Each denoiser output entering the losses is within 16u: a bf16 layer rounds its inputs to
    relative u, and independent roundings over the <= 64 layers on a path (generator, then teacher or auxiliary) add up
    to sqrt(64) u = 8u; 2x margin (measured 0.8-9.5u on AVX-512 and AVX2). (2) A loss and its gradient depend on the
    difference of two such outputs (Eq. A1: D_psi minus the blended target; Eq. G1: D_phi - D_psi), whose relative
    error is at most eps (|a| + |b|) / |a - b| <= eps (2 kappa + 1) with kappa = |a| / |a - b| from the fp32
    reference and eps the measured output error of (1); the backward pass adds another eps, inside the '+ 1'."""
    ref, got = reference(arch), iteration_grads(tiny_config(tmp_path, arch, 'engine.precision=bf16',
                                                            'teacher.precision=bf16'))
    (ref_losses, ref_grads, ref_seen), (losses, grads, seen) = ref, got
    eps = max(relative_error(seen[k], ref_seen[k]) for k in ('aux_D_psi', 'aux_D_phi', 'gen_D_phi', 'gen_D_psi'))
    assert eps <= 16 * BF16_U, (eps, 16 * BF16_U)
    lmbda = tiny_config(tmp_path, arch).loss.lmbda
    blended = (ref_seen['aux_target'] + lmbda * ref_seen['aux_D_phi']) / (1 + lmbda)
    kappa_aux = float(ref_seen['aux_D_psi'].norm() / (ref_seen['aux_D_psi'] - blended).norm())
    kappa_gen = float(ref_seen['gen_D_phi'].norm() / (ref_seen['gen_D_phi'] - ref_seen['gen_D_psi']).norm())
    for name, a, b, kappa in (('loss/aux', losses['loss/aux'], ref_losses['loss/aux'], kappa_aux),
                              ('loss/gen', losses['loss/gen'], ref_losses['loss/gen'], kappa_gen),
                              ('aux grad', grads['aux: optimiser'], ref_grads['aux: optimiser'], kappa_aux),
                              ('gen grad', grads['gen: optimiser'], ref_grads['gen: optimiser'], kappa_gen)):
        bound = eps * (2 * kappa + 1)
        assert relative_error(a, b) <= bound, (name, relative_error(a, b), bound, kappa, eps)

@pytest.mark.numeric
@pytest.mark.parametrize('arch', sorted(set(TINY) - {'toy'}))
@pytest.mark.parametrize('option, rtol', [('engine.channels_last=true', 1e-4), ('engine.checkpointing=true', 1e-6)])
def test_layout_and_checkpointing_keep_losses_and_gradients(tmp_path, reference, arch, option, rtol):
    """NHWC and activation checkpointing (exact recomputation, dropout replayed) are fp32-exact up to summation order.
    NHWC: another convolution algorithm reassociates every conv sum (~u32 sqrt(n), n <= 16 x 9 x 64 terms, ~1e-5 per
    layer before cancellation in the loss differences), hence 1e-4; checkpointing recomputes the same kernels on the
    same inputs, so only the backward's accumulation order may change: 1e-6."""
    assert_same_step(reference(arch), iteration_grads(tiny_config(tmp_path, arch, option)), rtol)

@pytest.mark.slow
def test_torch_compile_keeps_losses_and_gradients(tmp_path, reference):
    """Inductor-compiled G, aux and teacher (the small toy UNet: compiling on 2 CPU cores is slow). Inductor fuses and
    reorders fp32 reductions (and may use other conv/matmul kernels) throughout forward and backward: 1e-3, ten times
    the layout tolerance, for the fused pointwise chains whose intermediate roundings differ too."""
    assert_same_step(reference('toy'), iteration_grads(tiny_config(tmp_path, 'toy', 'engine.compile=default')), 1e-3)

def test_compile_refuses_zero3(tmp_path):
    with pytest.raises(ConfigError, match='engine.compile=default does not combine with ZeRO-3'):
        tiny_config(tmp_path, 'edm2', 'engine.compile=default', 'engine.backend=deepspeed', 'engine.zero_stage=3')

def test_bench_task_reports_phases_flops_and_memory(tmp_path):
    """FLOPs are counted, not assumed: doubling the batch doubles them; every phase of Eq. L1 is timed."""
    results = {}
    for name, args in {4: ['train.batch=4'], 8: ['train.batch=8'],
                       'ckpt': ['train.batch=8', 'engine.checkpointing=true']}.items():
        tasks.run(tiny_config(tmp_path, 'edm2', 'task=bench', *args, f'run.name=b{name}', 'bench.warmup=1',
                              'bench.iters=1'))
        results[name] = json.loads((tmp_path / f'b{name}' / 'bench.json').read_text())
    r = results[8]
    assert set(r['ms_per_phase']) == {'aux: generator (no grad)', 'aux: teacher', 'aux: forward', 'aux: backward',
                                      'aux: optimiser', 'gen: generator forward', 'gen: teacher', 'gen: aux forward',
                                      'gen: backward', 'gen: optimiser', 'ema'}
    assert r['images_per_s'] > 0 and r['peak_memory_gib'] > 0 and 0 < r['mfu'] < 1
    assert r['gflop_per_iteration'] == pytest.approx(2 * results[4]['gflop_per_iteration'], rel=0.02)
    assert r['activation_gib_per_rank'] == pytest.approx(2 * results[4]['activation_gib_per_rank'], rel=0.1)
    assert results['ckpt']['activation_gib_per_rank'] < 0.7 * r['activation_gib_per_rank']    # recomputed, not kept

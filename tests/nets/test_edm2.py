"""EDM2 teachers (cosim_dist/nets/edm2.py): official parameter counts and names, magnitude preservation of the
primitives, the logvar head, and forced weight normalisation as a post-step function."""

import copy
import math

import pytest
import torch

from cosim_dist.engines import TorchEngine
from cosim_dist.nets import build_network, weight_constraint
from cosim_dist.nets.edm2 import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

SMALL = dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[8])

#----------------------------------------------------------------------------
# Architecture facts (docs/ALGORITHM.md, "Reference facts"): ImageNet-512 latents 4x64x64, 1000 classes.

PRESETS = {  # model_channels -> parameters of edm2-img512-{xxs..xxl}
    64: 31_309_029, 128: 124_713_253, 192: 280_212_837, 256: 497_807_781, 320: 777_498_085, 384: 1_119_283_749,
    448: 1_523_164_773,
}

@pytest.mark.parametrize('channels', PRESETS)
def test_preset_parameter_counts(channels):
    with torch.device('meta'):
        net = build_network('edm2', img_resolution=64, img_channels=4, label_dim=1000, model_channels=channels)
    assert sum(p.numel() for p in net.parameters()) == PRESETS[channels]

def test_state_dict_names_s():
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in build_network('edm2', img_resolution=64, img_channels=4, label_dim=1000,
                                                        model_channels=192).state_dict().items()}
    assert len(shapes) == 203            # 199 parameters + emb_fourier and logvar_fourier freqs, phases
    expected = {
        'unet.out_gain': (), 'unet.emb_fourier.freqs': (192,), 'unet.emb_noise.weight': (768, 192),
        'unet.emb_label.weight': (768, 1000), 'unet.enc.64x64_conv.weight': (192, 5, 3, 3),
        'unet.out_conv.weight': (4, 192, 3, 3), 'logvar_fourier.phases': (128,), 'logvar_linear.weight': (1, 128),
        'unet.enc.32x32_down.emb_gain': (), 'unet.enc.32x32_block0.conv_skip.weight': (384, 192, 1, 1),
        'unet.enc.16x16_block2.attn_qkv.weight': (1728, 576, 1, 1),
        'unet.dec.8x8_in0.attn_proj.weight': (768, 768, 1, 1),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert 'unet.dec.8x8_in1.attn_qkv.weight' not in shapes and 'unet.enc.32x32_down.attn_qkv.weight' not in shapes
    skip_in = {r: [shapes[f'unet.dec.{r}x{r}_block{i}.conv_skip.weight'][1] for i in range(4)] for r in (8, 16, 32, 64)}
    assert skip_in == {8: [1536, 1536, 1536, 1344], 16: [1344, 1152, 1152, 960], 32: [960, 768, 768, 576],
                       64: [576, 384, 384, 384]}

#----------------------------------------------------------------------------
# Magnitude preservation: unit-variance in, unit-variance out.

BF16_U = 2.0 ** -8     # bf16 unit roundoff

def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()

def rms_se(x: torch.Tensor) -> float:
    """Monte-Carlo standard error of rms(x) when the rows x[i] are independent draws: sd_i(mean square of row i) /
    (2 rms sqrt(rows)), the delta method."""
    ms = x.double().square().flatten(1).mean(1)
    return float(ms.std() / (2 * ms.mean().sqrt() * math.sqrt(len(ms))))

def test_magnitude_preserving_primitives():
    """Unit RMS within 5 Monte-Carlo standard errors (about 5e-3 here; was abs 0.01 and 0.02), plus for mp_silu the
    rounding of its constant to 0.596 (E[silu(x)^2]^1/2 = 0.59647: 8e-4)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, 8, 8, generator=gen), torch.randn(64, 128, 8, 8, generator=gen)
    # normalize divides by eps + rms (eps = 1e-4): mean square 1 - 2 eps / 7 = 1 - 2.9e-5, and the fp32 sum of 16384
    # squares rounds by ~log2(16384) u32 = 1e-6: atol=5e-5 (was 1e-3)
    torch.testing.assert_close(normalize(a * 7).square().mean([1, 2, 3]), torch.ones(64), atol=5e-5, rtol=0)
    assert rms(mp_silu(a)) == pytest.approx(1, abs=8e-4 + 5 * rms_se(mp_silu(a)))
    for t in (0.3, 0.5, 0.8):
        assert rms(mp_sum(a[:, :128], b, t)) == pytest.approx(1, abs=5 * rms_se(mp_sum(a[:, :128], b, t)))
        assert rms(mp_cat(a, b, t)) == pytest.approx(1, abs=5 * rms_se(mp_cat(a, b, t)))
    y = MPFourier(4096)(torch.randn(64, generator=gen))
    assert rms(y) == pytest.approx(1, abs=5 * rms_se(y.T))      # the independent draws are the channels' (freq, phase)

@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mpconv_preserves_magnitude(kernel):
    torch.manual_seed(0)
    conv = MPConv(256, 128, kernel)
    with torch.no_grad():
        conv.weight.mul_(5)                                  # the stored scale does not matter
    x = torch.randn(64, 256) if not kernel else torch.randn(8, 256, 32, 32)
    y = conv(x)
    inner = y if not kernel else y[:, :, 1:-1, 1:-1]         # zero padding shrinks the border
    # Monte-Carlo error: unit-norm weights make every output N(0, 1), so rms has standard error 1 / sqrt(2 n); 5 of them
    # (0.039 for the 8192 outputs of the linear layer, where abs=0.03 was 3.8 standard errors)
    assert rms(inner) == pytest.approx(1, abs=5 / math.sqrt(2 * inner.numel()))
    assert torch.equal(conv(x, gain=0.5), 0.5 * y)           # exact: halving the weights halves every product and sum

#----------------------------------------------------------------------------
# Preconditioning and logvar head.

def test_forward_and_logvar():
    torch.manual_seed(0)
    net = build_network('edm2', **SMALL).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)                                 # out_gain = 0 at init would make D = c_skip x exactly
    x, sigma = torch.randn(3, 4, 16, 16), torch.tensor([0.1, 1.0, 10.0])
    D, logvar = net(x, sigma, return_logvar=True)
    assert D.shape == x.shape and logvar.shape == (3, 1, 1, 1) and D.dtype == logvar.dtype == torch.float32
    assert torch.equal(D, net(x, sigma))
    c_noise = sigma.log() / 4
    assert torch.equal(logvar.flatten(), net.logvar_linear(net.logvar_fourier(c_noise)).flatten())  # exact: same ops
    D16 = net.to(torch.bfloat16)(x, sigma)                   # a bf16 teacher still returns fp32
    assert D16.dtype == torch.float32
    # bf16 rounding model (as tests/test_bench.py): c_skip x stays fp32 and the UNet output c_out F is within
    # sqrt(L) u = 8u in norm for <= 64 layers, 2x margin: 16u per sample (measured 1.6-6.6u; was atol=0.1 on D)
    F = D - net.sigma_data ** 2 / (sigma ** 2 + net.sigma_data ** 2).reshape(-1, 1, 1, 1) * x
    assert ((D16 - D).flatten(1).norm(dim=1) / F.flatten(1).norm(dim=1)).max().item() <= 16 * BF16_U

def test_post_step_weight_normalisation_equals_in_forward_normalisation():
    """The official MPConv overwrites its weight with normalize(weight) at the start of every training forward. Ours
    leaves forward pure and its engines apply the weight constraint before training and after each optimiser step.
    Both see the same weights at every forward, so outputs, gradients and updates agree bit for bit."""
    torch.manual_seed(0)
    ours = build_network('edm2', **SMALL).train()
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 0:
                p.fill_(0.5)                                 # gains away from 0, so every layer gets gradients
    official = copy.deepcopy(ours)

    @torch.no_grad()
    def force_normalize(m: MPConv, args: tuple) -> None:    # the official in-forward write (Eq. 66)
        if m.training:
            m.weight.copy_(normalize(m.weight.float()))
    for m in official.modules():
        if isinstance(m, MPConv):
            m.register_forward_pre_hook(force_normalize)
    engine = TorchEngine(ours, 0.05, (0.9, 0.999), 1e-8, constraint=weight_constraint(ours))   # normalises once
    opt_official = torch.optim.Adam(official.parameters(), lr=0.05)
    x, sigma, labels = torch.randn(4, 4, 16, 16), torch.tensor([0.2, 0.7, 2.0, 9.0]), torch.eye(10)[:4]
    edm2_loss = lambda out: (out[0].square() / out[1].exp() + out[1]).mean()
    for _ in range(3):
        out_ours, out_official = (ours(x, sigma, labels, return_logvar=True),
                                  official(x, sigma, labels, return_logvar=True))
        assert all(torch.equal(a, b) for a, b in zip(out_ours, out_official))
        engine.backward(edm2_loss(out_ours))
        engine.step()                                        # Adam step, then the constraint
        opt_official.zero_grad()
        edm2_loss(out_official).backward()
        opt_official.step()
    official(x, sigma, labels, return_logvar=True)           # the official net normalises at its next forward
    for (name, p), q in zip(ours.named_parameters(), official.parameters()):
        assert torch.equal(p, q), name
    w = ours.unet.enc['8x8_block0'].conv_res0.weight
    # normalize divides by eps + rms (eps = 1e-4; rms ~ 1.001 after the lr-0.05 steps): mean square (1 + 1e-4)^-2 up to
    # 3e-7, and ~log2(576) u32 = 6e-7 of fp32 summation: atol=1e-5 around that (was 1e-3 around 1)
    torch.testing.assert_close(w.square().mean([1, 2, 3]), torch.full([w.shape[0]], (1 + 1e-4) ** -2),
                               atol=1e-5, rtol=0)

def test_normalize_scale_is_normalize_from_row_sums():
    """normalize_scale (what ZeRO-3 applies to partitions from all-reduced per-row sums of squares) scales every row as
    normalize does, within fp32 rounding of a 576-term sum (relative 1e-6)."""
    from cosim_dist.nets.edm2 import normalize, normalize_scale
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    scale = normalize_scale(w.square().sum([1, 2, 3]), w[0].numel())
    torch.testing.assert_close(w * scale[:, None, None, None], normalize(w), rtol=1e-6, atol=0)

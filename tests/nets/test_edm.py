"""EDM teachers (cosim_dist/nets/edm.py): official parameter counts and names, and the denoiser contract."""

import math

import pytest
import torch

from cosim_dist.nets import build_network

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

def meta_params(arch: str, **kwargs) -> tuple[int, dict[str, torch.Size]]:
    with torch.device('meta'):
        net = build_network(arch, **kwargs)
    return sum(p.numel() for p in net.parameters()), {k: v.shape for k, v in net.state_dict().items()}

DDPMPP = dict(img_resolution=32, img_channels=3, augment_dim=9, model_channels=128, channel_mult=[2, 2, 2],
              dropout=0.13)
ADM = dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
           dropout=0.1)
SMALL = {
    'songunet': dict(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, model_channels=32,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.13),
    'dhariwalunet': dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[8]),
}

#----------------------------------------------------------------------------
# Architecture facts (docs/ALGORITHM.md, "Reference facts").

def test_ddpmpp_cifar10_parameters_and_names():
    n, shapes = meta_params('songunet', label_dim=0, **DDPMPP)
    assert n == 55_733_891                                   # 55.7M, edm-cifar10-32x32-uncond-vp.pkl
    assert meta_params('songunet', label_dim=10, **DDPMPP)[0] == 55_733_891 + 10 * 128 + 128   # + map_label (cond)
    assert len(shapes) == 425 and all(k.startswith('model.') for k in shapes)
    assert shapes['model.map_augment.weight'] == (128, 9) and 'model.map_augment.bias' not in shapes
    assert shapes['model.map_layer0.weight'] == (512, 128) and shapes['model.map_layer1.weight'] == (512, 512)
    assert shapes['model.dec.32x32_aux_conv.weight'] == (3, 256, 3, 3)
    assert shapes['model.enc.16x16_down.conv0.resample_filter'] == (1, 1, 2, 2)
    assert shapes['model.enc.16x16_down.skip.weight'] == (256, 256, 1, 1)          # resample_proj
    assert 'model.enc.32x32_block1.conv0.resample_filter' not in shapes
    assert [f'model.dec.16x16_block{i}.qkv.weight' in shapes for i in range(5)] == [False] * 4 + [True]
    assert shapes['model.dec.8x8_in0.qkv.weight'] == (768, 256, 1, 1) and 'model.dec.8x8_in0.qkv.bias' in shapes

def test_adm_imagenet64_parameters_and_names():
    n, shapes = meta_params('dhariwalunet', **ADM)
    assert n == 295_899_267                                  # 295.9M, edm-imagenet-64x64-cond-adm.pkl
    assert shapes['model.map_label.weight'] == (768, 1000) and 'model.map_label.bias' not in shapes
    assert shapes['model.enc.32x32_down.affine.weight'] == (384, 768)                # scale and shift
    assert shapes['model.enc.32x32_down.skip.resample_filter'] == (1, 1, 2, 2)      # no projection: filter only
    assert 'model.enc.32x32_down.skip.weight' not in shapes
    assert shapes['model.dec.8x8_block0.qkv.weight'] == (2304, 768, 1, 1)
    assert shapes['model.out_conv.weight'] == (3, 192, 3, 3) and 'model.out_norm.weight' in shapes

#----------------------------------------------------------------------------
# The denoiser contract of cosim_dist.nets.

@pytest.mark.parametrize('arch', SMALL)
def test_forward_contract(arch):
    torch.manual_seed(0)
    net = build_network(arch, **SMALL[arch]).eval()
    assert build_network(arch, **net.init_kwargs).state_dict().keys() == net.state_dict().keys()
    x = torch.randn(3, 3, 16, 16)
    D = net(x, torch.tensor([0.1, 1.0, 10.0]))
    assert D.shape == x.shape and D.dtype == torch.float32
    # exact: the same kernels on the same inputs
    assert torch.equal(D, net(x, torch.tensor([0.1, 1.0, 10.0]), torch.zeros(3, 10)))   # None = zero labels
    assert torch.equal(net(x[:1], 0.5), net(x[:1], torch.tensor([0.5])))               # scalar sigma
    with pytest.raises(ValueError, match='logvar'):
        net(x, 1.0, return_logvar=True)
    with pytest.raises(ValueError, match='sigma_t'):
        net(x, 1.0, sigma_t=2.0)
    with pytest.raises(ValueError, match='aux_t_embed'):
        build_network(arch, **SMALL[arch], aux_t_embed='concat')

@pytest.mark.parametrize('arch', SMALL)
def test_low_precision_parameters(arch):
    """A teacher cast to bf16 (teacher.dtype=bf16) runs its UNet in bf16 and still returns fp32 D. bf16 rounding model
    (as tests/test_bench.py): c_skip x stays fp32 and the UNet output c_out F is within sqrt(L) u = 8u in norm for <= 64
    layers, 2x margin: 16u per sample (measured 2.3-5.5u; was atol=0.1 on D)."""
    torch.manual_seed(0)
    net = build_network(arch, **SMALL[arch]).eval()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0])
    D = net.to(torch.bfloat16)(x, sigma)
    assert D.dtype == torch.float32
    ref = net.float()(x, sigma)
    F = ref - net.sigma_data ** 2 / (sigma ** 2 + net.sigma_data ** 2).reshape(-1, 1, 1, 1) * x
    assert ((D - ref).flatten(1).norm(dim=1) / F.flatten(1).norm(dim=1)).max().item() <= 16 * 2.0 ** -8

def test_fused_attention_equals_the_reference_formula():
    """Both UNet families use the fused kernel; it must equal EDM's fp32 einsum formula (docs/ALGORITHM.md)."""
    from cosim_dist.nets.edm import attention
    q, k, v = torch.randn(3, 2, 16, 64, dtype=torch.float64).unbind(0)          # [N, c, HW]
    w = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(k.shape[1])).softmax(dim=2)
    # float64: ~100 roundings (16-term logits, 64-term softmax and weighted sum; u64 = 1.1e-16) of values <= ~5:
    # < 1e-13, so atol=1e-12 (was 1e-10 and rtol 1e-10)
    torch.testing.assert_close(attention(q, k, v), torch.einsum('nqk,nck->ncq', w, v), rtol=0, atol=1e-12)

"""The auxiliary of every teacher architecture (cosim_dist/nets/aux.py on edm.py and edm2.py): the second noise
embedding for sigma_t, gated (function-preserving at initialisation) or summed."""

import pytest
import torch

from cosim_dist.nets import build_network
from cosim_dist.nets.aux import make_auxiliary

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

SMALL = {
    'songunet': dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[8], augment_dim=9),
    'dhariwalunet': dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[8]),
    'edm2': dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8]),
}

def random_teacher(arch: str) -> torch.nn.Module:
    """A small teacher with every parameter random (zero-initialised gains would hide the label and noise paths)."""
    torch.manual_seed(0)
    net = build_network(arch, **SMALL[arch]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net

def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||. Two networks differ when this is > 1e-4: 200x the fp32 rounding of one network's output
    (sqrt(64 layers) u32 = 5e-7), 1/80 of the smallest difference measured here (8e-3)."""
    return float((a - b).detach().norm() / b.detach().norm())

def inputs(net: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, net.img_channels, 16, 16, generator=gen)
    sigma_s = torch.exp(torch.randn(4, generator=gen))
    return x, sigma_s, sigma_s * 3, torch.eye(10)[[0, 3, 3, 9]]

@pytest.mark.parametrize('arch', SMALL)
def test_gated_auxiliary_equals_teacher_at_init(arch):
    teacher = random_teacher(arch)
    aux = make_auxiliary(teacher, 'gated')
    x, s, t, c = inputs(teacher)
    assert torch.equal(aux(x, s, c, sigma_t=t), teacher(x, s, c))
    if teacher.has_logvar:                                   # the EDM2 auxiliary keeps the logvar head
        assert torch.equal(aux(x, s, c, sigma_t=t, return_logvar=True)[1], teacher(x, s, c, return_logvar=True)[1])
    gains = [name for name, p in aux.named_parameters() if name.split('.')[-1] == 't_gain']
    assert len(gains) == 1 and aux.get_parameter(gains[0]).item() == 0
    with torch.no_grad():
        aux.get_parameter(gains[0]).fill_(1)                 # once the gate opens, sigma_t matters
    assert relative_change(aux(x, s, c, sigma_t=t), aux(x, s, c, sigma_t=2 * t)) > 1e-4
    with pytest.raises(ValueError, match='sigma_t'):
        aux(x, s, c)

@pytest.mark.parametrize('arch', SMALL)
def test_sum_auxiliary_copies_teacher_embedding(arch):
    teacher = random_teacher(arch)
    aux = make_auxiliary(teacher, 'sum')
    state, teacher_state = aux.state_dict(), teacher.state_dict()
    assert not [k for k in state if k.split('.')[-1] == 't_gain']
    assert set(state) - set(teacher_state) == {k for k in state
                                               if any(k.startswith(p + '.') for p in aux.T_EMBED_SOURCES)}
    for dst, src in aux.T_EMBED_SOURCES.items():
        copied = [k for k in state if k.startswith(dst + '.')]
        assert copied and all(torch.equal(state[k], teacher_state[src + k[len(dst):]]) for k in copied)
    x, s, t, c = inputs(teacher)
    assert relative_change(aux(x, s, c, sigma_t=t), teacher(x, s, c)) > 1e-4   # E(s) + E(t): a different function
    assert build_network(arch, **aux.init_kwargs).state_dict().keys() == state.keys()

@pytest.mark.parametrize('arch', [*SMALL, 'toy'])
def test_gate_of_shape_one_keeps_bf16_autocast_working(arch):
    """ZeRO-3 stores every 0-dim parameter with shape [1] (engines._share_scalar_parameters); a dimensioned fp32 gate
    used to promote the bf16 sigma_t embedding to fp32 and EDM2's mp_sum (lerp) then failed on mixed dtypes. With the
    gate of shape [1] the bf16 auxiliary runs and gives exactly what the 0-dim gate gives."""
    teacher = random_teacher(arch) if arch != 'toy' else build_network('toy', img_resolution=16, img_channels=3,
                                                                      label_dim=10, model_channels=16).eval()
    aux = make_auxiliary(teacher, 'gated')
    x, s, t, c = inputs(teacher)
    gain = next(p for name, p in aux.named_parameters() if name.endswith('t_gain'))
    with torch.no_grad():
        gain.fill_(0.7)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        scalar = aux(x, s, c, sigma_t=t)
        gain.data = gain.data.reshape(1)
        assert torch.equal(aux(x, s, c, sigma_t=t), scalar)

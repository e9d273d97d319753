"""cosim_dist/zero.py in one process: the frozen teacher's placement (the DeepSpeed engines run under torchrun in
tests/test_engines.py)."""

import copy

import pytest
import torch

from cosim_dist.config import TeacherConfig
from cosim_dist.nets import build_network
from cosim_dist.zero import place_teacher

BF16_U = 2.0 ** -8     # bf16 unit roundoff: 8 significant bits
NETS = {'toy': dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=16),
        'edm2': dict(img_resolution=16, img_channels=4, label_dim=3, model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[8])}

@pytest.mark.parametrize('arch', sorted(NETS))
def test_a_bf16_teacher_keeps_its_buffers_as_built(arch):
    """teacher.precision=bf16 casts the parameters only: the Fourier frequencies and phases (buffers) stay fp32 and
    bit-exact, so the noise embedding is computed as built; the forward runs without autocast and returns fp32
    within the bf16 rounding model of tests/nets/test_edm2.py (16u of the network's output c_out F per sample)."""
    torch.manual_seed(0)
    net = build_network(arch, **NETS[arch]).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)                                 # EDM2's gains away from 0: F is not identically 0
    reference = copy.deepcopy(net)
    placed = place_teacher(net, TeacherConfig(precision='bf16'), torch.device('cpu'), world_size=1)
    assert {p.dtype for p in placed.parameters()} == {torch.bfloat16} and not placed.training
    built = dict(reference.named_buffers())
    assert len(built) > 0
    for name, b in placed.named_buffers():
        assert b.dtype == torch.float32 and torch.equal(b, built[name]), name
    c = NETS[arch]['img_channels']
    x, sigma, labels = torch.randn(3, c, NETS[arch]['img_resolution'], NETS[arch]['img_resolution']), \
        torch.tensor([0.05, 1.0, 20.0]), torch.eye(3)
    with torch.no_grad():
        D, D16 = reference(x, sigma, labels), placed(x, sigma, labels)
    assert D16.dtype == torch.float32
    F = D - reference.sigma_data ** 2 / (sigma ** 2 + reference.sigma_data ** 2).reshape(-1, 1, 1, 1) * x
    assert ((D16 - D).flatten(1).norm(dim=1) / F.flatten(1).norm(dim=1)).max().item() <= 16 * BF16_U

"""cosim_dist/ema.py on one process (the ZeRO-3 partitions are exercised by tests/test_engines.py's DeepSpeed runs):
the EMA's elements are views of the EMA network, and an update equals Eq. L1's EMA of the whole networks."""

import torch

from cosim_dist import cosim
from cosim_dist.ema import GeneratorEMA
from cosim_dist.engines import TorchEngine
from cosim_dist.nets import build_network

def test_ema_on_whole_parameters_is_the_network_ema():
    torch.manual_seed(0)
    G = build_network('toy', img_resolution=8, img_channels=3, label_dim=2, model_channels=8, channel_mult=[1])
    engine = TorchEngine(G, 1e-3, (0.0, 0.99), 1e-8)
    ema = GeneratorEMA(engine, torch.device('cpu'))
    assert all(torch.equal(e, g) for e, g in zip(ema.net.parameters(), G.parameters(), strict=True))
    assert all(ema.local[n].data_ptr() == p.data_ptr() for n, p in ema.net.named_parameters())   # no second copy
    reference = build_network('toy', **G.init_kwargs)
    reference.load_state_dict(ema.net.state_dict())
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    ema.update(0.9)
    cosim.ema_update(reference, G, 0.9)
    ema.sync()
    assert all(torch.equal(e, r) for e, r in zip(ema.net.parameters(), reference.parameters(), strict=True))
    assert ema.range == {n: (0, p.numel()) for n, p in G.named_parameters()}

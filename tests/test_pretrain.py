"""Toy teacher pretraining: the denoising score matching loss and its exact-target variant (pretrain.target)."""

import torch

from cosim_dist.config import GMMConfig, PretrainConfig
from cosim_dist.pretrain import dsm_loss
from cosim_dist.toy import ExactDenoiser, GMMWorld

def test_the_exact_denoiser_is_the_zero_of_the_exact_target_loss_and_the_data_target_keeps_its_noise():
    """pretrain.target=exact regresses onto E[x0 | x_sigma, c]: the world's own denoiser scores 0 there, while against
    the data target x0 it keeps the posterior variance E|x0 - E[x0 | x_sigma]|^2 > 0 (the noise the exact target
    removes); any other network scores > 0 on both."""
    world = GMMWorld(GMMConfig(classes=2, components=2, rank=2), resolution=4, channels=1)
    x0, labels = world.sample(64, torch.Generator().manual_seed(1))
    c = torch.nn.functional.one_hot(labels, 2).float()
    exact, cfg = ExactDenoiser(world), PretrainConfig()
    loss = lambda net, target: dsm_loss(net, x0, c, cfg, 0.5, torch.Generator().manual_seed(2), target).item()
    assert loss(exact, exact) < 1e-9
    assert loss(exact, None) > 1e-2
    shrink = lambda x, sigma, labels: 0.9 * exact(x, sigma, labels)
    on_data = loss(shrink, exact)
    assert on_data > 1e-3
    cfg.spread = 2.0        # inputs widened off the data (GMMWorld.widen); the exact denoiser is still the zero
    assert loss(exact, exact) < 1e-9 and abs(loss(shrink, exact) - on_data) > 0.05 * on_data

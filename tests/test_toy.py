"""The toy world: exact sampler, closed-form denoiser and moments, and the resumable stream."""

import torch

from cosim_dist.config import GMMConfig
from cosim_dist.toy import GMMStream, GMMWorld

def test_closed_form_denoiser_matches_monte_carlo_posterior_mean():
    world = GMMWorld(GMMConfig())
    gen = torch.Generator().manual_seed(0)
    label, sigma = 3, 0.6
    x0, _ = world.sample(3, gen, labels=torch.full((3,), label))
    x = x0 + sigma * torch.randn(x0.shape, generator=gen)
    exact = world.denoise(x, sigma, torch.full((3,), label))
    pool, _ = world.sample(60_000, gen, labels=torch.full((60_000,), label))   # prior samples of class `label`
    pool = pool.flatten(1).double()
    for i in range(3):
        logw = -((pool - x[i].flatten().double()) ** 2).sum(1) / (2 * sigma ** 2)
        w = torch.softmax(logw, 0)
        assert 1 / (w ** 2).sum() > 1000                                         # enough effective samples
        mc = (w[:, None] * pool).sum(0)
        err = (mc - exact[i].flatten().double()).abs().max().item()
        assert err < 0.01, err
        assert (exact[i] - x[i]).abs().mean() > 0.1                              # the denoiser did something

def test_denoiser_limits():
    world = GMMWorld(GMMConfig())
    gen = torch.Generator().manual_seed(1)
    x0, labels = world.sample(16, gen)
    torch.testing.assert_close(world.denoise(x0, 1e-4, labels), x0, atol=1e-4, rtol=0)
    far = world.denoise(x0 * 0 + 1e4 * torch.randn(x0.shape, generator=gen), 1e4, labels)
    class_means = world.mu.reshape(world.cfg.classes, world.cfg.components, -1).mean(1)
    torch.testing.assert_close(far.flatten(1).double(), class_means[labels], atol=1e-3, rtol=0)

def test_exact_moments_match_samples():
    world = GMMWorld(GMMConfig())
    x, labels = world.sample(40_000, torch.Generator().manual_seed(2))
    mean, cov = world.moments()
    f = x.flatten(1).double()
    assert (f.mean(0) - mean).abs().max() < 0.015
    assert (torch.cov(f.T) - cov).abs().max() < 0.015
    assert torch.bincount(labels, minlength=10).min() > 3600

def test_stream_resume_is_exact():
    world = GMMWorld(GMMConfig())
    a = GMMStream(world, 8, seed=5)
    batches = [a.next_batch() for _ in range(4)]
    b = GMMStream(world, 8, seed=5)
    b.load_state_dict({'consumed': 16, 'version': 1})
    for x, c in batches[2:]:
        y, d = b.next_batch()
        assert torch.equal(x, y) and torch.equal(c, d)
    assert not torch.equal(batches[0][0], batches[1][0])

"""The toy world: exact sampler, closed-form denoiser and moments, and the resumable stream."""

import math

import pytest
import torch

from cosim_dist.config import GMMConfig
from cosim_dist.toy import GMMStream, GMMWorld

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

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
        se = ((w[:, None] * (pool - mc)) ** 2).sum(0).sqrt()                   # delta-method SE of the weighted mean
        # Monte-Carlo error: each pixel within 6 standard errors (was max error < 0.01, 9 SE of the worst pixel), so
        # that a union bound over the 768 pixels of 3 draws keeps a false failure below 1e-5.
        z = ((mc - exact[i].flatten().double()).abs() / se).max().item()
        assert z < 6, z
        assert (exact[i] - x[i]).abs().mean() > 0.1          # the denoiser did something: the noise alone averages 0.48

def test_denoiser_limits():
    world = GMMWorld(GMMConfig())
    gen = torch.Generator().manual_seed(1)
    x0, labels = world.sample(16, gen)
    # x - E[x0 | x] = sigma^2 / (eps^2 + sigma^2) (x - mu)_perp = 1.1e-5 x (<= 5 eps = 0.15), plus the fp32 rounding of
    # the output (u32 |x| <= 1e-7): < 2e-6, so atol=1e-5 (was 1e-4)
    torch.testing.assert_close(world.denoise(x0, 1e-4, labels), x0, atol=1e-5, rtol=0)
    far = world.denoise(x0 * 0 + 1e4 * torch.randn(x0.shape, generator=gen), 1e4, labels)
    class_means = world.mu.reshape(world.cfg.classes, world.cfg.components, -1).mean(1)
    # first order in 1 / sigma: (x - mu_c) . (mu_k - mu_c) / sigma^2 ~ N(0, (|mu_k - mu_c| / sigma)^2) tilts the
    # component weights by 5e-4 per standard deviation (|mu_k - mu_c| <= 5.2), which moves the mean by that x
    # max |mu_k - mu_c| (0.73): 5 standard deviations of the draw give 2e-3 (was 1e-3)
    torch.testing.assert_close(far.flatten(1).double(), class_means[labels], atol=2e-3, rtol=0)

def test_exact_moments_match_samples():
    world = GMMWorld(GMMConfig())
    x, labels = world.sample(40_000, torch.Generator().manual_seed(2))
    mean, cov = world.moments()
    f = x.flatten(1).double()
    n, c2 = len(f), (f - mean) ** 2
    # Monte-Carlo error, entry by entry, in standard errors from the samples: sqrt(var / n) for a mean and
    # sqrt((E[c_i^2 c_j^2] - cov_ij^2) / n) for a covariance. Within 6 (was < 0.015, only 4.3 SE of the widest pixel):
    # a union bound over the 768 means and 3e5 covariance entries keeps a false failure below 1e-3.
    assert ((f.mean(0) - mean).abs() / (c2.mean(0) / n).sqrt()).max().item() < 6
    assert ((torch.cov(f.T) - cov).abs() / ((c2.T @ c2 / n - cov ** 2) / n).sqrt()).max().item() < 6
    assert torch.bincount(labels, minlength=10).min() > 3600               # Binomial(40000, 0.1): 4000 +- 60, 6.7 sd
    # The isotropic eps^2 I term (9e-4 per pixel) is near one entry's standard error (~7e-4), so the entry-wise check
    # cannot see it; the mean of the 768 diagonal entries does: its standard error, from the per-sample mean of squared
    # deviations, is ~15x smaller, and 6 of them stay below eps^2 (dropping the term would fail the line below).
    q = c2.mean(1)
    se = (q.std() / math.sqrt(n)).item()
    assert 6 * se < world.eps2, se
    assert abs(q.mean().item() - cov.diagonal().mean().item()) < 6 * se

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

def test_exact_denoiser_is_the_world_posterior_mean_and_differentiable():
    """teacher.kind=exact: a network-shaped D_phi (one-hot labels, sigma per sample) equal to GMMWorld.denoise, with
    gradients w.r.t. its input (Eq. G1 back-propagates through D_phi's input)."""
    from cosim_dist.config import GMMConfig
    from cosim_dist.toy import ExactDenoiser, GMMWorld
    world = GMMWorld(GMMConfig(classes=2, components=2, rank=2), resolution=4, channels=1)
    x0, labels = world.sample(8, torch.Generator().manual_seed(1))
    sigma = torch.linspace(0.05, 5.0, 8)
    x = (x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0)).requires_grad_(True)
    D = ExactDenoiser(world)(x, sigma.reshape(-1, 1, 1, 1), torch.nn.functional.one_hot(labels, 2).float())
    assert D.dtype == x.dtype and torch.allclose(D, world.denoise(x.detach(), sigma, labels))
    D.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

def test_widen_scales_the_offset_inside_the_component_and_nothing_else():
    """GMMWorld.widen (pretrain.spread): the whitened coordinates in the sample's component scale by the factor, the
    part of x outside the component's subspace does not move."""
    from cosim_dist.config import GMMConfig
    from cosim_dist.toy import GMMWorld
    world = GMMWorld(GMMConfig(classes=2, components=2, rank=2), resolution=4, channels=1)
    x, labels = world.sample(200, torch.Generator().manual_seed(3))
    assert torch.equal(world.widen(x, labels, 1.0), x)
    wide = world.widen(x, labels, 2.0)
    k, z, _ = world.components(x.double(), labels)
    k2, z2, _ = world.components(wide.double(), labels)
    same = k == k2
    assert same.float().mean() > 0.9
    assert torch.allclose(z2[same], 2 * z[same], atol=1e-4)
    comp = labels * 2 + k
    Q = world.Q[comp].float()                                                    # [n, D, rank]
    moved = (wide - x).flatten(1)
    assert torch.allclose(moved - torch.einsum('ndk,nk->nd', Q, torch.einsum('ndk,nd->nk', Q, moved)),
                          torch.zeros_like(moved), atol=1e-5)

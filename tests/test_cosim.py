"""The CoSIM math against closed forms on Gaussian data (Eqs. T1, K1, A1, G1, S1)."""

import math

import numpy as np
import pytest
import torch

from cosim_dist import cosim

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

#----------------------------------------------------------------------------
# A Gaussian world: x0 ~ N(0, s0^2 I) in d dims. The teacher is the exact denoiser, the generator is
# linear, G(x_t) = a x_t, so the model marginal q_a(x_s; t) = N(0, (v_a + sigma_s^2) I), v_a = a^2 (s0^2 + sigma_t^2).

S0, D = 0.5, 4

def teacher(x, sigma, labels=None):
    return S0 ** 2 / (S0 ** 2 + cosim._bcast(torch.as_tensor(sigma)) ** 2) * x

def model_var(a, sigma_t):
    return a ** 2 * (S0 ** 2 + sigma_t ** 2)

def fisher_divergence(a, sigma_s, sigma_t):
    """Closed-form E_{q_a} |S_phi - grad log q_a|^2 with both scores linear: -x / variance."""
    var_q = model_var(a, sigma_t) + sigma_s ** 2
    return D * var_q * (1 / (S0 ** 2 + sigma_s ** 2) - 1 / var_q) ** 2

def kernel_batch(a, n, sigma_s, sigma_t, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, D, 1, 1, generator=gen, dtype=torch.float64) * S0
    s, t = torch.full((n,), sigma_s, dtype=torch.float64), torch.full((n,), sigma_t, dtype=torch.float64)
    n_t, n_s = torch.randn(2, *x0.shape, generator=gen, dtype=torch.float64)
    return cosim.transition_kernel(lambda x, sig, c: a * x, x0, None, s, t, n_t, n_s), s

@pytest.mark.parametrize('lmbda', [0.0, 1.0, 3.0])
def test_aux_minimiser_is_blended_target(lmbda):
    a, sigma_s, sigma_t = 0.7, 0.4, 1.3
    ks, s = kernel_batch(a, 400_000, sigma_s, sigma_t, seed=1)
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = cosim.aux_loss(c * ks.x_s, ks.target, teacher(ks.x_s, s), s, lmbda, sigma_data=0.5)
    g, = torch.autograd.grad(loss, c, create_graph=True)
    h, = torch.autograd.grad(g, c)
    c_star = (c - g / h).item()                                   # exact minimiser: the loss is quadratic in c
    v = model_var(a, sigma_t)
    model_posterior = v / (v + sigma_s ** 2)                      # E[x0_hat | x_s] = model_posterior * x_s
    teacher_coef = S0 ** 2 / (S0 ** 2 + sigma_s ** 2)
    expected = (model_posterior + lmbda * teacher_coef) / (1 + lmbda)
    # Monte-Carlo error: c_star regresses x0_hat on x_s over n D = 1.6M draws, standard error
    # sqrt(b (1 - b) / (n D)) / (1 + lambda) with b = model_posterior (2.8e-4 at lambda = 0); 5 standard errors.
    se = math.sqrt(model_posterior * (1 - model_posterior) / (400_000 * D)) / (1 + lmbda)
    assert c_star == pytest.approx(expected, abs=5 * se)

@pytest.mark.parametrize('lmbda', [0.0, 1.0])
def test_generator_gradient_is_scaled_fisher_divergence(lmbda):
    a0, sigma_s, sigma_t = 0.8, 0.6, 1.0
    v = model_var(a0, sigma_t)
    c_star = (v / (v + sigma_s ** 2) + lmbda * S0 ** 2 / (S0 ** 2 + sigma_s ** 2)) / (1 + lmbda)
    n = 1_000_000
    a = torch.full((n, 1, 1, 1), a0, dtype=torch.float64, requires_grad=True)   # one copy per draw: per-draw gradients
    ks, s = kernel_batch(a, n, sigma_s, sigma_t, seed=2)
    loss = cosim.generator_loss(ks.target, teacher(ks.x_s, s), c_star * ks.x_s, cosim.generator_alpha(lmbda),
                                weight=torch.ones(n, dtype=torch.float64))
    grads = torch.autograd.grad(loss, a)[0].flatten() * n                      # the loss is the mean over the draws
    a_cf = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    fd = fisher_divergence(a_cf, sigma_s, sigma_t) / (1 + lmbda)
    grad_cf, = torch.autograd.grad(sigma_s ** 4 / 2 * fd, a_cf)   # L_gen = sigma_s^4 / 2 * (FD / (1 + lambda)) at psi*
    # Monte-Carlo error: 5 standard errors of the mean of n per-draw gradients (5 x 5.6e-4 relative; was rel=0.03).
    assert float(grads.mean()) == pytest.approx(float(grad_cf), abs=5 * float(grads.std()) / math.sqrt(n))

def test_generator_weight_is_stop_gradient_normaliser():
    torch.manual_seed(0)
    target, D_phi, D_psi = torch.randn(3, 5, 2, 4, 4).unbind()
    t, p, q = (v.double() for v in (target, D_phi, D_psi))                  # the formula in float64
    terms = (7.0 / (t - p).abs().flatten(1).mean(1))[:, None] * ((p - q) * ((p - t) - 1.2 * (p - q))).flatten(1)
    assert float(terms.abs().sum() / terms.sum().abs()) < 2                 # condition number of the sum (1.1 here)
    # fp32 rounding: <= 75 roundings (u32 = 6e-8) on the longest path (5 elementwise, the 32-term weight and per-sample
    # sums, the 5-term mean) relative to sum |terms|, times the condition number < 2: 9e-6, so rel=1e-5 (was 1e-6).
    loss = float(cosim.generator_loss(target, D_phi, D_psi, 1.2, gen_scale=7.0))
    assert loss == pytest.approx(float(terms.sum(1).mean()), rel=1e-5)
    # float64: (1 + 1.4) / 2 rounds once (u64 = 1.1e-16).
    assert cosim.generator_alpha(1.0) == 1.0 and cosim.generator_alpha(1.4) == pytest.approx(1.2, rel=1e-15)
    assert cosim.generator_alpha(1.0, alpha=1.2) == 1.2

def test_generator_weight_passes_no_gradient():
    """w_g is a stop-gradient: the gradients of Eq. G1 w.r.t. d_c, D_phi and D_psi are those with w_g held constant,
    dL/dd_c = -w delta / N, dL/dD_phi = w ((D_phi - d_c) + (1 - 2 alpha) delta) / N, dL/dD_psi = w (2 alpha delta -
    (D_phi - d_c)) / N (delta = D_phi - D_psi). A w_g that let gradient through changes dL/dd_c and dL/dD_phi by
    terms of the loss's own size; float64 leaves 1e-12 relative."""
    gen = torch.Generator().manual_seed(3)
    t, p, q = (torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    alpha, n = 1.2, 4
    loss = cosim.generator_loss(t, p, q, alpha, gen_scale=7.0)
    gt, gp, gq = torch.autograd.grad(loss, (t, p, q))
    with torch.no_grad():
        w = (7.0 / (t - p).abs().flatten(1).mean(1)).reshape(-1, 1, 1, 1)
        delta = p - q
        for got, want in ((gt, -w * delta / n), (gp, w * ((p - t) + (1 - 2 * alpha) * delta) / n),
                          (gq, w * (2 * alpha * delta - (p - t)) / n)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

#----------------------------------------------------------------------------
# Eq. T1.

def assert_mean(x: torch.Tensor, expected: float) -> None:
    """The sample mean of x within 5 Monte-Carlo standard errors, sd(x) / sqrt(n) from the samples, of `expected`."""
    assert abs(float(x.mean()) - expected) <= 5 * float(x.std()) / math.sqrt(len(x)), (float(x.mean()), expected)

@pytest.mark.parametrize('R', [1.0, 8.0])
def test_time_schedule_support_order_and_moments(R):
    sched = cosim.TimeSchedule(ratio=R, r_lo=0.2, sigma_s_max=None, noise=cosim.NoiseRange(), kind='rho')
    n = 200_000
    s, t = sched.sample(n, torch.Generator().manual_seed(0))
    noise = sched.noise
    # support up to the fp32 rounding of sigma and r(sigma) (u32 = 6e-8): 1e-6 = 16 u32
    assert (s >= noise.sigma_min * (1 - 1e-6)).all() and (t <= noise.sigma_max * (1 + 1e-6)).all()
    assert (s < t).all()
    r_t, r_s = noise.r(t.double()), noise.r(s.double())
    g = 1 - r_s / r_t
    assert r_t.min() >= 0.2 - 1e-6
    # Monte-Carlo error: each moment within 5 standard errors (was abs=3e-3: 4.6 to 65 standard errors); a variance
    # as the mean of squared deviations from the exact mean.
    assert_mean(r_t, 0.6)                                                      # U(0.2, 1)
    assert_mean((r_t - 0.6) ** 2, 0.8 ** 2 / 12)
    assert_mean(g, R / (R + 1))                                                # Beta(R, 1)
    assert_mean((g - R / (R + 1)) ** 2, R / ((R + 1) ** 2 * (R + 2)))
    assert_mean(r_s, 0.6 / (R + 1))

def gap_of(kind: str, s: torch.Tensor, t: torch.Tensor, noise: cosim.NoiseRange) -> torch.Tensor:
    """The gap fraction g each T1 reading maps to sigma_s (the inverse of its formula, written out independently)."""
    s, t = s.double(), t.double()
    if kind == 'rho':
        return 1 - noise.r(s) / noise.r(t)
    if kind == 'sigma':
        return 1 - s / t
    return (t.log() - s.log()) / (t.log() - math.log(noise.sigma_min))

@pytest.mark.parametrize('kind', cosim.T1_KINDS)
@pytest.mark.parametrize('R', [0.25, 1.0, 4.0])
def test_every_t1_reading_draws_its_gap_from_beta_r_1(kind, R):
    """Every reading, also R < 1: sigma_min <= sigma_s <= sigma_t (equal only where float32 cannot tell them apart:
    at R = 0.25 a few % of the gaps are below its resolution), and the gap recovered from (sigma_s, sigma_t) in the
    reading's own space follows Beta(R, 1). Kolmogorov-Smirnov distance to F(g) = g^R below 1.63 / sqrt(n) (the 1 %
    critical value) plus 5e-4, over the draws with sigma_t >= 1 (g is independent of sigma_t) and g in [1e-4, g_clamp):
    float32 sigma (relative error 6e-8) moves a recovered g by <~ 1e-6, which moves F by at most R g^(R-1) 1e-6 <=
    2.5e-4 there; below g_clamp, the smallest recovered gap of a draw clamped at sigma_min (its true gap is larger), no
    draw's count is changed by the clamp."""
    noise = cosim.NoiseRange()
    sched = cosim.TimeSchedule(ratio=R, r_lo=0.0, sigma_s_max=None, noise=noise, kind=kind)
    n = 40_000
    s, t = sched.sample(2 * n, torch.Generator().manual_seed(1))
    assert (s >= noise.sigma_min * (1 - 1e-6)).all() and (s <= t).all()
    s, t = s[t >= 1][:n], t[t >= 1][:n]
    assert len(s) == n
    g = gap_of(kind, s, t, noise)
    clamped = s <= noise.sigma_min * (1 + 1e-5)
    hi = float(g[clamped].min()) if clamped.any() else 1.0
    g = g.sort().values
    cdf = g.clamp(0, 1) ** R
    ecdf_hi, ecdf_lo = torch.arange(1, n + 1) / n, torch.arange(n) / n
    inside = (g >= 1e-4) & (g < hi)
    ks = max(float((ecdf_hi - cdf)[inside].max()), float((cdf - ecdf_lo)[inside].max()))
    assert inside.sum() > n / 2 and ks < 1.63 / math.sqrt(n) + 5e-4, (kind, R, ks, int(clamped.sum()))

@pytest.mark.parametrize('kind', cosim.T1_KINDS)
def test_a_mixture_of_two_ratios_draws_its_gap_from_the_mixture(kind):
    """schedule.ratio_mix: a share mix_p of the gaps follows Beta(ratio_mix, 1), the rest Beta(ratio, 1), i.e. the
    recovered gap's CDF is p g^R2 + (1 - p) g^R (Kolmogorov-Smirnov, the same bound and window as the single-R test:
    the mixture's density is at most max(R) g^(min(R)-1) there, so the float32 shift of F stays below 2.5e-4)."""
    noise, n, R, R2, p = cosim.NoiseRange(), 40_000, 0.25, 1.0, 0.3
    sched = cosim.TimeSchedule(ratio=R, r_lo=0.0, sigma_s_max=None, noise=noise, kind=kind, ratio_mix=R2, mix_p=p)
    s, t = sched.sample(2 * n, torch.Generator().manual_seed(2))
    s, t = s[t >= 1][:n], t[t >= 1][:n]
    g = gap_of(kind, s, t, noise)
    clamped = s <= noise.sigma_min * (1 + 1e-5)
    hi = float(g[clamped].min()) if clamped.any() else 1.0
    g = g.sort().values
    cdf = p * g.clamp(0, 1) ** R2 + (1 - p) * g.clamp(0, 1) ** R
    inside = (g >= 1e-4) & (g < hi)
    ks = max(float((torch.arange(1, n + 1) / n - cdf)[inside].max()), float((cdf - torch.arange(n) / n)[inside].max()))
    assert inside.sum() > n / 2 and ks < 1.63 / math.sqrt(n) + 5e-4, (kind, ks)
    single = cosim.TimeSchedule(ratio=R, r_lo=0.0, sigma_s_max=None, noise=noise, kind=kind)
    far = float((gap_of(kind, *single.sample(n, torch.Generator().manual_seed(2)), noise) > 0.5).float().mean())
    assert far < float((g > 0.5).float().mean()) - 0.05              # the mixture's long jumps: more large gaps

def test_generator_floor_on_sigma_s():
    sched = cosim.TimeSchedule(ratio=4.0, r_lo=0.0, sigma_s_max=None, noise=cosim.NoiseRange(), kind='rho',
                               gen_sigma_s_min=0.05)
    s, t = sched.sample(10_000, torch.Generator().manual_seed(0))
    s_gen = sched.generator_sigma_s(s, t)
    assert (s_gen <= t).all() and (s_gen >= torch.minimum(torch.full_like(t, 0.05), t)).all()
    assert torch.equal(s_gen[s >= 0.05], s[s >= 0.05]) and (s < 0.05).float().mean() > 0.5   # only low pairs move

def test_time_schedule_cap():
    sched = cosim.TimeSchedule(ratio=1.0, r_lo=0.0, sigma_s_max=1.5, noise=cosim.NoiseRange(), kind='rho')
    s, _ = sched.sample(10_000, torch.Generator().manual_seed(0))
    assert s.max() <= 1.5

#----------------------------------------------------------------------------
# Eq. K1 with eta < 1: the conditional target keeps the score identity d_c = x_s + sigma_s^2 grad log q(x_s | x_t).

def test_kernel_eta_target():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, generator=gen)
    s, t = torch.full((8,), 0.5), torch.full((8,), 2.0)
    G = lambda x, sig, c: 0.5 * x
    n_t, n_s = torch.randn(2, *x0.shape, generator=gen)
    ks = cosim.transition_kernel(G, x0, None, s, t, n_t, n_s, eta=0.6)
    mean = ks.x0_hat + 0.5 * math.sqrt(1 - 0.36) * (ks.x_t - ks.x0_hat) / 2.0
    score = -(ks.x_s - mean) / (0.6 * 0.5) ** 2
    # fp32, the same formula grouped differently: ~10 roundings (u32 = 6e-8) of values <= 10 (|x_s| <= 4.5, the kernel
    # mean's error amplified by 1 / eta^2 = 2.8): < 6e-6, so atol=1e-5
    torch.testing.assert_close(ks.target, ks.x_s + 0.25 * score, atol=1e-5, rtol=0)
    ks1 = cosim.transition_kernel(G, x0, None, s, t, n_t, n_s, eta=1.0)
    assert torch.equal(ks1.target, ks1.x0_hat)                                 # exact: eta = 1 returns x0_hat itself

#----------------------------------------------------------------------------
# Eq. S1 and the Heun sampler.

def test_default_sampler_grids():
    """Reference values printed to 4 digits: atol is half a unit in their last digit (doubled with scale=2); 80 is
    sigma_max up to the float64 round trip (sigma_max^(1/7))^7, ~14 u64."""
    noise = cosim.NoiseRange()
    np.testing.assert_allclose(cosim.default_grid(1, noise), [80.0], rtol=1e-14)
    np.testing.assert_allclose(cosim.default_grid(2, noise), [80.0, 2.515], atol=5e-4)
    np.testing.assert_allclose(cosim.default_grid(4, noise), [80.0, 17.53, 2.515, 0.170], atol=5e-3)
    assert abs(cosim.default_grid(4, noise)[3] - 0.170) < 5e-4
    assert cosim.default_grid(4, noise, scale=2.0)[2] == pytest.approx(2 * 2.515, abs=1e-3)

def test_cosim_sampler_uses_grid_and_noise():
    """Eq. S1 by hand with G(x) = x / 2 + sigma: x = 80 z; x0 = 40 z + 80; x = x0 + 2.5 n; out = x / 2 + 2.5."""
    calls = []

    def G(x, sigma, c):
        calls.append(sigma[0].item())
        return x / 2 + sigma.reshape(-1, 1, 1, 1)

    z = torch.linspace(-1, 1, 8).reshape(2, 1, 2, 2)
    n = torch.linspace(3, 4, 8).reshape(2, 1, 2, 2)
    out = cosim.cosim_sample(G, z, None, [80.0, 2.5], [n])
    assert calls == [80.0, 2.5]
    torch.testing.assert_close(out, (40 * z + 80 + 2.5 * n) / 2 + 2.5, rtol=1e-6, atol=1e-5)

def test_cosim_sampler_renoises_with_the_training_kernel():
    """Eq. S1 with eta < 1 makes the Eq. K1 move of training: after G at tau_k the state at tau_{k-1} is
    transition_kernel's x_s for the same G, x_t and n_s (and eta = 1 keeps only fresh noise)."""
    G = lambda x, sigma, c: x / 3 + 1
    z, n = torch.randn(2, 4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    states = []
    G_record = lambda x, sigma, c: states.append(x) or G(x, sigma, c)
    cosim.cosim_sample(G_record, z, None, [80.0, 2.5], [n], eta=0.6)
    ks = cosim.transition_kernel(G, torch.zeros_like(z), None, torch.full((4,), 2.5), torch.full((4,), 80.0), z, n,
                                 eta=0.6)
    # the same float32 operations in the same order: equal up to x_t = 80 z computed as z * 80 vs 0 + 80 z (exact)
    torch.testing.assert_close(states[1], ks.x_s, rtol=0, atol=0)
    n_hat = (80 * z - G(80 * z, None, None)) / 80
    # by hand: values up to ~300 (80 |z| < 320), float32 rounding ~2e-5 per operation, a few operations: < 1e-4
    assert (states[1] - G(80 * z, None, None) - 2.5 * 0.6 * n).sub(2.5 * 0.8 * n_hat).abs().max() < 1e-4

def test_heun_sampler_on_gaussian_reaches_data_variance():
    z = torch.randn(20_000, D, 1, 1, generator=torch.Generator().manual_seed(0))
    x = cosim.heun_sample(teacher, z, None, num_steps=64)    # the ODE maps N(0, 80^2) to N(0, S0^2) exactly
    # No Monte-Carlo error: the sampler is linear, x = g z, so std(x) / std(z) = g exactly; rel bounds the
    # discretisation error of 64 second-order steps (0.36%; a first-order sampler is off by 4.4%).
    assert x.std().item() == pytest.approx(S0 * z.std().item(), rel=0.005)

def test_ema_half_life():
    assert cosim.ema_beta(batch=500, nimg=10 ** 9, halflife_kimg=0.5, rampup=None) == 0.5     # exact: 0.5 ** 1.0
    assert cosim.ema_beta(batch=100, nimg=1000, halflife_kimg=10, rampup=0.1) == 0.5
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    cosim.ema_update(ema, net, 0.25)
    # fp32: lerp and the reference round <= 3 times each on |w| <= 1/sqrt(2): 6 x 0.71 u32 = 2.5e-7, so atol=1e-6
    torch.testing.assert_close(ema.weight, 0.25 * before + 0.75 * net.weight.detach(), atol=1e-6, rtol=0)

"""CoSIM math (docs/ALGORITHM.md): the joint time schedule (Eq. T1), the transition kernel (Eq. K1),
the auxiliary loss (Eq. A1), the generator loss (Eq. G1), the EMA of Eq. L1, the K-step sampler (Eq. S1)
and the teacher's Heun sampler. Networks are called as `net(x, sigma, class_labels, [sigma_t])`."""

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch

from .nets.precond import edm_loss_weight

Net = Callable[..., torch.Tensor]

#----------------------------------------------------------------------------
# Noise levels in rho-space (docs/ALGORITHM.md, Eq. T1):
#   r(sigma) = (sigma^(1/rho) - sigma_min^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho)).

@dataclasses.dataclass(kw_only=True)
class NoiseRange:
    sigma_min: float = 0.002  # smallest noise level
    sigma_max: float = 80.0   # largest noise level
    rho: float = 7.0          # EDM time-discretisation exponent

    def sigma(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse of r(sigma): sigma = (sigma_min^(1/rho) + r (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + r * (hi - lo)) ** self.rho

    def r(self, sigma: torch.Tensor) -> torch.Tensor:
        """r(sigma) of Eq. T1."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (sigma ** (1 / self.rho) - lo) / (hi - lo)

def edm_grid(num_points: int, noise: NoiseRange) -> torch.Tensor:
    """The rho-grid sigma_i, i = 0..N-1, from sigma_max down to sigma_min (float64; the Heun sampler's grid)."""
    return noise.sigma(1 - torch.arange(num_points, dtype=torch.float64) / (num_points - 1))

#----------------------------------------------------------------------------
# Eq. T1: joint time schedule pi(s, t).
#   r_t ~ U(r_lo, 1),  g ~ Beta(R, 1),  sigma_min <= sigma_s (<= sigma_s_max), and the gap g read as (`kind`)
#   (optionally a mixture: g ~ Beta(R_mix, 1) with probability p, else Beta(R, 1))
#     rho:      r_s = r_t (1 - g)                                      (the spec's reading; the toy's)
#     sigma:    sigma_s = sigma_t (1 - g)                              (the published teachers')
#     logsigma: log sigma_s = log sigma_t - g (log sigma_t - log sigma_min)
# In every reading a larger R gives larger gaps (E[g] = R / (R + 1)).

T1_KINDS = ('rho', 'sigma', 'logsigma')

@dataclasses.dataclass(kw_only=True)
class TimeSchedule:
    """Eq. T1 with the values of the `schedule.*` keys (config.ScheduleConfig: their meaning and validation)."""
    ratio: float                       # R
    r_lo: float                        # lower end of r_t
    sigma_s_max: float | None          # optional cap on sigma_s
    noise: NoiseRange
    kind: str                          # the reading of the gap (T1_KINDS)
    gen_sigma_s_min: float | None = None  # optional floor on sigma_s for the generator step
    ratio_mix: float | None = None     # optional second R of a mixture
    mix_p: float = 0.5                 # its share of the pairs

    def generator_sigma_s(self, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        """Eq. T1's sigma_s for the generator step (Eq. G1): raised to gen_sigma_s_min, never above sigma_t."""
        if self.gen_sigma_s_min is None:
            return sigma_s
        return torch.minimum(sigma_s.clamp(min=self.gen_sigma_s_min), sigma_t)

    def sample(self, n: int, gen: torch.Generator | None = None,
               device: torch.device | str = 'cpu') -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. T1: draw (sigma_s, sigma_t) [n] each, with sigma_s <= sigma_t."""
        u = torch.rand(2, n, generator=gen, dtype=torch.float64, device=gen.device if gen is not None else 'cpu')
        r_t = self.r_lo + (1 - self.r_lo) * u[0]
        exponent = torch.full_like(u[1], 1 / self.ratio)
        if self.ratio_mix is not None:                    # drawn only then: single-R runs keep their random stream
            pick = torch.rand(n, generator=gen, dtype=torch.float64, device=u.device) < self.mix_p
            exponent[pick] = 1 / self.ratio_mix
        g = u[1] ** exponent                              # inverse CDF of Beta(R, 1): F(g) = g^R
        sigma_t = self.noise.sigma(r_t)
        if self.kind == 'rho':
            sigma_s = self.noise.sigma(r_t * (1 - g))
        elif self.kind == 'sigma':
            sigma_s = sigma_t * (1 - g)
        elif self.kind == 'logsigma':
            sigma_s = sigma_t ** (1 - g) * self.noise.sigma_min ** g
        else:
            raise ValueError(f'schedule.kind={self.kind!r}: one of {", ".join(T1_KINDS)}')
        sigma_s = sigma_s.clamp(min=self.noise.sigma_min)
        if self.sigma_s_max is not None:
            sigma_s = sigma_s.clamp(max=self.sigma_s_max)
        sigma_s = torch.minimum(sigma_s, sigma_t)
        return sigma_s.float().to(device), sigma_t.float().to(device)

#----------------------------------------------------------------------------
# Eq. K1: the continuous transition kernel.
#   x_t = x0 + sigma_t n_t,  x0_hat = G(x_t; sigma_t, c),  x_s = x0_hat + sigma_s (sqrt(1-eta^2) n_hat + eta n_s),
# where n_hat = (x_t - x0_hat) / sigma_t is the predicted noise. The conditional denoising target
#   d_c = x_s + sigma_s^2 grad log q(x_s | x_t) = x_s - (x_s - m) / eta^2,  m the kernel mean,
# equals x0_hat for eta = 1 and replaces x0_hat in Eqs. A1 and G1.

@dataclasses.dataclass
class KernelSample:
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    x_s: torch.Tensor
    target: torch.Tensor  # d_c, the conditional denoiser target of x_s

def _bcast(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, 1, 1, 1)

def kernel_mean(x0_hat: torch.Tensor, x_t: torch.Tensor, sigma_s: torch.Tensor | float,
                sigma_t: torch.Tensor | float, eta: float) -> torch.Tensor:
    """Eq. K1: the kernel mean m = x0_hat + sigma_s sqrt(1 - eta^2) n_hat, n_hat = (x_t - x0_hat) / sigma_t
    (x_s = m + sigma_s eta n_s); sigmas are scalars or broadcastable tensors."""
    return x0_hat if eta == 1 else x0_hat + sigma_s * math.sqrt(1 - eta ** 2) * (x_t - x0_hat) / sigma_t

def transition_kernel(G: Net, x0: torch.Tensor, labels: torch.Tensor | None, sigma_s: torch.Tensor,
                      sigma_t: torch.Tensor, n_t: torch.Tensor, n_s: torch.Tensor, eta: float = 1.0) -> KernelSample:
    """Eq. K1: forward-noise real data to sigma_t with n_t, apply the generator, re-noise to sigma_s with n_s."""
    s, t = _bcast(sigma_s), _bcast(sigma_t)
    x_t = x0 + t * n_t
    x0_hat = G(x_t, sigma_t, labels).to(x0.dtype)
    mean = kernel_mean(x0_hat, x_t, s, t, eta)
    x_s = mean + s * eta * n_s
    target = mean if eta == 1 else x_s - (x_s - mean) / eta ** 2
    return KernelSample(x_t=x_t, x0_hat=x0_hat, x_s=x_s, target=target)

#----------------------------------------------------------------------------
# Eq. A1: E w_a(sigma_s) [ |D_psi - sg(d_c)|^2 + lambda |D_psi - D_phi|^2 ]
#       = E w_a (1 + lambda) |D_psi - (sg(d_c) + lambda D_phi) / (1 + lambda)|^2 + const.
# With a logvar head u: w_a / exp(u) |.|^2 + u.

def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)

def aux_loss(D_psi: torch.Tensor, target: torch.Tensor, D_phi: torch.Tensor, sigma_s: torch.Tensor, lmbda: float,
             sigma_data: float, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. A1: auxiliary loss (per-sample sum over pixels, mean over the batch) towards the blended target."""
    blended = (target.detach() + lmbda * D_phi.detach()) / (1 + lmbda)
    w = edm_loss_weight(sigma_s, sigma_data) * (1 + lmbda)
    err = _per_sample_sum((D_psi - blended) ** 2)
    if logvar is None:
        return (w * err).mean()
    u = logvar.flatten()
    return (w / u.exp() * err + u * math.prod(D_psi.shape[1:])).mean()

#----------------------------------------------------------------------------
# Eq. G1: L_gen = w_g (D_phi - D_psi)^T [ (D_phi - d_c) - alpha (D_phi - D_psi) ],  alpha = (1 + lambda) / 2,
#   w_g = gen_scale / max(mean |d_c - D_phi|, 1e-5) (stop-gradient, per sample).

def generator_alpha(lmbda: float, alpha: float | None = None) -> float:
    """Eq. G1: alpha = (1 + lambda) / 2 unless overridden (`loss.alpha`)."""
    return (1 + lmbda) / 2 if alpha is None else alpha

def generator_loss(target: torch.Tensor, D_phi: torch.Tensor, D_psi: torch.Tensor, alpha: float,
                   gen_scale: float = 100.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. G1: generator loss (sum over pixels, mean over the batch). `weight` [N] overrides w_g."""
    if weight is None:
        weight = gen_scale / (target - D_phi).abs().flatten(1).mean(1).clamp(min=1e-5)
    delta = D_phi - D_psi
    return (weight.detach() * _per_sample_sum(delta * ((D_phi - target) - alpha * delta))).mean()

#----------------------------------------------------------------------------
# Eq. L1 step 3: generator EMA with a half-life in images, ramped as in SiD:
#   h = min(halflife, nimg * rampup),  beta = 0.5^(batch / h).

def ema_beta(batch: int, nimg: int, halflife_kimg: float, rampup: float | None) -> float:
    """Eq. L1 (EMA): per-step decay for a half-life given in thousands of images."""
    h = halflife_kimg * 1000
    if rampup is not None:
        h = min(h, nimg * rampup)
    return 0.5 ** (batch / max(h, 1e-8))

@torch.no_grad()
def ema_update(ema: torch.nn.Module | Iterable[torch.Tensor], net: torch.nn.Module | Iterable[torch.Tensor],
               beta: float) -> None:
    """Eq. L1 (EMA): ema <- beta ema + (1 - beta) net, elementwise: the parameters and buffers of two networks, or
    matching tensors (a rank's ZeRO-3 partitions)."""
    if isinstance(ema, torch.nn.Module):
        for e, b in zip(ema.buffers(), net.buffers()):
            e.copy_(b.reshape(e.shape))
        ema, net = ema.parameters(), net.parameters()
    for e, p in zip(ema, net, strict=True):
        e.lerp_(p.detach().to(e.dtype).reshape(e.shape), 1 - beta)

#----------------------------------------------------------------------------
# Eq. S1: the K-step sampler (Algorithm 1). Default grid: the first K points of the rho-grid with K + 1 points.

def default_grid(K: int, noise: NoiseRange, scale: float = 1.0) -> list[float]:
    """Eq. S1 default grid tau_K > ... > tau_1; `scale` multiplies the interior points (tuned greedily)."""
    if K < 1:
        raise ValueError(f'sampler steps K={K} must be >= 1')
    grid = edm_grid(K + 1, noise)[:K].tolist()
    return [grid[0]] + [min(tau * scale, noise.sigma_max) for tau in grid[1:]]

@torch.no_grad()
def cosim_sample(G: Net, z: torch.Tensor, labels: torch.Tensor | None, grid: list[float],
                 noise: list[torch.Tensor] | None = None, eta: float = 1.0) -> torch.Tensor:
    """Eq. S1: x = tau_K z; for k = K..1: x0_hat = G(x; tau_k, c); if k > 1: x = x0_hat + tau_{k-1} n, or with
    eta < 1 the Eq. K1 kernel the generator was trained with (mean + tau_{k-1} eta n). `noise` supplies the K-1
    re-noising draws (for seed-exact generation); NFE = K."""
    x = z * grid[0]
    for k, tau in enumerate(grid):
        x0_hat = G(x, torch.full((z.shape[0],), tau, device=z.device), labels)
        if k + 1 < len(grid):
            n = noise[k] if noise is not None else torch.randn_like(x0_hat)
            x = kernel_mean(x0_hat, x, grid[k + 1], tau, eta) + grid[k + 1] * eta * n
    return x0_hat

#----------------------------------------------------------------------------
# The teacher's Heun sampler (EDM Algorithm 2, deterministic): NFE = 2N - 1.

@torch.no_grad()
def heun_sample(net: Net, z: torch.Tensor, labels: torch.Tensor | None, num_steps: int = 18,
                noise: NoiseRange = NoiseRange()) -> torch.Tensor:
    """EDM Heun sampler from x = sigma_0 z down to sigma_N = 0 (float64 state, as EDM)."""
    sigmas = torch.cat([edm_grid(num_steps, noise), torch.zeros(1, dtype=torch.float64)])
    x = z.to(torch.float64) * sigmas[0]

    def d(x: torch.Tensor, sigma: float) -> torch.Tensor:
        den = net(x.float(), torch.full((x.shape[0],), sigma, device=x.device), labels).to(torch.float64)
        return (x - den) / sigma

    for i in range(num_steps):
        s_cur, s_next = sigmas[i].item(), sigmas[i + 1].item()
        d_cur = d(x, s_cur)
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d(x_next, s_next))
        x = x_next
    return x.float()

#----------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022) in the EDM parameterisation (alpha = 1, lambda = -ln sigma), the training-free
# baseline at matched NFE: with h_i = ln(sigma_i / sigma_{i+1}) and r_i = h_{i-1} / h_i,
#   D'_i = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},
#   x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) D'_i,
# first order at the first step and a final step to sigma = 0 that returns D of the last point. NFE = N.

@torch.no_grad()
def dpm_solver_2m_sample(net: Net, z: torch.Tensor, labels: torch.Tensor | None, nfe: int,
                         noise: NoiseRange = NoiseRange()) -> torch.Tensor:
    """DPM-Solver++(2M) from x = sigma_max z over the rho-grid with `nfe` points (float64 state)."""
    sigmas = edm_grid(nfe, noise).tolist() + [0.0]
    x, prev, h_prev = z.to(torch.float64) * sigmas[0], None, None
    for i in range(nfe):
        s, s_next = sigmas[i], sigmas[i + 1]
        D = net(x.float(), torch.full((z.shape[0],), s, device=z.device), labels).to(torch.float64)
        if s_next == 0:
            return D.float()
        h = math.log(s / s_next)
        D_hat = D if prev is None else (1 + h / (2 * h_prev)) * D - h / (2 * h_prev) * prev
        x = (s_next / s) * x + (1 - s_next / s) * D_hat
        prev, h_prev = D, h
    return x.float()

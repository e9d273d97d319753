"""The toy world: a class-conditional Gaussian mixture of images with an exact sampler, a closed-form
denoiser E[x0 | x_sigma, c] and exact first and second moments (the ground truth of the embedded run)."""

import math

import torch

from .config import GMMConfig
from .seeds import step_seed

#----------------------------------------------------------------------------
# Each class c owns `components` Gaussians N(mu_k, Sigma_k) with equal weights, where
#   Sigma_k = Q_k diag(a_k^2) Q_k^T + eps^2 I,  Q_k an orthonormal [D, rank] basis of smooth patterns.
# Classes are uniform. Everything is computed in float64 on the CPU.

def _smooth_patterns(n: int, channels: int, res: int, gen: torch.Generator) -> torch.Tensor:
    """n random smooth images [n, C*res*res]: bicubic upsampling of 4x4 noise, unit RMS."""
    coarse = torch.randn(n, channels, 4, 4, generator=gen, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse, size=(res, res), mode='bicubic', align_corners=False)
    fine = fine.flatten(1)
    return fine / fine.pow(2).mean(dim=1, keepdim=True).sqrt()

class GMMWorld:
    """Exact class-conditional Gaussian-mixture image distribution."""

    def __init__(self, cfg: GMMConfig, resolution: int = 16, channels: int = 3) -> None:
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        C, R, K = cfg.classes, cfg.components, cfg.rank
        self.shape = (channels, resolution, resolution)
        self.dim = math.prod(self.shape)
        templates = _smooth_patterns(C, channels, resolution, gen) * cfg.template_std
        offsets = _smooth_patterns(C * R, channels, resolution, gen) * cfg.offset_std
        self.mu = (templates.repeat_interleave(R, dim=0) + offsets)                     # [C*R, D]
        bases = _smooth_patterns(C * R * K, channels, resolution, gen).reshape(C * R, K, self.dim)
        self.Q = torch.linalg.qr(bases.transpose(1, 2)).Q                               # [C*R, D, K]
        self.a = cfg.variation_std * torch.linspace(1.0, 0.5, K, dtype=torch.float64).expand(C * R, K).clone()
        self.eps2 = cfg.noise_std ** 2

    @property
    def num_classes(self) -> int:
        return self.cfg.classes

    def _component_of(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(self.cfg.components, labels.shape, generator=gen)
        return labels * self.cfg.components + pick

    def sample(self, n: int, gen: torch.Generator,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact samples: (x0 float32 [n, C, H, W], labels int64 [n]); labels uniform unless given."""
        if labels is None:
            labels = torch.randint(self.cfg.classes, (n,), generator=gen)
        k = self._component_of(labels, gen)
        z = torch.randn(n, self.cfg.rank, generator=gen, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        x = self.mu[k] + math.sqrt(self.eps2) * e
        for comp in k.unique().tolist():                   # per component: avoids gathering [n, D, rank] bases
            rows = (k == comp).nonzero().flatten()
            x[rows] += (self.a[comp] * z[rows]) @ self.Q[comp].T
        return x.reshape(n, *self.shape).float(), labels

    #------------------------------------------------------------------------
    # Closed-form posterior mean. For x = x0 + sigma*n and one component,
    #   E[x0 | x, k] = mu + Q diag((a^2 + eps^2) / (a^2 + v)) Q^T r + eps^2 / v (r - Q Q^T r),
    #   r = x - mu, v = eps^2 + sigma^2,
    # and the component posterior is p(k | x, c) ~ N(x; mu_k, Sigma_k + sigma^2 I) over the components of class c.

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor):
        """Per component k of each sample's class: Q, a^2, mu, v = eps^2 + sigma^2, r = x - mu, proj = Q^T r, lam =
        a^2 + v and log N(x; mu_k, Sigma_k + sigma^2 I) (normalised), for x [n, ...] (float64)."""
        n = x.shape[0]
        xf = x.reshape(n, 1, self.dim).to(torch.float64)
        sigma2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(n).reshape(n, 1)
        ks = labels.reshape(n, 1) * self.cfg.components + torch.arange(self.cfg.components)    # [n, R]
        # [n,R,D,K], [n,R,K], [n,R,D]
        Q, a2, mu = self.Q[ks], self.a[ks] ** 2, self.mu[ks]
        v = (self.eps2 + sigma2 ** 2).unsqueeze(-1)                                              # [n,1,1]
        r = xf - mu                                                                              # [n,R,D]
        proj = torch.einsum('nrdk,nrd->nrk', Q, r)                                               # [n,R,K]
        perp2 = r.pow(2).sum(-1) - proj.pow(2).sum(-1)                                           # [n,R]
        lam = a2 + v                                                                             # [n,R,K]
        logp = -0.5 * ((proj ** 2 / lam).sum(-1) + perp2 / v[..., 0] + lam.log().sum(-1)
                       + (self.dim - self.cfg.rank) * v[..., 0].log() + self.dim * math.log(2 * math.pi))
        return Q, a2, mu, v, r, proj, lam, logp

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
        """Exact E[x0 | x_sigma = x, c] for x [n, C, H, W], sigma scalar or [n], labels int64 [n]."""
        Q, a2, mu, v, r, proj, lam, logp = self._terms(x, sigma, labels)
        w = torch.softmax(logp, dim=1)                                                           # [n,R]
        post = mu + torch.einsum('nrdk,nrk->nrd', Q,
                                 proj * ((a2 + self.eps2) / lam - self.eps2 / v)) + (self.eps2 / v) * r
        return (w.unsqueeze(-1) * post).sum(1).reshape(x.shape).to(x.dtype)

    def widen(self, x: torch.Tensor, labels: torch.Tensor, factor: float) -> torch.Tensor:
        """x [n, C, H, W] with each sample's offset from its most probable component's mean, inside that component's
        subspace, scaled by `factor`: x + (factor - 1) Q Q^T (x - mu) (factor > 1: off the data, on its modes)."""
        Q, _, _, _, _, proj, _, logp = self._terms(x, 0.0, labels)
        k = logp.argmax(1)
        rows = torch.arange(len(k))
        inside = torch.einsum('ndk,nk->nd', Q[rows, k], proj[rows, k])
        return (x.reshape(len(k), -1).double() + (factor - 1) * inside).reshape(x.shape).to(x.dtype)

    def components(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For samples x [n, ...] of classes `labels`: the most probable component of the class (index 0..R-1), the
        sample's coordinates in that component's basis whitened by its true variances, (Q^T (x - mu)) / sqrt(a^2 +
        eps^2) [n, rank] (N(0, I) for exact samples), and the exact log-likelihood log p(x | c) [n] (float64)."""
        _, _, _, _, _, proj, lam, logp = self._terms(x, 0.0, labels)
        k = logp.argmax(1)
        z = (proj / lam.sqrt())[torch.arange(len(k)), k]
        return k, z, torch.logsumexp(logp, 1) - math.log(self.cfg.components)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean [D] and covariance [D, D] of x0 over the label-marginal mixture (float64)."""
        mean = self.mu.mean(0)
        second = torch.einsum('ndk,nk,nek->de', self.Q, self.a ** 2, self.Q) / len(self.mu)
        second += torch.eye(self.dim, dtype=torch.float64) * self.eps2 + self.mu.T @ self.mu / len(self.mu)
        return mean, second - torch.outer(mean, mean)

class ExactDenoiser(torch.nn.Module):
    """The world's closed-form denoiser with a network's call signature, net(x, sigma, class_labels) -> E[x0 | x, c]:
    the exact D_phi of `teacher.kind=exact` (the same in Eqs. A1, G1 and the teacher baselines). Differentiable in x,
    as Eq. G1 needs (the generator's gradient flows through D_phi's input)."""

    def __init__(self, world: GMMWorld) -> None:
        super().__init__()
        self.world = world

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                *_) -> torch.Tensor:
        labels = class_labels.argmax(1).cpu() if class_labels is not None else torch.zeros(len(x), dtype=torch.long)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        return self.world.denoise(x.cpu(), sigma, labels).to(x.device, x.dtype)

#----------------------------------------------------------------------------
# The toy world as a data stream. Step k of the global stream draws the whole global batch from a generator
# seeded by (seed, k) and each rank takes its slice, so the samples do not depend on the number of ranks and
# the whole state is the number of samples consumed.

class GMMStream:
    """Batches (x0 [B, C, H, W], one-hot labels [B, classes]) of exact samples for one rank."""

    def __init__(self, world: GMMWorld, batch_per_rank: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.world, self.batch, self.seed, self.rank, self.world_size = world, batch_per_rank, seed, rank, world_size
        self.consumed = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.batch * self.world_size
        step = self.consumed // global_batch
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        x0, labels = self.world.sample(global_batch, gen)
        rows = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
        self.consumed += global_batch
        return x0[rows], torch.nn.functional.one_hot(labels[rows], self.world.num_classes).float()

    def state_dict(self) -> dict:
        return {'version': 1, 'consumed': self.consumed, 'global_batch': self.batch * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get('global_batch', self.batch * self.world_size) != self.batch * self.world_size:
            raise ValueError(f'data state was saved with global batch {state["global_batch"]}, now '
                             f'{self.batch * self.world_size}: resume with the same train.batch')
        self.consumed = int(state['consumed'])

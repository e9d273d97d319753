"""Samplers over per-seed inputs: the teacher's Heun and DPM-Solver++(2M) samplers and CoSIM's Eq. S1 as table rows,
per-seed generation (image i always uses seed i, so results depend on neither batch size nor world size), pixel-space
float64 moments across ranks, and the greedy search of Eq. S1 grids."""

import dataclasses
from collections.abc import Callable, Sequence

import torch

from .. import cosim
from .metrics import MomentAccumulator

Sampler = Callable[[torch.Tensor, torch.Tensor | None, list[torch.Tensor]], torch.Tensor]

@dataclasses.dataclass
class SamplerSpec:
    name: str                 # table row name
    nfe: int                  # network evaluations per sample
    extra_draws: int          # Gaussian draws per sample beyond z (K - 1 for Eq. S1)
    fn: Sampler               # (z, labels, noise draws) -> images
    grid: list[float]         # the noise levels the sampler visits (recorded with its results)

def _solver_grid(num_points: int, noise: cosim.NoiseRange) -> list[float]:
    return cosim.edm_grid(num_points, noise).tolist() + [0.0]

def heun_spec(teacher: torch.nn.Module, num_steps: int, noise: cosim.NoiseRange) -> SamplerSpec:
    return SamplerSpec(f'teacher Heun (N={num_steps})', 2 * num_steps - 1, 0,
                       lambda z, c, _: cosim.heun_sample(teacher, z, c, num_steps, noise),
                       _solver_grid(num_steps, noise))

def dpm_spec(teacher: torch.nn.Module, nfe: int, noise: cosim.NoiseRange) -> SamplerSpec:
    return SamplerSpec(f'teacher DPM-Solver++(2M) (N={nfe})', nfe, 0,
                       lambda z, c, _: cosim.dpm_solver_2m_sample(teacher, z, c, nfe, noise), _solver_grid(nfe, noise))

def cosim_spec(G: torch.nn.Module, grid: list[float], eta: float = 1.0, name: str = 'CoSIM') -> SamplerSpec:
    """Eq. S1 over an explicit grid tau_K > ... > tau_1, re-noising with the Eq. K1 kernel of `kernel.eta`."""
    return SamplerSpec(f'{name} K={len(grid)}', len(grid), len(grid) - 1,
                       lambda z, c, n: cosim.cosim_sample(G, z, c, grid, n, eta), list(grid))

def seed_labels(seeds: Sequence[int], label_dim: int) -> torch.Tensor:
    """The class label of each seed (int64; the first draw of its generator, as in seeded_inputs)."""
    return torch.stack([torch.randint(max(label_dim, 1), (), generator=torch.Generator().manual_seed(s))
                        for s in seeds])

def seeded_inputs(seeds: Sequence[int], shape: tuple[int, ...], label_dim: int, extra_draws: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Per-image inputs: image i draws its label, z and re-noising draws from a generator seeded by i."""
    zs, labels, draws = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        labels.append(torch.randint(max(label_dim, 1), (), generator=gen))  # = seed_labels
        zs.append(torch.randn(shape, generator=gen))
        draws.append(torch.randn(extra_draws, *shape, generator=gen))
    c = torch.nn.functional.one_hot(torch.stack(labels), label_dim).float().to(device) if label_dim else None
    noise = list(torch.stack(draws).to(device).transpose(0, 1))
    return torch.stack(zs).to(device), c, noise

@torch.no_grad()
def sample(spec: SamplerSpec, seeds: Sequence[int], shape: tuple[int, ...], label_dim: int, device: torch.device,
           classes: torch.Tensor | None = None) -> torch.Tensor:
    """One batch: the sampler's images of `seeds`; `classes` (one per seed; ignored by unconditional models) replace
    the seeds' own labels (their draws still happen, so z and the re-noising draws stay those of the seeds)."""
    z, c, noise = seeded_inputs(seeds, shape, label_dim, spec.extra_draws, device)
    if classes is not None and label_dim:
        c = torch.nn.functional.one_hot(classes, label_dim).float().to(device)
    return spec.fn(z, c, noise)

@torch.no_grad()
def generate(spec: SamplerSpec, seeds: range, shape: tuple[int, ...], label_dim: int, batch: int,
             device: torch.device, on_batch: Callable[[torch.Tensor, range], None]) -> None:
    """Run a sampler over `seeds` in batches and hand every batch of images, with its seeds, to `on_batch`."""
    for start in range(seeds.start, seeds.stop, batch):
        part = range(start, min(start + batch, seeds.stop))
        on_batch(sample(spec, part, shape, label_dim, device), part)

def rank_seeds(seeds: range, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the seeds (image i always uses seed i, whatever the world size)."""
    per = -(-len(seeds) // world_size)
    return range(seeds.start + rank * per, min(seeds.start + (rank + 1) * per, seeds.stop))

def sampler_moments(spec: SamplerSpec, seeds: range, shape: tuple[int, ...], label_dim: int, batch: int,
                    device: torch.device, progress: Callable[[int], None] = lambda n: None, rank: int = 0,
                    world_size: int = 1, also: Callable[[torch.Tensor, range], None] = lambda x, s: None
                    ) -> MomentAccumulator:
    """Pixel-space float64 moments of a sampler's images, generated across ranks and all-reduced; `also` sees every
    batch (images and seeds) as well."""
    acc = MomentAccumulator(int(torch.tensor(shape).prod()))
    seeds = rank_seeds(seeds, rank, world_size)

    def consume(images: torch.Tensor, part: range) -> None:
        acc.update(images.flatten(1))
        also(images, part)
        progress(images.shape[0])

    generate(spec, seeds, shape, label_dim, batch, device, consume)
    acc.all_reduce()
    return acc

#----------------------------------------------------------------------------
# Eq. S1 grids: greedy search of the interior points.

def tune_grid(grid: list[float], score: Callable[[list[float]], float],
              factors: tuple[float, ...] = (0.5, 0.7, 1.4, 2.0)) -> tuple[list[float], float]:
    """Greedy search over the interior points of an Eq. S1 grid: each point in turn is multiplied by the factor
    that lowers `score` most (the grid stays strictly decreasing). Returns the grid and its score."""
    best = score(grid)
    for k in range(1, len(grid)):
        base = list(grid)
        for f in factors:
            cand = list(base)
            cand[k] *= f
            if not cand[k - 1] > cand[k] > (cand[k + 1] if k + 1 < len(cand) else 0):
                continue
            if (value := score(cand)) < best:
                grid, best = cand, value
    return grid, best

"""Evaluation of the toy world against its exact ground truth, every sampler next to the floor of exact samples: the
Frechet distance to the exact moments, and diversity inside the modes (ComponentStats: within-component Frechet
distance, component-weight error, exact NLL); samples.png (one labelled row per sampler, the same seeds in every
column)."""

from collections.abc import Callable

import numpy as np
import torch

from .. import cosim
from ..build import make_logger, make_world, noise_range, publish
from ..config import Config
from ..distributed import DistEnv
from ..logging import log, save_image_grid
from ..toy import GMMWorld
from .decode import pixels_to_uint8
from .metrics import MomentAccumulator, frechet_distance, frechet_to_reference
from .results import write_results
from .samplers import cosim_spec, dpm_spec, heun_spec, sample, sampler_moments, seed_labels, seeded_inputs, tune_grid

# eval.json columns of a toy row, with the printed table's headers
TOY_METRICS = {'frechet_distance': 'Frechet dist.', 'within_component_fd': 'within-comp. FD',
               'within_component_bias': '(its bias)', 'component_weight_tv': 'weight TV', 'nll_per_dim': 'NLL/dim'}

def evaluate_toy(cfg: Config, teacher: torch.nn.Module, G: torch.nn.Module, device: torch.device,
                 env: DistEnv = DistEnv()) -> list[dict]:
    """Collective: every rank generates its share of the seeds; rank 0 writes eval.json and samples.png.
    Rows: the noise floor, the teacher's Heun and DPM-Solver++(2M) samplers, CoSIM at each K (grid in the row)."""
    world, e, noise = make_world(cfg), cfg.eval, noise_range(cfg)
    shape, label_dim = world.shape, cfg.model.label_dim
    ref_mu, ref_sigma = (m.numpy() for m in world.moments())

    def fd(spec, seeds: range, progress=lambda n: None) -> float:
        acc = sampler_moments(spec, seeds, shape, label_dim, e.batch, device, progress, env.rank, env.world_size)
        return frechet_to_reference(acc, ref_mu, ref_sigma)

    def row(spec, seeds: range, progress) -> dict:
        comp = ComponentStats(world)
        acc = sampler_moments(spec, seeds, shape, label_dim, e.batch, device, progress, env.rank, env.world_size,
                              also=lambda x, part: comp.update(x, seed_labels(part, label_dim)))
        comp.all_reduce()
        return {'name': spec.name, 'nfe': spec.nfe, 'frechet_distance': frechet_to_reference(acc, ref_mu, ref_sigma),
                **comp.metrics()}

    grids = {K: cosim.default_grid(K, noise, e.grid_scale) for K in e.steps}
    if e.tune_grid:
        tune_seeds = range(e.seed + e.num_samples, e.seed + e.num_samples + e.tune_samples)
        for K in e.steps:
            grids[K], score = tune_grid(grids[K], lambda g: fd(cosim_spec(G, g, cfg.kernel.eta), tune_seeds))
            log.info(f'tuned grid K={K}: {[round(t, 4) for t in grids[K]]} (FD {score:.4f} on {e.tune_samples} seeds)')
    specs = ([heun_spec(teacher, e.heun_steps, noise)] + [dpm_spec(teacher, n, noise) for n in e.dpm_nfe]
             + [cosim_spec(G, grids[K], cfg.kernel.eta) for K in e.steps])
    logger = make_logger(cfg, 'eval', env.rank)
    logger.start(e.num_samples * (len(specs) + 1), 0, 'evaluate')
    floor = ComponentStats(world)
    exact = exact_moments(world, e.num_samples, e.seed, e.batch, also=floor.update)
    logger.advance(e.num_samples)
    rows = [{'name': 'exact samples (noise floor)', 'nfe': 0,
             'frechet_distance': frechet_to_reference(exact, ref_mu, ref_sigma), **floor.metrics()}]
    seeds = range(e.seed, e.seed + e.num_samples)
    for spec in specs:
        rows.append(row(spec, seeds, logger.advance))
        logger.scalars(0, {f'eval/{spec.name}/{k}': v for k, v in rows[-1].items() if k in TOY_METRICS})
    for row, K in zip(rows[-len(e.steps):], e.steps):
        row['grid'] = grids[K]
    logger.close()
    grid_images = _sample_grid(cfg, world, specs, device)
    if env.rank == 0:
        write_results(rows, cfg.run_dir / 'eval.json')
        save_image_grid(pixels_to_uint8(grid_images), cfg.run_dir / 'samples.png', rows=len(specs) + 1,
                        labels=['ground truth'] + [spec.name for spec in specs])
        publish(cfg, cfg.run_dir / 'eval.json', cfg.run_dir / 'samples.png')
    return rows

class ComponentStats:
    """Diversity inside the modes, against the world's exact structure: each sample is assigned to the most probable
    component of its class, and in that component's rank-K basis whitened by its true variances it should be N(0, I).
      within_component_fd: mean over components of the Frechet distance of those coordinates to N(0, I) (a sampler
                           that returns each component's mean scores K = gmm.rank; exact samples the finite-n floor)
      within_component_bias: its mean-offset term, the mean over components of |E z|^2 (the rest is the spread's
                           error: too little, too much or misdirected variation inside the component)
      component_weight_tv: mean over classes of the total-variation distance between the share of samples in each
                           component and the true equal weights
      nll_per_dim:         mean exact negative log-likelihood -log p(x | c) per pixel (nats)
    Sums in float64, all-reduced across ranks."""

    def __init__(self, world: GMMWorld) -> None:
        self.world, n, K = world, world.cfg.classes * world.cfg.components, world.cfg.rank
        f64 = {'dtype': torch.float64}
        self.count, self.sum, self.outer = torch.zeros(n, **f64), torch.zeros(n, K, **f64), torch.zeros(n, K, K, **f64)
        self.nll = torch.zeros(1, **f64)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        k, z, loglik = self.world.components(x.detach().cpu(), labels.cpu())
        comp = labels.cpu() * self.world.cfg.components + k
        self.count.index_add_(0, comp, torch.ones(len(comp), dtype=torch.float64))
        self.sum.index_add_(0, comp, z)
        self.outer.index_add_(0, comp, z.unsqueeze(2) * z.unsqueeze(1))
        self.nll -= loglik.sum()

    def all_reduce(self) -> None:
        if torch.distributed.is_initialized():
            for t in (self.count, self.sum, self.outer, self.nll):
                torch.distributed.all_reduce(t)

    def metrics(self) -> dict[str, float]:
        K, R = self.world.cfg.rank, self.world.cfg.components
        fds, biases = [], []
        for c in (self.count >= 2).nonzero().flatten().tolist():
            n, mu = self.count[c], self.sum[c] / self.count[c]
            cov = (self.outer[c] - n * torch.outer(mu, mu)) / (n - 1)
            fds.append(frechet_distance(mu.numpy(), cov.numpy(), np.zeros(K), np.eye(K)))
            biases.append(float(mu.pow(2).sum()))
        unvisited = int((self.count < 2).sum())              # a component (nearly) never visited: as if collapsed
        fds, biases = fds + [float(K)] * unvisited, biases + [0.0] * unvisited
        share = self.count.reshape(-1, R) / self.count.reshape(-1, R).sum(1, keepdim=True).clamp(min=1)
        return {'within_component_fd': float(np.mean(fds)), 'within_component_bias': float(np.mean(biases)),
                'component_weight_tv': float((0.5 * (share - 1 / R).abs().sum(1)).mean()),
                'nll_per_dim': float(self.nll.item() / self.count.sum().item() / self.world.dim)}

def exact_moments(world: GMMWorld, n: int, seed: int, batch: int,
                  also: Callable[[torch.Tensor, torch.Tensor], None] = lambda x, c: None) -> MomentAccumulator:
    """Moments of n exact samples: the Frechet distance they reach is the finite-sample noise floor. `also` sees
    every batch (samples and labels) as well."""
    acc, gen = MomentAccumulator(world.dim), torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        x, labels = world.sample(min(batch, n - start), gen)
        acc.update(x.flatten(1))
        also(x, labels)
    return acc

def _sample_grid(cfg: Config, world: GMMWorld, specs, device: torch.device, cols: int = 20) -> torch.Tensor:
    """Images for samples.png: one row per sampler (ground truth first), the same seeds and labels in every row."""
    _, c, _ = seeded_inputs(range(cols), world.shape, cfg.model.label_dim, 0, device)
    rows = [world.sample(cols, torch.Generator().manual_seed(0), labels=c.argmax(1).cpu())[0].to(device)]
    rows += [sample(spec, range(cols), world.shape, cfg.model.label_dim, device) for spec in specs]
    return torch.cat(rows)

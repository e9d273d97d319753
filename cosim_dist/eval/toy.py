"""Evaluation of the toy world: every sampler's Frechet distance to the exact ground-truth moments, next to the noise
floor of exact samples, and samples.png (one labelled row per sampler, the same seeds in every column)."""

import torch

from .. import cosim
from ..build import make_logger, make_world, noise_range, publish
from ..config import Config
from ..distributed import DistEnv
from ..logging import log, save_image_grid
from ..toy import GMMWorld
from .decode import pixels_to_uint8
from .metrics import MomentAccumulator, frechet_to_reference
from .results import write_results
from .samplers import cosim_spec, dpm_spec, heun_spec, sample, sampler_moments, seeded_inputs, tune_grid

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

    grids = {K: cosim.default_grid(K, noise, e.grid_scale) for K in e.steps}
    if e.tune_grid:
        tune_seeds = range(e.seed + e.num_samples, e.seed + e.num_samples + e.tune_samples)
        for K in e.steps:
            grids[K], score = tune_grid(grids[K], lambda g: fd(cosim_spec(G, g), tune_seeds))
            log.info(f'tuned grid K={K}: {[round(t, 4) for t in grids[K]]} (FD {score:.4f} on {e.tune_samples} seeds)')
    specs = ([heun_spec(teacher, e.heun_steps, noise)] + [dpm_spec(teacher, n, noise) for n in e.dpm_nfe]
             + [cosim_spec(G, grids[K]) for K in e.steps])
    logger = make_logger(cfg, 'eval', env.rank)
    logger.start(e.num_samples * (len(specs) + 1), 0, 'evaluate')
    exact = exact_moments(world, e.num_samples, e.seed, e.batch)
    logger.advance(e.num_samples)
    rows = [{'name': 'exact samples (noise floor)', 'nfe': 0,
             'frechet_distance': frechet_to_reference(exact, ref_mu, ref_sigma)}]
    seeds = range(e.seed, e.seed + e.num_samples)
    for spec in specs:
        rows.append({'name': spec.name, 'nfe': spec.nfe, 'frechet_distance': fd(spec, seeds, logger.advance)})
        logger.scalars(0, {f'eval/{spec.name}': rows[-1]['frechet_distance']})
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

def exact_moments(world: GMMWorld, n: int, seed: int, batch: int) -> MomentAccumulator:
    """Moments of n exact samples: the Frechet distance they reach is the finite-sample noise floor."""
    acc, gen = MomentAccumulator(world.dim), torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        acc.update(world.sample(min(batch, n - start), gen)[0].flatten(1))
    return acc

def _sample_grid(cfg: Config, world: GMMWorld, specs, device: torch.device, cols: int = 20) -> torch.Tensor:
    """Images for samples.png: one row per sampler (ground truth first), the same seeds and labels in every row."""
    _, c, _ = seeded_inputs(range(cols), world.shape, cfg.model.label_dim, 0, device)
    rows = [world.sample(cols, torch.Generator().manual_seed(0), labels=c.argmax(1).cpu())[0].to(device)]
    rows += [sample(spec, range(cols), world.shape, cfg.model.label_dim, device) for spec in specs]
    return torch.cat(rows)

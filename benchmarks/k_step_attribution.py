"""Where a K-step CoSIM sampler (Eq. S1) loses its quality on the toy world, jump by jump.

For a finished toy run (its run directory: config.yaml, generator.pt, and the toy teacher in the run root's cache):
  G one step @ tau       G(x0 + tau n; tau, c) from exact x0: what the generator makes of a perfect input at tau
  chain @ tau_k -> Heun  the teacher's Heun sampler (N steps) from the state of Eq. S1 at tau_k, i.e. after the jumps
                         tau_K -> ... -> tau_k of the generator
  exact @ tau_k -> Heun  the same Heun sampler from exact x0 + tau_k n
At each interior tau_k, the gap between the last two rows is the error that the jumps above tau_k have put into the
sampler's state; the last row is the whole K-step sampler. Columns: the toy metrics of eval.json (eval/toy.py:
ComponentStats), where the within-component FD includes its bias term. Labels, x0 and every noise draw are shared by
all rows (one seed).

    python benchmarks/k_step_attribution.py RUN_DIR [--steps 4] [--samples 4000] [--heun-steps 18]
"""

import argparse
import pathlib
import sys

import torch
from omegaconf import OmegaConf

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cosim_dist import cosim  # noqa: E402
from cosim_dist.build import denoiser, make_world, noise_range, toy_teacher_path  # noqa: E402
from cosim_dist.config import Config  # noqa: E402
from cosim_dist.eval.results import format_table  # noqa: E402
from cosim_dist.eval.toy import TOY_METRICS, ComponentStats  # noqa: E402
from cosim_dist.teacher_io import load_snapshot  # noqa: E402

def run_config(run_dir: pathlib.Path) -> Config:
    """The resolved Config a run recorded in its config.yaml."""
    path = run_dir / 'config.yaml'
    if not path.is_file():
        raise SystemExit(f'{path} does not exist: pass the directory of a finished toy run (run.root/run.name)')
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))

def heun_from(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor | None, tau: float, heun_steps: int,
              noise: cosim.NoiseRange) -> torch.Tensor:
    """The Heun sampler of `net` from x at noise level tau to 0: N steps on the rho-grid from tau to sigma_min."""
    below = cosim.NoiseRange(sigma_min=noise.sigma_min, sigma_max=tau, rho=noise.rho)
    return cosim.heun_sample(net, x / tau, c, heun_steps, below)

@torch.no_grad()
def attribution(cfg: Config, G: torch.nn.Module, teacher: torch.nn.Module, steps: int, samples: int,
                heun_steps: int, seed: int = 0) -> list[dict]:
    """The rows described in the module docstring, each {'name', 'nfe', **ComponentStats metrics}."""
    world, noise = make_world(cfg), noise_range(cfg)
    grid = cosim.default_grid(steps, noise, cfg.eval.grid_scale)
    gen = torch.Generator().manual_seed(seed)
    x0, labels = world.sample(samples, gen)
    c = torch.nn.functional.one_hot(labels, world.num_classes).float()
    z, draws = torch.randn(x0.shape, generator=gen), [torch.randn(x0.shape, generator=gen) for _ in grid]
    sigma = lambda tau: torch.full((samples,), tau)

    def row(name: str, nfe: int, x: torch.Tensor) -> dict:
        stats = ComponentStats(world)
        stats.update(x, labels)
        return {'name': name, 'nfe': nfe, **stats.metrics()}

    rows = [row('exact samples (floor)', 0, x0)]
    rows += [row(f'G one step @ {tau:.4g}', 1, G(x0 + tau * draws[k], sigma(tau), c)) for k, tau in enumerate(grid)]
    heun = lambda x, tau: heun_from(teacher, x, c, tau, heun_steps, noise)
    for k, tau in enumerate(grid[1:], start=1):
        # the Eq. S1 state at tau_k: the sampler over the first k grid points, re-noised to tau_k (draws[j] re-noises
        # to grid[j], as in the whole sampler below)
        x = cosim.cosim_sample(G, z, c, grid[:k], draws[1:]) + tau * draws[k]
        rows.append(row(f'chain @ {tau:.4g} -> Heun', k + 2 * heun_steps - 1, heun(x, tau)))
        rows.append(row(f'exact @ {tau:.4g} -> Heun', 2 * heun_steps - 1, heun(x0 + tau * draws[k], tau)))
    rows.append(row(f'CoSIM K={steps} (whole sampler)', steps, cosim.cosim_sample(G, z, c, grid, draws[1:])))
    return rows

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dir', type=pathlib.Path)
    p.add_argument('--steps', type=int, default=4, help='K of the Eq. S1 sampler (its default grid)')
    p.add_argument('--samples', type=int, default=4000)
    p.add_argument('--heun-steps', type=int, default=18)
    a = p.parse_args()
    cfg = run_config(a.run_dir)
    if cfg.model.arch != 'toy' or cfg.data.kind != 'gmm':
        raise SystemExit(f'{a.run_dir} is not a toy run (model.arch={cfg.model.arch}, data.kind={cfg.data.kind})')
    G = load_snapshot(a.run_dir / 'generator.pt')[0]
    teacher = denoiser(cfg, load_snapshot(toy_teacher_path(cfg))[0])
    rows = attribution(cfg, G, teacher, a.steps, a.samples, a.heun_steps)
    print(format_table(rows, {k: v for k, v in TOY_METRICS.items() if k != 'frechet_distance'}))

if __name__ == '__main__':
    main()

"""What any distillation could reach at one noise level in a toy run's budget: the generator's network, started from
the teacher's weights, regressed onto the teacher's own ODE solution from sigma = tau (Heun, tau -> 0).

This is the easiest supervised form of the generator's job at tau (one noise level instead of all, the exact target
instead of Eq. G1's score signal), with the run's budget and optimiser (train.kimg / train.batch steps of
train.batch, Adam with train.beta1, train.beta2 and train.lr_g unless --lr). If it stays far from the teacher's Heun
inside the components, no distillation of this network at this budget gets there, whatever its schedule. Rows (toy
metrics of eval.json, eval/toy.py: ComponentStats; one seed, x0 and noise shared by every row), each with the mean
squared distance per sample to the teacher's ODE solution of the same x_tau:
  teacher Heun from x_tau        the regression target itself
  teacher one step               the teacher's denoiser D(x_tau; tau), where the generator starts
  run generator one step         G(x_tau; tau) of the CoSIM run (its generator.pt)
  regressed G after N steps      the regression at quarters of its budget

    python benchmarks/ode_regression.py RUN_DIR [--tau 2.515] [--steps N] [--lr LR] [--samples 4000]
"""

import argparse
import copy
import math
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

from k_step_attribution import heun_from, run_config  # noqa: E402

from cosim_dist.build import make_world, noise_range, toy_teacher_path  # noqa: E402
from cosim_dist.config import Config  # noqa: E402
from cosim_dist.eval.results import format_table  # noqa: E402
from cosim_dist.eval.toy import TOY_METRICS, ComponentStats  # noqa: E402
from cosim_dist.teacher_io import load_snapshot  # noqa: E402

def ode_regression(cfg: Config, teacher: torch.nn.Module, G_run: torch.nn.Module | None, tau: float, steps: int,
                   lr: float, samples: int, heun_steps: int, seed: int = 0) -> list[dict]:
    """The rows described in the module docstring, each {'name', 'nfe', 'mse_to_ode', **ComponentStats metrics}."""
    world, noise, t = make_world(cfg), noise_range(cfg), cfg.train
    gen = torch.Generator().manual_seed(seed)
    x0, labels = world.sample(samples, gen)
    c = torch.nn.functional.one_hot(labels, world.num_classes).float()
    x_tau, sigma = x0 + tau * torch.randn(x0.shape, generator=gen), torch.full((samples,), tau)
    target = heun_from(teacher, x_tau, c, tau, heun_steps, noise)

    def row(name: str, nfe: int, x: torch.Tensor) -> dict:
        stats = ComponentStats(world)
        stats.update(x, labels)
        return {'name': name, 'nfe': nfe, 'mse_to_ode': (x - target).pow(2).flatten(1).sum(1).mean().item(),
                **stats.metrics()}

    with torch.no_grad():
        rows = [row(f'teacher Heun from x_{tau:.4g}', 2 * heun_steps - 1, target),
                row('teacher one step', 1, teacher(x_tau, sigma, c))]
        if G_run is not None:
            rows.append(row('run generator one step', 1, G_run(x_tau, sigma, c)))
    G = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(t.beta1, t.beta2), eps=t.eps)
    data = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        x0_b, lab = world.sample(t.batch, data)
        c_b = torch.nn.functional.one_hot(lab, world.num_classes).float()
        x_b = x0_b + tau * torch.randn(x0_b.shape, generator=data)
        y = heun_from(teacher, x_b, c_b, tau, heun_steps, noise)
        loss = (G(x_b, torch.full((len(x_b),), tau), c_b) - y).pow(2).flatten(1).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(steps // 4, 1) == 0 or step == steps:
            with torch.no_grad():
                rows.append(row(f'regressed G after {step} steps', 1, G.eval()(x_tau, sigma, c)))
            G.train()
            print(f'{step} / {steps} steps: loss {loss.item():.4f}', file=sys.stderr, flush=True)
    return rows

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dir', type=pathlib.Path)
    p.add_argument('--tau', type=float, default=2.515, help='the noise level (default: the K=2 / K=4 grid point)')
    p.add_argument('--steps', type=int, default=None, help='regression steps (default: the run\'s generator steps)')
    p.add_argument('--lr', type=float, default=None, help='learning rate (default: the run\'s train.lr_g)')
    p.add_argument('--samples', type=int, default=4000)
    p.add_argument('--heun-steps', type=int, default=18)
    a = p.parse_args()
    cfg = run_config(a.run_dir)
    if cfg.model.arch != 'toy' or cfg.data.kind != 'gmm' or cfg.teacher.kind != 'network':
        raise SystemExit(f'{a.run_dir} is not a toy run with a network teacher')
    teacher = load_snapshot(toy_teacher_path(cfg))[0].eval()
    steps = a.steps or math.ceil(int(cfg.train.kimg * 1000) / cfg.train.batch)    # the trainer's: until nimg >= kimg
    rows = ode_regression(cfg, teacher, load_snapshot(a.run_dir / 'generator.pt')[0].eval(), a.tau, steps,
                          a.lr or cfg.train.lr_g, a.samples, a.heun_steps)
    columns = {k: v for k, v in TOY_METRICS.items() if k != 'frechet_distance'}
    print(format_table(rows, {'mse_to_ode': 'MSE to ODE', **columns}))

if __name__ == '__main__':
    main()

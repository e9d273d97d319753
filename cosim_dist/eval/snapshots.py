"""Periodic snapshots during training (`eval.every_kimg`): the generator EMA saved as
`<run dir>/snapshots/generator-kimg<kimg>.pt` (with its Eq. S1 grids, like generator.pt), a quick Frechet distance of
the Eq. S1 sampler at every K of `eval.steps` on the first `eval.quick_samples` evaluation seeds (the same seeds at
every snapshot, so the curve shows training, not seed noise) appended to `<run dir>/metrics.jsonl`, and
`<run dir>/progress.png`: the losses of train.jsonl and the snapshot distances over training.

Toy world: the distance to the exact moments, next to the exact-samples floor at the same sample count. Real models:
the first metric of `eval.metrics` (FID or FD-DINOv2) against `eval.ref`, generated in chunks across ranks."""

import json
import math
import pathlib
import time
from collections.abc import Callable

import torch

from .. import cosim
from ..build import make_world, noise_range, publish
from ..config import Config
from ..distributed import DistEnv
from ..storage import write_atomic
from ..teacher_io import save_snapshot
from .decode import make_decoder
from .features import build_metrics, reference_stats
from .metrics import frechet_to_reference
from .samplers import cosim_spec, sampler_moments

Scorer = Callable[[torch.nn.Module, dict[int, list[float]]], dict[int, float]]   # (EMA, grids) -> {K: distance}

def toy_scorer(cfg: Config, device: torch.device, env: DistEnv) -> tuple[Scorer, str, float]:
    """(scorer, metric name, noise floor): distances of the Eq. S1 sampler to the toy world's exact moments."""
    from .toy import exact_moments
    world, e = make_world(cfg), cfg.eval
    ref_mu, ref_sigma = (m.numpy() for m in world.moments())
    seeds = range(e.seed, e.seed + e.quick_samples)
    floor = frechet_to_reference(exact_moments(world, e.quick_samples, e.seed, e.batch), ref_mu, ref_sigma)

    def score(G: torch.nn.Module, grids: dict[int, list[float]]) -> dict[int, float]:
        return {K: frechet_to_reference(sampler_moments(cosim_spec(G, grid, cfg.kernel.eta), seeds, world.shape,
                                                        cfg.model.label_dim, e.batch, device, rank=env.rank,
                                                        world_size=env.world_size),
                                        ref_mu, ref_sigma) for K, grid in grids.items()}
    return score, 'frechet_distance', floor

def real_scorer(cfg: Config, device: torch.device, env: DistEnv) -> tuple[Scorer, str, float | None]:
    """(scorer, metric name, None): the first metric of eval.metrics against eval.ref, through the evaluation's own
    pipeline (decoder, extractor, per-seed chunks over ranks)."""
    from .real import Entry, Pipeline
    e = cfg.eval
    metric = build_metrics(e.metrics[:1], {'inception': e.inception_weights, 'dinov2': e.dinov2_weights}, device)
    ref = reference_stats(e.ref, metric)[metric[0].name]
    decode = make_decoder(cfg.model.channels, e.vae, device, e.decode_batch, cfg.model.latent_raw_mean,
                          cfg.model.latent_raw_std)
    pipe, seeds = Pipeline(decode, metric, e.batch, device), range(e.seed, e.seed + e.quick_samples)

    def score(G: torch.nn.Module, grids: dict[int, list[float]]) -> dict[int, float]:
        return {K: frechet_to_reference(pipe.statistics(Entry(cosim_spec(G, grid, cfg.kernel.eta), G, {}), seeds,
                                                        e.chunk, env, lambda: False)[metric[0].name], *ref)
                for K, grid in grids.items()}
    return score, metric[0].name, None

class Snapshots:
    """Collective callable (nimg, EMA) -> scalars for the training log: every rank scores its share of the seeds;
    rank 0 writes the snapshot file, the metrics.jsonl row and progress.png."""

    def __init__(self, cfg: Config, device: torch.device, env: DistEnv, real: bool) -> None:
        self.cfg, self.run_dir, self.rank, self.num_samples = cfg, cfg.run_dir, env.rank, cfg.eval.quick_samples
        self.grids = {K: cosim.default_grid(K, noise_range(cfg), cfg.eval.grid_scale) for K in cfg.eval.steps}
        self.score, self.metric, self.floor = (real_scorer if real else toy_scorer)(cfg, device, env)

    def __call__(self, nimg: int, ema: torch.nn.Module) -> dict[str, float]:
        distances = self.score(ema, self.grids)
        if self.rank != 0:
            return {}
        path = self.run_dir / 'snapshots' / f'generator-kimg{nimg / 1000:010.3f}.pt'
        path.parent.mkdir(exist_ok=True)
        save_snapshot(path, ema, extra={'grids': self.grids, 'eta': self.cfg.kernel.eta, 'nimg': nimg})
        row = {'nimg': nimg, 'kimg': nimg / 1000, 'time': time.time(), 'metric': self.metric,
               'num_samples': self.num_samples, 'distance': {f'K={K}': v for K, v in distances.items()},
               'floor': self.floor, 'snapshot': str(path.relative_to(self.run_dir))}
        with open(self.run_dir / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        publish(self.cfg, path, self.run_dir / 'metrics.jsonl', plot_progress(self.run_dir))
        return {f'snapshot/{self.metric} K={K}': v for K, v in distances.items()}

#----------------------------------------------------------------------------
# Reading the records back and drawing them.

def history(path: pathlib.Path) -> list[dict]:
    """The rows of a JSONL record as the run's current history: a row whose nimg is not past the previous row's
    (written after a resume from an earlier checkpoint) replaces the rows it rolls back."""
    rows: list[dict] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                while rows and rows[-1]['nimg'] >= row['nimg']:
                    rows.pop()
                rows.append(row)
    return rows

def plot_progress(run_dir: pathlib.Path) -> pathlib.Path:
    """<run dir>/progress.png: the training losses (train.jsonl, one point per status line) over kimg, and each
    snapshot's distance per K (metrics.jsonl, log scale) with the exact-samples floor where there is one."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib.figure import Figure
    losses, snaps = history(run_dir / 'train.jsonl'), history(run_dir / 'metrics.jsonl')
    fig = Figure(figsize=(10, 4), layout='constrained')
    ax_loss, ax_fd = fig.subplots(1, 2)
    for key in ('loss/aux', 'loss/gen'):
        points = [(r['nimg'] / 1000, r[key]) for r in losses if key in r]
        if points:
            ax_loss.plot(*zip(*points), label=key)
    ax_loss.set(xlabel='kimg', ylabel='loss', title='training losses')
    for K in snaps[-1]['distance'] if snaps else ():
        points = [(r['kimg'], r['distance'][K]) for r in snaps if K in r['distance'] and r['distance'][K] > 0]
        if points:
            ax_fd.plot(*zip(*points), marker='o', label=f'CoSIM {K}')
    floors = [r['floor'] for r in snaps if r.get('floor') is not None and math.isfinite(r['floor'])]
    if floors:
        ax_fd.axhline(floors[-1], color='gray', linestyle='--', label='exact samples (floor)')
    metric = snaps[-1]['metric'] if snaps else 'distance'
    num = snaps[-1]['num_samples'] if snaps else 0
    ax_fd.set(xlabel='kimg', ylabel=metric, yscale='log', title=f'snapshots: {metric} on {num} samples')
    for ax in (ax_loss, ax_fd):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    path = run_dir / 'progress.png'
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format='png'))
    return path

"""Evaluation of real models (`task=eval` for EDM / EDM2 teachers and their distilled generators): distributed
per-seed generation, VAE decoding, FID / FD-DINOv2 against reference statistics (docs/ALGORITHM.md, "Reference facts").

- Image i always uses seed i (samplers.seeded_inputs). The seeds are cut into chunks of `eval.chunk`; chunk j belongs
  to rank j % world_size and is generated in batches from its own start, so the images do not depend on the world size.
- Every rank accumulates float64 sums of f and f f^T per metric (MomentAccumulator) and commits them atomically
  after each chunk (`eval_state/<sampler>-<fingerprint>/rank-R-of-W.pt`, with the chunks done, in checkpoint.url
  when it is s3://, else in the run directory). A preempted
  evaluation (should_stop, agreed across ranks at chunk boundaries) reloads them and continues where it stopped,
  giving exactly the sums of an uninterrupted run. A finished sampler's all-reduced sums are kept in `stats.pt` and
  reused (its distance to any reference is recomputed from them).
- The sums are all-reduced across ranks and compared with the reference by the Frechet distance; rank 0 writes
  eval.json (one row per sampler, with weights, reference, seeds, grid and resize mode) and prints the table.
"""

import dataclasses
import hashlib
import io
import json
import pathlib
import re
from collections.abc import Callable

import torch

from .. import cosim, distributed
from ..build import publish, shared_store
from ..config import Config
from ..distributed import DistEnv
from ..logging import RunLogger, log, save_image_grid
from ..storage import ObjectStore, missing_local, open_store, sha256_file
from ..teacher_io import load_network_and_extra, local_path
from ..trainer import load_checkpoint_ema
from .decode import Decoder, make_decoder
from .features import FeatureMetric, build_metrics, reference_info, reference_stats
from .metrics import MomentAccumulator, frechet_to_reference
from .results import format_table, write_results
from .samplers import SamplerSpec, cosim_spec, dpm_spec, generate, heun_spec, sample, tune_grid

class Stopped(Exception):
    """Every rank agreed to stop (preemption) at a chunk boundary."""

#----------------------------------------------------------------------------
# Networks and samplers.

def path_sha256(path: pathlib.Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative names and contents)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob('*') if p.is_file()):
        h.update(f'{f.relative_to(path)}\0{sha256_file(f)}\0'.encode())
    return h.hexdigest()

def network_info(path_or_url: str) -> dict:
    return {'path': str(path_or_url), 'sha256': path_sha256(local_path(path_or_url))}

def generator_path(path: str | None, run_dir: pathlib.Path, key: str) -> str:
    """The generator file the config key `key` names (default <run dir>/generator.pt); a one-line error if missing."""
    path = path or str(run_dir / 'generator.pt')
    if missing_local(path):
        raise FileNotFoundError(f'generator file {path} does not exist: distil first (task=train writes '
                                f'<run dir>/generator.pt) or pass a snapshot, export or checkpoint step directory as '
                                f'{key}=PATH')
    return path

def load_generator(path: str) -> tuple[torch.nn.Module, dict]:
    """(network, snapshot extra) of a generator file: a training checkpoint step directory (its EMA), or any file
    teacher_io reads (snapshot, export, pickle)."""
    if (local := local_path(path)).is_dir() and (local / 'manifest.json').is_file():   # a committed step
        return load_checkpoint_ema(local), {}
    return load_network_and_extra(local)

def generator_eta(extra: dict, cfg: Config) -> float:
    """The Eq. K1 kernel.eta a generator was trained with (its snapshot's extra), else the config's: Eq. S1 re-noises
    with the kernel of training."""
    return float(extra.get('eta', cfg.kernel.eta))

@dataclasses.dataclass
class Entry:
    spec: SamplerSpec
    net: torch.nn.Module      # the network the sampler calls (shape and labels come from it)
    network: dict             # its file and sha256
    cosim: bool = False       # an Eq. S1 sampler (its interior grid points can be tuned)
    eta: float = 1.0          # its Eq. K1 kernel.eta

def sampler_entries(cfg: Config, noise: cosim.NoiseRange, load_teacher: Callable[[], torch.nn.Module],
                    device: torch.device) -> list[Entry]:
    """The teacher's Heun and DPM-Solver++(2M) baselines and CoSIM at each K (default grids), as eval.samplers asks."""
    e, entries = cfg.eval, []
    if {'heun', 'dpm'} & set(e.samplers):
        teacher, info = load_teacher(), network_info(cfg.model.teacher)
        if 'heun' in e.samplers:
            entries.append(Entry(heun_spec(teacher, e.heun_steps, noise), teacher, info))
        if 'dpm' in e.samplers:
            entries += [Entry(dpm_spec(teacher, n, noise), teacher, info) for n in e.dpm_nfe]
    if 'cosim' in e.samplers:
        path = generator_path(e.generator, cfg.run_dir, 'eval.generator')
        G, extra = load_generator(path)
        G, info, eta = G.to(device), network_info(path), generator_eta(extra, cfg)
        entries += [Entry(cosim_spec(G, cosim.default_grid(K, noise, e.grid_scale), eta), G, info, True, eta)
                    for K in e.steps]
    return entries

def image_shape(net: torch.nn.Module) -> tuple[int, int, int]:
    return (net.img_channels, net.img_resolution, net.img_resolution)

GRID_SEEDS = 8                # samples.png: the first evaluation seeds, one row per sampler

def save_samples(entries: list[Entry], decode: Decoder, cfg: Config, device: torch.device) -> pathlib.Path:
    """<run dir>/samples.png: each sampler's images of the first GRID_SEEDS evaluation seeds, decoded as for the
    metrics (the same images as in eval.png_dir), one labelled row per sampler."""
    seeds = range(cfg.eval.seed, cfg.eval.seed + min(GRID_SEEDS, cfg.eval.num_samples))
    images = [decode(sample(x.spec, seeds, image_shape(x.net), x.net.label_dim, device)) for x in entries]
    path = cfg.run_dir / 'samples.png'
    save_image_grid(torch.cat(images), path, rows=len(entries), labels=[x.spec.name for x in entries])
    return path

#----------------------------------------------------------------------------
# Seed chunks: chunk j of the seed range belongs to rank j % world_size.

def seed_chunks(seeds: range, chunk: int) -> list[range]:
    return [range(s, min(s + chunk, seeds.stop)) for s in range(seeds.start, seeds.stop, chunk)]

def rank_chunks(seeds: range, chunk: int, rank: int, world_size: int) -> list[range]:
    return seed_chunks(seeds, chunk)[rank::world_size]

#----------------------------------------------------------------------------
# Resumable per-rank sums.

def sampler_key(name: str, setup: dict) -> str:
    """Directory name of a sampler's state: its name and a hash of everything its statistics depend on."""
    fp = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f'{re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()}-{fp}'

@dataclasses.dataclass
class SumsFile:
    """Committed sums of one sampler: {done: chunk starts, stats: {metric: MomentAccumulator state}}; one per rank
    while generating (`rank-R-of-W.pt`), the all-reduced ones when finished (`stats.pt`). Kept in the run's shared
    store (checkpoint.url when s3://, else the run directory), so a resumed evaluation finds them on any node."""
    store: ObjectStore
    key: str

    def load(self, accs: dict[str, MomentAccumulator]) -> set[int]:
        if not self.store.exists(self.key):
            return set()
        state = torch.load(io.BytesIO(self.store.read(self.key)), map_location='cpu', weights_only=True)
        for name, acc in accs.items():
            acc.load_state_dict(state['stats'][name])
        return set(state['done'])

    def commit(self, accs: dict[str, MomentAccumulator], done: set[int]) -> None:
        buf = io.BytesIO()
        torch.save({'done': sorted(done), 'stats': {k: a.state_dict() for k, a in accs.items()}}, buf)
        self.store.put_bytes(buf.getvalue(), self.key)

#----------------------------------------------------------------------------
# Generation -> uint8 images -> features.

def save_pngs(images: torch.Tensor, seeds: range, root: pathlib.Path) -> None:
    """images/<seed>.png in EDM's subfolders of 1000 seeds (`000000/000123.png`)."""
    from PIL import Image
    x = images.permute(0, 2, 3, 1).cpu().numpy()
    for seed, img in zip(seeds, x):
        path = root / f'{seed - seed % 1000:06d}' / f'{seed:06d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img, 'L' if img.shape[-1] == 1 else 'RGB').save(path)

@dataclasses.dataclass
class Pipeline:
    """Sampler output -> uint8 images -> features of every metric."""
    decode: Decoder
    metrics: list[FeatureMetric]
    batch: int
    device: torch.device

    def chunk(self, entry: Entry, seeds: range, accs: dict[str, MomentAccumulator], png: pathlib.Path | None,
              progress: Callable[[int], None]) -> None:
        net = entry.net

        def consume(x: torch.Tensor, part: range) -> None:
            images = self.decode(x)
            for m in self.metrics:
                accs[m.name].update(m.net(images))
            if png is not None:
                save_pngs(images, part, png)
            progress(len(images))

        generate(entry.spec, seeds, image_shape(net), net.label_dim, self.batch, self.device, consume)

    def accumulators(self) -> dict[str, MomentAccumulator]:
        return {m.name: MomentAccumulator(m.kind.dim) for m in self.metrics}

    def statistics(self, entry: Entry, seeds: range, chunk: int, env: DistEnv, should_stop: Callable[[], bool],
                   state: SumsFile | None = None, png: pathlib.Path | None = None,
                   progress: Callable[[int], None] = lambda n: None) -> dict[str, MomentAccumulator]:
        """Collective: this rank's chunks (skipping those committed in `state`), then the all-reduced sums."""
        accs = self.accumulators()
        done = state.load(accs) if state is not None else set()
        mine = rank_chunks(seeds, chunk, env.rank, env.world_size)
        if done:
            log.info(f'{entry.spec.name}: resuming with {len(done)} of {len(mine)} chunks done on rank {env.rank}')
        rounds = len(rank_chunks(seeds, chunk, 0, env.world_size))
        with torch.no_grad():
            for i in range(rounds):
                if distributed.any_rank(should_stop()):
                    raise Stopped
                if i < len(mine) and mine[i].start not in done:
                    self.chunk(entry, mine[i], accs, png, progress)
                    done.add(mine[i].start)
                    if state is not None:
                        state.commit(accs, done)
        for acc in accs.values():
            acc.all_reduce()
        return accs

#----------------------------------------------------------------------------
# Entry point.

def _tuned(entry: Entry, pipe: Pipeline, cfg: Config, env: DistEnv, ref: dict, should_stop) -> Entry:
    """Greedy search of the interior grid points of a CoSIM entry against the first metric on eval.tune_samples seeds
    after the evaluation seeds (not resumable; deterministic, so a rerun finds the same grid)."""
    e, metric = cfg.eval, pipe.metrics[0].name
    seeds = range(e.seed + e.num_samples, e.seed + e.num_samples + e.tune_samples)

    def on(grid: list[float]) -> Entry:
        return Entry(cosim_spec(entry.net, grid, entry.eta), entry.net, entry.network, True, entry.eta)

    def score(grid: list[float]) -> float:
        return frechet_to_reference(pipe.statistics(on(grid), seeds, e.chunk, env, should_stop)[metric], *ref[metric])

    grid, best = tune_grid(entry.spec.grid, score)
    log.info(f'tuned grid K={len(grid)}: {[round(t, 4) for t in grid]} ({metric} {best:.4f} on {e.tune_samples} seeds)')
    return on(grid)

def _row(entry: Entry, seeds: range, accs: dict[str, MomentAccumulator], ref: dict, meta: dict) -> dict:
    row = {'name': entry.spec.name, 'nfe': entry.spec.nfe, 'grid': entry.spec.grid, 'network': entry.network,
           'num_images': len(seeds), 'seeds': [seeds.start, seeds.stop - 1]}
    row.update({name: frechet_to_reference(acc, *ref[name]) for name, acc in accs.items()})
    row['metrics'] = meta
    return row

def _setup(entry: Entry, cfg: Config, pipe: Pipeline, seeds: range, vae: dict | None) -> dict:
    """Everything a sampler's statistics depend on (its state directory is keyed by the hash of this)."""
    return {'name': entry.spec.name, 'grid': entry.spec.grid, 'network': entry.network['sha256'], 'vae': vae,
            'seeds': [seeds.start, seeds.stop], 'chunk': cfg.eval.chunk, 'batch': cfg.eval.batch,
            'decode_batch': cfg.eval.decode_batch, 'metrics': {m.name: m.info['weights_sha256'] for m in pipe.metrics},
            'latent_stats': [cfg.model.latent_raw_mean, cfg.model.latent_raw_std] if vae else None}

def eval_store(cfg: Config) -> ObjectStore:
    """Where evaluation state lives: the shared store (checkpoint.url when s3://), else the run directory."""
    return shared_store(cfg) or open_store(cfg.run_dir)

def _evaluate_entry(entry: Entry, cfg: Config, pipe: Pipeline, env: DistEnv, should_stop, ref: dict, meta: dict,
                    vae: dict | None, logger: RunLogger) -> dict | None:
    """Collective: one table row (on rank 0), from the sums of a finished run of this sampler, else generated
    (resumably)."""
    e = cfg.eval
    seeds = range(e.seed, e.seed + e.num_samples)
    name = sampler_key(entry.spec.name, _setup(entry, cfg, pipe, seeds, vae))
    store, directory = eval_store(cfg), f'eval_state/{name}'
    final, accs = SumsFile(store, f'{directory}/stats.pt'), pipe.accumulators()
    if store.exists(final.key):
        final.load(accs)
        log.info(f'{entry.spec.name}: finished before, reusing {store.url}/{final.key}')
    else:
        png = pathlib.Path(e.png_dir) / name if e.png_dir else None
        state = SumsFile(store, f'{directory}/rank-{env.rank}-of-{env.world_size}.pt')
        if not store.exists(state.key) and store.list(f'{directory}/rank-'):
            log.warning(f'{entry.spec.name}: {store.url}/{directory} holds sums of another world size; generating '
                        f'from the start')
        accs = pipe.statistics(entry, seeds, e.chunk, env, should_stop, state, png, logger.advance)
        if env.rank == 0:
            final.commit(accs, {c.start for c in seed_chunks(seeds, e.chunk)})
        distributed.barrier()
        if env.rank == 0:
            for key in store.list(f'{directory}/rank-'):
                store.delete(key)
    return _row(entry, seeds, accs, ref, meta) if env.rank == 0 else None

def evaluate_features(cfg: Config, device: torch.device, env: DistEnv, should_stop: Callable[[], bool],
                      load_teacher: Callable[[], torch.nn.Module], noise: cosim.NoiseRange,
                      logger: RunLogger) -> list[dict] | None:
    """Collective `task=eval` for real models; returns the rows on rank 0 (None after an agreed stop)."""
    e = cfg.eval
    metrics = build_metrics(e.metrics, {'inception': e.inception_weights, 'dinov2': e.dinov2_weights}, device)
    ref = reference_stats(e.ref, metrics)
    meta = {m.name: {**m.info, **reference_info(e.ref)} for m in metrics}
    entries = sampler_entries(cfg, noise, load_teacher, device)
    shapes = {image_shape(x.net) for x in entries}
    if len(shapes) != 1:
        raise ValueError(f'teacher and generator disagree on the image shape: {sorted(shapes)}')
    channels = shapes.pop()[0]
    decode = make_decoder(channels, e.vae, device, e.decode_batch, cfg.model.latent_raw_mean, cfg.model.latent_raw_std)
    pipe = Pipeline(decode, metrics, e.batch, device)
    vae = network_info(e.vae) if channels != 3 else None
    try:
        if e.tune_grid:
            entries = [_tuned(x, pipe, cfg, env, ref, should_stop) if x.cosim and len(x.spec.grid) > 1 else x
                       for x in entries]
        logger.start(e.num_samples * len(entries) // env.world_size, 0, 'evaluate')
        rows = [_evaluate_entry(x, cfg, pipe, env, should_stop, ref, meta, vae, logger) for x in entries]
    except Stopped:
        log.info('evaluation stopped at a chunk boundary: run the same command again to continue')
        return None
    finally:
        logger.close()
    if env.rank != 0:
        return None
    write_results(rows, cfg.run_dir / 'eval.json')
    print(format_table(rows, {m.name: m.name for m in metrics}))
    samples = save_samples(entries, decode, cfg, device)
    publish(cfg, cfg.run_dir / 'eval.json', samples)
    log.info(f'results in {cfg.run_dir / "eval.json"}, samples in {samples}')
    return rows

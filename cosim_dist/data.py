"""Streaming shard loader: WebDataset tar shards + `manifest.parquet`, read from a local directory or any object store
(`storage.py`), in a deterministic, resumable order whose whole state is the number of samples consumed.
What ShardStream returns (per rank, per next_batch()):
    x0      float32 [B, C, H, W]: pixels x/127.5 - 1; float pixels as stored; latents re-sampled on every use as
            (mean + std*n)*scale + bias (docs/ALGORITHM.md, "Reference facts"), with n drawn from a generator seeded by
            (seed, global sample index), the index being epoch*N + position of the sample in manifest order. The
            noise of a sample therefore depends neither on the world size nor on the number of workers.
    labels  float32 one-hot [B, label_count] ([B, 0] for unlabelled data).

Order: every epoch e permutes the shards with a generator seeded by (seed, e) and deals them round-robin to the
world_size*max(num_workers, 1) readers ("slots"; slot = rank*workers + worker). Each slot reads its shards one after
the other, visiting the samples of a shard in a permutation seeded by (seed, e, shard), and flows from one epoch into
the next, so the stream is infinite. Every epoch covers every sample exactly once, whatever the world size. DataLoader
workers decode in parallel and batch k of a rank is produced by its worker k % workers.

State: {'version': 2, 'consumed': samples consumed over all ranks, 'segments': the layouts (world_size, num_workers,
batch_size) the stream was read with and the sample count at which each began, ...}. From these alone each worker
recomputes where its slot stands, so a resumed stream with the same layout yields exactly the batches an uninterrupted
one would have. Resumed with another layout (a requeue on another number of GPUs), the shard visits left in the epochs
already begun (partly read shards from where they stopped) are dealt round-robin to the new slots, then whole epochs
follow as usual: every epoch still covers every sample exactly once. A different seed is refused.

Corrupt shards (missing, truncated, sha256 or content mismatch) are skipped, counted (`skipped_shards`) and logged
to the 'cosim_dist' logger. The state lists them ('bad_shards') and a resumed stream treats them as empty, so resume
stays exact across a skipped shard when the saving rank's state lists it (each rank only knows the shards it met).
"""
import functools
import itertools
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .shards import CorruptShard, DatasetInfo, ShardEntry, decode_shard, fetch_shard, read_manifest
from .storage import ObjectStore, StorageConfig, open_store

log = logging.getLogger('cosim_dist')

#----------------------------------------------------------------------------
# Sample order. Seeds are tagged tuples so that the three random streams never share a seed.

def _shard_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(count)

def _sample_order(seed: int, epoch: int, shard: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, epoch, shard]).permutation(count)

def _noise(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([seed, 2, index]).standard_normal(shape, dtype=np.float32)

Item = tuple[int, int, int]          # (epoch, shard, samples of it read before): one shard visit of a slot

class _Plan:
    """What each slot of one layout (world_size x workers readers) reads: first the visits it inherited from an earlier
    layout (`carry`), then its round-robin share of the shards of every epoch from `first_epoch` on."""

    def __init__(self, entries: list[ShardEntry], seed: int, slots: int, bad: set[str],
                 carry: list[list[Item]] | None = None, first_epoch: int = 0) -> None:
        self.entries, self.seed, self.slots, self.bad = entries, seed, slots, bad
        self.carry, self.first_epoch = carry or [[] for _ in range(slots)], first_epoch

    def size(self, item: Item) -> int:
        """Samples left in a visit (a corrupt shard counts as empty)."""
        entry = self.entries[item[1]]
        return 0 if entry.name in self.bad else entry.samples - item[2]

    def items(self, slot: int) -> Iterator[Item]:
        yield from self.carry[slot]
        for epoch in itertools.count(self.first_epoch):
            if len(self.bad) == len(self.entries):
                raise RuntimeError('every shard is corrupt; check the dataset with cosim_dist.shards.verify_manifest')
            for shard in _shard_order(self.seed, epoch, len(self.entries))[slot::self.slots]:
                yield epoch, int(shard), 0

    def after(self, slot: int, skip: int) -> Iterator[Item]:
        """The slot's visits once `skip` of its samples are consumed (the first one partly read)."""
        for item in self.items(slot):
            n = self.size(item)
            if skip >= n:
                skip -= n
                continue
            yield item[0], item[1], item[2] + skip
            skip = 0

    def handover(self, delivered: list[int], slots: int) -> '_Plan':
        """The plan of a new layout of `slots` readers, after each slot of this one delivered `delivered[slot]` samples:
        every visit left in the epochs already begun is dealt round-robin to the new slots, then whole epochs follow.
        Each epoch still covers each sample once."""
        positions = [self.after(slot, d) for slot, d in enumerate(delivered)]
        current = [next(p) for p in positions]                       # each slot's next (maybe partly read) visit
        # the epochs begun so far (a slot at the very start of an epoch counts it as begun: harmless, its visits are
        # all dealt anew); each slot's visits are in epoch order, so its unread ones of those epochs come first
        # (at least up to the inherited visits' epochs, which all precede first_epoch, so none is dropped)
        last = max([self.first_epoch - 1] + [item[0] for item, d in zip(current, delivered) if d > 0])
        left: list[Item] = []
        for item, rest in zip(current, positions):
            while item[0] <= last:
                left.append(item)
                item = next(rest)
        left.sort()
        return _Plan(self.entries, self.seed, slots, self.bad, [left[k::slots] for k in range(slots)], last + 1)

class _Slots(torch.utils.data.IterableDataset):
    """The batches of one rank, `step` batches into the stream; each DataLoader worker plays one slot."""

    def __init__(self, store: ObjectStore, info: DatasetInfo, entries: list[ShardEntry], plan: _Plan, *, seed: int,
                 batch: int, rank: int, workers: int, step: int) -> None:
        self.store, self.info, self.entries, self.plan = store, info, entries, plan
        self.seed, self.batch, self.rank, self.workers, self.step = seed, batch, rank, workers, step
        self.offsets = np.cumsum([0] + [e.samples for e in entries])  # global index of each shard's first sample

    def _samples(self, slot: int, skip: int, found: list[tuple[str, str]]) -> Iterator[tuple[np.ndarray, int]]:
        """(x0, label) of the slot's stream; corrupt shards are appended to `found` as (name, reason)."""
        plan = self.plan.after(slot, skip)
        with ThreadPoolExecutor(1) as pool: # fetches the next shard (I/O and hashing, without the GIL) during decoding
            submit = lambda step: (step, pool.submit(fetch_shard, self.store, self.entries[step[1]]))
            upcoming = submit(next(plan))
            while True:
                (epoch, shard, skip), pending = upcoming
                upcoming = submit(next(plan))
                try:
                    samples = decode_shard(pending.result(), self.entries[shard], self.info)
                except CorruptShard as e:
                    self.plan.bad.add(self.entries[shard].name)
                    found.append((self.entries[shard].name, str(e)))
                    continue
                base = epoch * int(self.offsets[-1]) + int(self.offsets[shard])
                for i in _sample_order(self.seed, epoch, shard, len(samples))[skip:]:
                    yield self._x0(samples[i], base + int(i)), samples[i].get('cls', -1)

    def _x0(self, sample: dict[str, Any], index: int) -> np.ndarray:
        if self.info.kind == 'pixels':
            return sample['x.npy'].astype(np.float32) / 127.5 - 1
        if self.info.kind == 'pixels_float':
            return sample['x.npy']
        mean, std = sample['mean.npy'].astype(np.float32), sample['std.npy'].astype(np.float32)
        scale = np.asarray(self.info.latent_scale, np.float32)[:, None, None]
        bias = np.asarray(self.info.latent_bias, np.float32)[:, None, None]
        return (mean + std * _noise(self.seed, index, mean.shape)) * scale + bias

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]]:
        info = torch.utils.data.get_worker_info()
        # the first batch of this iterator is batch `step`
        worker = ((info.id if info else 0) + self.step) % self.workers
        found: list[tuple[str, str]] = []
        samples = self._samples(self.rank * self.workers + worker, delivered(self.step, worker, self.workers,
                                                                            self.batch), found)
        while True:
            xs, labels = zip(*itertools.islice(samples, self.batch))
            # one-hot (numpy: torch's one_hot is slow on CPU)
            c = np.zeros((self.batch, self.info.label_count), np.float32)
            if self.info.label_count:
                c[np.arange(self.batch), labels] = 1
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(c), found.copy()
            found.clear()

def _set_environ(environ: dict[str, str], worker: int) -> None:
    """DataLoader worker_init_fn: the reader's environment (S3 credentials and endpoint among it) in the worker."""
    os.environ.clear()
    os.environ.update(environ)

def delivered(step: int, worker: int, workers: int, batch: int) -> int:
    """Samples the slot of `worker` delivered in a rank's first `step` batches (batch k: worker k % workers)."""
    return max(0, -(-(step - worker) // workers)) * batch

#----------------------------------------------------------------------------
# The stream the trainer consumes.

class ShardStream:
    """Infinite, deterministic, resumable batches (x0, labels) of one rank. See the module docstring."""

    def __init__(self, url: str | os.PathLike, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, prefetch: int = 2, storage: StorageConfig | None = None) -> None:
        if batch_size < 1 or num_workers < 0 or prefetch < 1:
            raise ValueError(f'data: batch_size={batch_size} and prefetch={prefetch} must be >= 1, '
                             f'num_workers={num_workers} >= 0')
        if not 0 <= rank < world_size:
            raise ValueError(f'data: rank={rank} must be in [0, world_size={world_size})')
        self.store = open_store(url, storage)
        self.info, self.entries = read_manifest(self.store)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.prefetch = num_workers, seed, prefetch
        slots = world_size * max(num_workers, 1)
        if len(self.entries) < slots:
            raise ValueError(f'{self.store.url} has {len(self.entries)} shards, fewer than the {slots} readers of '
                             f'world_size={world_size} x num_workers={max(num_workers, 1)}: lower data.num_workers or '
                             f're-shard with more, smaller shards (cosim-make-shards --samples-per-shard)')
        self.consumed = 0                   # samples consumed over all ranks
        # the layouts the stream has been read with, each from the global sample count at which it started
        self.segments: list[dict[str, int]] = [self._layout() | {'start': 0}]
        # shard name -> reason, for corrupt shards met so far or listed in a loaded state
        self.bad_shards: dict[str, str] = {}
        self._batches: Iterator | None = None

    @property
    def label_dim(self) -> int:
        return self.info.label_count

    @property
    def skipped_shards(self) -> int:
        """Number of distinct corrupt shards skipped."""
        return len(self.bad_shards)

    def _plan(self) -> tuple[_Plan, int]:
        """The current layout's plan (replaying every layout change since the start) and its batches so far."""
        plan, bad = None, set(self.bad_shards)
        for prev, seg in zip([None, *self.segments], self.segments):
            slots = seg['world_size'] * max(seg['num_workers'], 1)
            if prev is None:
                plan = _Plan(self.entries, self.seed, slots, bad)
                continue
            workers = max(prev['num_workers'], 1)
            steps = (seg['start'] - prev['start']) // (prev['batch_size'] * prev['world_size'])
            plan = plan.handover([delivered(steps, w, workers, prev['batch_size'])
                                  for _ in range(prev['world_size']) for w in range(workers)], slots)
        seg = self.segments[-1]
        return plan, (self.consumed - seg['start']) // (self.batch_size * self.world_size)

    def _start(self) -> Iterator:
        plan, step = self._plan()
        slots = _Slots(self.store, self.info, self.entries, plan, seed=self.seed, batch=self.batch_size, rank=self.rank,
                       workers=max(self.num_workers, 1), step=step)
        context = None
        if self.num_workers:
            # Workers come from a fork server, not a fork of this process: a fork copies the locks that this process's
            # other threads (NCCL / gloo, boto3, wandb, tqdm's monitor, OpenMP) hold at that instant, and a worker that
            # needs one waits forever, and with it next_batch(). The server is a fresh interpreter (exec, not fork)
            # with this module (and torch) imported, started on first use; each worker forks that one-thread process.
            # The server's environment is the one it started with: each worker takes this process's current one.
            context = torch.multiprocessing.get_context('forkserver')
            context.set_forkserver_preload([__name__])
        return iter(torch.utils.data.DataLoader(slots, batch_size=None, num_workers=self.num_workers,
                                                prefetch_factor=self.prefetch if self.num_workers else None,
                                                multiprocessing_context=context,
                                                worker_init_fn=functools.partial(_set_environ, dict(os.environ))))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 float32 [batch_size, C, H, W] and one-hot labels float32 [batch_size, label_dim]."""
        if self._batches is None:
            self._batches = self._start()
        x0, labels, found = next(self._batches)
        for name, why in found:
            if name not in self.bad_shards:
                self.bad_shards[name] = why
                log.warning('skipped corrupt shard %s/%s (%s); %d shard(s) skipped so far',
                            self.store.url, name, why, self.skipped_shards)
        self.consumed += self.batch_size * self.world_size
        return x0, labels

    def _layout(self) -> dict[str, int]:
        return {'world_size': self.world_size, 'num_workers': self.num_workers, 'batch_size': self.batch_size}

    def state_dict(self) -> dict[str, Any]:
        return {'version': 2, 'consumed': self.consumed, 'seed': self.seed, 'segments': self.segments,
                'bad_shards': sorted(self.bad_shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the stream that saved `state` stood: exactly, with the same layout (world size,
        data.num_workers, batch per rank); with another one, the visits left in the epochs begun are dealt to the new
        readers, so that every epoch still covers every sample once."""
        if state.get('version') == 1:                   # one layout, from the start
            state = {**state, 'segments': [{k: state[k] for k in ('world_size', 'num_workers', 'batch_size')}
                                           | {'start': 0}]}
        elif state.get('version') != 2:
            raise ValueError(f'data state version {state.get("version")!r} is not supported (expected 1 or 2)')
        if state['seed'] != self.seed:
            raise ValueError(f'data state was saved with seed {state["seed"]}, this stream has {self.seed}: the sample '
                             f'order depends on it; resume with the same run.seed')
        last = state['segments'][-1]
        if (state['consumed'] - last['start']) % (last['batch_size'] * last['world_size']):
            raise ValueError(f'data state consumed={state["consumed"]} is not a whole number of global batches of '
                             f'{last["batch_size"] * last["world_size"]} since its layout started')
        self.close()
        self.consumed = state['consumed']
        self.segments = [dict(seg) for seg in state['segments']]
        if {k: last[k] for k in self._layout()} != self._layout():
            self.segments.append(self._layout() | {'start': self.consumed})
            log.info('data: resuming with another layout (%s, was %s); the epochs begun are dealt to the new readers',
                     self._layout(), {k: last[k] for k in self._layout()})
        for name in state.get('bad_shards', []):
            self.bad_shards.setdefault(name, 'listed in the loaded data state')

    def close(self) -> None:
        """Stop the worker processes (they restart on the next next_batch())."""
        self._batches = None

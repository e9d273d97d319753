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

State: {'version': 1, 'consumed': samples consumed over all ranks, ...}. From `consumed` alone each worker recomputes
where its slot stands, so a resumed stream yields exactly the batches an uninterrupted one would have. The layout
depends on world_size, num_workers, batch_size and seed: load_state_dict refuses a state saved with other values (a
clear ValueError) rather than silently changing the sample order. Resume at a different world size is not supported.

Corrupt shards (missing, truncated, sha256 or content mismatch) are skipped, counted (`skipped_shards`) and logged
to the 'cosim_dist' logger. The state lists them ('bad_shards') and a resumed stream treats them as empty, so resume
stays exact across a skipped shard when the saving rank's state lists it (each rank only knows the shards it met).
"""
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

class _Slots(torch.utils.data.IterableDataset):
    """The batches of one rank, `step` batches into the stream; each DataLoader worker plays one slot."""

    def __init__(self, store: ObjectStore, info: DatasetInfo, entries: list[ShardEntry], *, seed: int, batch: int,
                 rank: int, world_size: int, workers: int, step: int, bad: frozenset[str]) -> None:
        self.store, self.info, self.entries = store, info, entries
        self.seed, self.batch, self.rank, self.world_size, self.workers, self.step = (seed, batch, rank, world_size,
                                                                                      workers, step)
        self.bad = set(bad)
        self.offsets = np.cumsum([0] + [e.samples for e in entries])  # global index of each shard's first sample

    def _plan(self, slot: int, skip: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, samples to skip in it) for the shards this slot reads, after skipping `skip` samples."""
        slots = self.world_size * self.workers
        for epoch in itertools.count():
            if len(self.bad) == len(self.entries):
                raise RuntimeError(f'{self.store.url}: every shard is corrupt; '
                                   'check it with cosim_dist.data.verify_manifest')
            for shard in _shard_order(self.seed, epoch, len(self.entries))[slot::slots]:
                n = 0 if self.entries[shard].name in self.bad else self.entries[shard].samples
                if skip >= n:
                    skip -= n
                    continue
                yield epoch, int(shard), skip
                skip = 0

    def _samples(self, slot: int, skip: int, found: list[tuple[str, str]]) -> Iterator[tuple[np.ndarray, int]]:
        """(x0, label) of the slot's stream; corrupt shards are appended to `found` as (name, reason)."""
        plan = self._plan(slot, skip)
        with ThreadPoolExecutor(1) as pool: # fetches the next shard (I/O and hashing, without the GIL) during decoding
            submit = lambda step: (step, pool.submit(fetch_shard, self.store, self.entries[step[1]]))
            upcoming = submit(next(plan))
            while True:
                (epoch, shard, skip), pending = upcoming
                upcoming = submit(next(plan))
                try:
                    samples = decode_shard(pending.result(), self.entries[shard], self.info)
                except CorruptShard as e:
                    self.bad.add(self.entries[shard].name)
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
        done = max(0, -(-(self.step - worker) // self.workers))        # batches this worker's slot delivered before
        found: list[tuple[str, str]] = []
        samples = self._samples(self.rank * self.workers + worker, done * self.batch, found)
        while True:
            xs, labels = zip(*itertools.islice(samples, self.batch))
            # one-hot (numpy: torch's one_hot is slow on CPU)
            c = np.zeros((self.batch, self.info.label_count), np.float32)
            if self.info.label_count:
                c[np.arange(self.batch), labels] = 1
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(c), found.copy()
            found.clear()

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

    def _start(self) -> Iterator:
        step = self.consumed // (self.batch_size * self.world_size)
        slots = _Slots(self.store, self.info, self.entries, seed=self.seed, batch=self.batch_size, rank=self.rank,
                       world_size=self.world_size, workers=max(self.num_workers, 1), step=step,
                       bad=frozenset(self.bad_shards))
        return iter(torch.utils.data.DataLoader(slots, batch_size=None, num_workers=self.num_workers,
                                                prefetch_factor=self.prefetch if self.num_workers else None))

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

    def state_dict(self) -> dict[str, Any]:
        return {'version': 1, 'consumed': self.consumed, 'world_size': self.world_size, 'num_workers': self.num_workers,
                'batch_size': self.batch_size, 'seed': self.seed, 'bad_shards': sorted(self.bad_shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that saved `state` stood."""
        if state.get('version') != 1:
            raise ValueError(f'data state version {state.get("version")!r} is not supported (expected 1)')
        saved = {k: state.get(k) for k in ('world_size', 'num_workers', 'batch_size', 'seed')}
        mine = {k: getattr(self, k) for k in saved}
        if saved != mine:
            raise ValueError(f'data state was saved with {saved} but this stream has {mine}; the sample order '
                             f'depends on them, so resume with the same world size, data.num_workers, batch size per '
                             f'rank and seed')
        if state['consumed'] % (self.batch_size * self.world_size):
            raise ValueError(f'data state consumed={state["consumed"]} is not a multiple of batch_size x world_size '
                             f'= {self.batch_size * self.world_size}')
        self.close()
        self.consumed = state['consumed']
        for name in state.get('bad_shards', []):
            self.bad_shards.setdefault(name, 'listed in the loaded data state')

    def close(self) -> None:
        """Stop the worker processes (they restart on the next next_batch())."""
        self._batches = None

"""Streaming shard loader: WebDataset tar shards + `manifest.parquet`, read from a local directory or any object store
(`storage.py`), in a deterministic, resumable order whose whole state is the number of samples consumed.

Dataset layout (written by `data_tools/make_shards.py` and `data_tools/encode_latents.py`):
    manifest.parquet    one row per shard: name, samples, bytes, sha256, class_hist (list of label_count ints);
                        the schema metadata 'cosim_dist.info' holds DatasetInfo as JSON (kind, resolution, channels,
                        label_count, latent_scale, latent_bias, extra provenance)
    shard-000000.tar    plain (uncompressed) WebDataset tars; each sample is a group of members sharing a key:
        <key>.x.npy     kind 'pixels': uint8 [C, H, W]; kind 'pixels_float': float32 [C, H, W] in about [-1, 1]
        <key>.mean.npy  kind 'latents': VAE posterior mean, float16 or float32 [C, H, W]
        <key>.std.npy   kind 'latents': VAE posterior std, same dtype and shape
        <key>.cls       class label as ASCII digits, present iff label_count > 0
    `webdataset.WebDataset(urls).decode()` reads the same shards.

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
depends on world_size, num_workers, batch_size and seed: load_state_dict refuses a state saved with other values (a clear
ValueError) rather than silently changing the sample order. Resume at a different world size is not supported.

Corrupt shards (missing, truncated, sha256 or content mismatch) are skipped, counted (`skipped_shards`) and logged
to the 'cosim_dist' logger. The state lists them ('bad_shards') and a resumed stream treats them as empty, so resume
stays exact across a skipped shard when the saving rank's state lists it (each rank only knows the shards it met).
"""

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .storage import ObjectStore, StorageConfig, open_store

log = logging.getLogger('cosim_dist')

MANIFEST = 'manifest.parquet'
INFO_KEY = b'cosim_dist.info'
KINDS = ('pixels', 'pixels_float', 'latents')

#----------------------------------------------------------------------------
# Dataset metadata and manifest.

@dataclasses.dataclass(kw_only=True)
class DatasetInfo:
    kind: str                               # 'pixels' (uint8), 'pixels_float' (float32) or 'latents' (posterior mean/std)
    resolution: int                         # H = W of x0
    channels: int                           # C of x0
    label_count: int                        # number of classes; 0: unlabelled
    latent_scale: list[float] | None = None # latents only: per-channel scale
    latent_bias: list[float] | None = None  # latents only: per-channel bias
    extra: dict[str, Any] = dataclasses.field(default_factory=dict) # provenance: source, class names, VAE, dtype, ...

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f'dataset kind={self.kind!r} is not one of {KINDS}')
        if min(self.resolution, self.channels) < 1 or self.label_count < 0:
            raise ValueError(f'dataset resolution={self.resolution} and channels={self.channels} must be >= 1, '
                             f'label_count={self.label_count} >= 0')
        for key in ('latent_scale', 'latent_bias'):
            value = getattr(self, key)
            if (self.kind == 'latents') != (value is not None) or (value is not None and len(value) != self.channels):
                raise ValueError(f'dataset {key}={value}: latents need one value per channel ({self.channels}), other kinds none')

    @property
    def fields(self) -> dict[str, tuple[str, ...]]:
        """Array members of a sample and their allowed dtypes."""
        return {'pixels': {'x.npy': ('uint8',)}, 'pixels_float': {'x.npy': ('float32',)},
                'latents': {'mean.npy': ('float16', 'float32'), 'std.npy': ('float16', 'float32')}}[self.kind]

    def check(self, sample: dict[str, Any]) -> str | None:
        """Why `sample` does not fit this dataset, or None."""
        shape = (self.channels, self.resolution, self.resolution)
        for name, dtypes in self.fields.items():
            x = sample.get(name)
            if not isinstance(x, np.ndarray) or x.shape != shape or x.dtype.name not in dtypes:
                what = 'missing' if x is None else f'{getattr(x, "dtype", type(x))} {getattr(x, "shape", "")}'
                return f'sample {sample.get("__key__")!r}: {name} is {what}, expected {"|".join(dtypes)} {shape}'
        label = sample.get('cls')
        if (label is None) != (self.label_count == 0) or (label is not None and not 0 <= label < self.label_count):
            return f'sample {sample.get("__key__")!r}: label {label} does not fit label_count={self.label_count}'
        return None

@dataclasses.dataclass(kw_only=True)
class ShardEntry:
    name: str               # key of the tar relative to the dataset root
    samples: int            # number of samples
    bytes: int              # size of the tar
    sha256: str             # hex digest of the tar
    class_hist: list[int]   # samples per class (label_count entries)

def write_manifest(store: ObjectStore, info: DatasetInfo, entries: list[ShardEntry]) -> None:
    """Write `manifest.parquet` (atomically) to the dataset root."""
    table = pa.Table.from_pylist([dataclasses.asdict(e) for e in entries], schema=pa.schema(
        [('name', pa.string()), ('samples', pa.int64()), ('bytes', pa.int64()), ('sha256', pa.string()),
         ('class_hist', pa.list_(pa.int64()))], metadata={INFO_KEY: json.dumps(dataclasses.asdict(info))}))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put_bytes(buf.getvalue(), MANIFEST)

def read_manifest(store: ObjectStore) -> tuple[DatasetInfo, list[ShardEntry]]:
    """The dataset metadata and shard list of the dataset rooted at `store`."""
    try:
        table = pq.read_table(io.BytesIO(store.read(MANIFEST)))
    except FileNotFoundError as e:
        raise FileNotFoundError(f'{store.url}/{MANIFEST} not found: is {store.url} a dataset written by data_tools/make_shards.py?') from e
    meta = table.schema.metadata or {}
    if INFO_KEY not in meta:
        raise ValueError(f'{store.url}/{MANIFEST} has no {INFO_KEY.decode()} metadata; rewrite it with data_tools/make_shards.py')
    entries = [ShardEntry(**row) for row in table.to_pylist()]
    if not entries:
        raise ValueError(f'{store.url}/{MANIFEST} lists no shards')
    return DatasetInfo(**json.loads(meta[INFO_KEY])), entries

#----------------------------------------------------------------------------
# Shards.

def shard_name(index: int) -> str:
    return f'shard-{index:06d}.tar'

def write_shard(store: ObjectStore, name: str, samples: Iterable[dict[str, Any]], info: DatasetInfo) -> ShardEntry:
    """Write `samples` ({'__key__': str, arrays of info.fields, 'cls': int if labelled}) as the tar `name` of `store`
    and return its manifest entry. The tar is deterministic (fixed mtime) and appears atomically."""
    import webdataset as wds
    hist, count = np.zeros(info.label_count, np.int64), 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, 'wb') as f, wds.TarWriter(f, mtime=0) as tar:
            for sample in samples:
                if (why := info.check(sample)) is not None:
                    raise ValueError(f'{store.url}/{name}: {why}')
                tar.write(sample)
                if 'cls' in sample:
                    hist[sample['cls']] += 1
                count += 1
        with open(path, 'rb') as f:
            sha = hashlib.file_digest(f, 'sha256').hexdigest()
        store.put_file(path, name)
        return ShardEntry(name=name, samples=count, bytes=os.path.getsize(path), sha256=sha, class_hist=hist.tolist())

class CorruptShard(Exception):
    """A shard that is missing or does not match its manifest entry."""

def fetch_shard(store: ObjectStore, entry: ShardEntry) -> bytes:
    """The bytes of a shard, checked against the manifest's size and sha256 (raises CorruptShard)."""
    try:
        data = store.read(entry.name)
    except FileNotFoundError as e:
        raise CorruptShard(str(e)) from e
    if len(data) != entry.bytes or (sha := hashlib.sha256(data).hexdigest()) != entry.sha256:
        raise CorruptShard(f'{len(data)} bytes, manifest says {entry.bytes} bytes' if len(data) != entry.bytes else
                           f'sha256 {sha[:12]}..., manifest says {entry.sha256[:12]}...')
    return data

@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], str]:
    f = io.BytesIO(header)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError('object arrays are not allowed in shards')
    return dtype, shape, 'F' if fortran else 'C'

def _npy(raw: bytes) -> np.ndarray:
    """np.load of an .npy member (version 1 or 2), parsing each distinct header once: np.load spends most of its time there."""
    if raw[:6] != b'\x93NUMPY' or raw[6:7] not in (b'\x01', b'\x02'):
        raise ValueError('not an .npy array of format version 1 or 2')
    end = 10 + int.from_bytes(raw[8:10], 'little') if raw[6] == 1 else 12 + int.from_bytes(raw[8:12], 'little')
    dtype, shape, order = _npy_header(raw[:end])
    return np.frombuffer(raw, dtype, offset=end).reshape(shape, order=order)

def decode_shard(data: bytes, entry: ShardEntry, info: DatasetInfo) -> list[dict[str, Any]]:
    """The samples of a fetched shard, in stored order, checked against the manifest (raises CorruptShard)."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode='r:') as tar:
            for member in tar:
                key, _, field = member.name.partition('.')
                raw = tar.extractfile(member).read()
                value = int(raw) if field == 'cls' else _npy(raw)
                samples.setdefault(key, {'__key__': key})[field] = value
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        raise CorruptShard(f'unreadable tar: {e}') from e
    if len(samples) != entry.samples:
        raise CorruptShard(f'{len(samples)} samples, manifest says {entry.samples}')
    for sample in samples.values():
        if (why := info.check(sample)) is not None:
            raise CorruptShard(why)
    return list(samples.values())

def load_shard(store: ObjectStore, entry: ShardEntry, info: DatasetInfo) -> list[dict[str, Any]]:
    """fetch_shard + decode_shard."""
    return decode_shard(fetch_shard(store, entry), entry, info)

def verify_manifest(url: str | os.PathLike, storage: StorageConfig | None = None) -> tuple[DatasetInfo, list[ShardEntry]]:
    """Read every shard of the dataset at `url` and check it against the manifest (bytes, sha256, sample count, sample
    shapes and dtypes, class histogram). Raises ValueError listing every problem; returns the manifest if all is well."""
    store = open_store(url, storage)
    info, entries = read_manifest(store)
    problems = []
    for entry in entries:
        try:
            samples = load_shard(store, entry, info)
        except CorruptShard as e:
            problems.append(f'{entry.name}: {e}')
            continue
        hist = np.bincount([s['cls'] for s in samples if 'cls' in s], minlength=info.label_count).tolist()
        if hist != entry.class_hist:
            problems.append(f'{entry.name}: class histogram {hist}, manifest says {entry.class_hist}')
    if problems:
        raise ValueError(f'{store.url}: {len(problems)} of {len(entries)} shards fail verification:\n  ' + '\n  '.join(problems))
    return info, entries

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
        self.seed, self.batch, self.rank, self.world_size, self.workers, self.step = seed, batch, rank, world_size, workers, step
        self.bad = set(bad)
        self.offsets = np.cumsum([0] + [e.samples for e in entries])  # global index of each shard's first sample

    def _plan(self, slot: int, skip: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, shard, samples to skip in it) for the shards this slot reads, after skipping `skip` samples."""
        slots = self.world_size * self.workers
        for epoch in itertools.count():
            if len(self.bad) == len(self.entries):
                raise RuntimeError(f'{self.store.url}: every shard is corrupt; check it with cosim_dist.data.verify_manifest')
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
        worker = ((info.id if info else 0) + self.step) % self.workers # the first batch of this iterator is batch `step`
        done = max(0, -(-(self.step - worker) // self.workers))        # batches this worker's slot delivered before
        found: list[tuple[str, str]] = []
        samples = self._samples(self.rank * self.workers + worker, done * self.batch, found)
        while True:
            xs, labels = zip(*itertools.islice(samples, self.batch))
            c = np.zeros((self.batch, self.info.label_count), np.float32) # one-hot (numpy: torch's one_hot is slow on CPU)
            if self.info.label_count:
                c[np.arange(self.batch), labels] = 1
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(c), found.copy()
            found.clear()

#----------------------------------------------------------------------------
# The stream the trainer consumes.

class ShardStream:
    """Infinite, deterministic, resumable batches (x0, labels) of one rank. See the module docstring."""

    def __init__(self, url: str | os.PathLike, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, prefetch: int = 2, storage: StorageConfig | None = None) -> None:
        if batch_size < 1 or num_workers < 0 or prefetch < 1:
            raise ValueError(f'data: batch_size={batch_size} and prefetch={prefetch} must be >= 1, num_workers={num_workers} >= 0')
        if not 0 <= rank < world_size:
            raise ValueError(f'data: rank={rank} must be in [0, world_size={world_size})')
        self.store = open_store(url, storage)
        self.info, self.entries = read_manifest(self.store)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.prefetch = num_workers, seed, prefetch
        slots = world_size * max(num_workers, 1)
        if len(self.entries) < slots:
            raise ValueError(f'{self.store.url} has {len(self.entries)} shards, fewer than the {slots} readers of world_size={world_size} '
                             f'x num_workers={max(num_workers, 1)}: lower data.num_workers or re-shard with more, smaller shards '
                             f'(data_tools/make_shards.py --samples-per-shard)')
        self.consumed = 0                   # samples consumed over all ranks
        self.bad_shards: dict[str, str] = {} # shard name -> reason, for corrupt shards met so far or listed in a loaded state
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
                       world_size=self.world_size, workers=max(self.num_workers, 1), step=step, bad=frozenset(self.bad_shards))
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
                log.warning('skipped corrupt shard %s/%s (%s); %d shard(s) skipped so far', self.store.url, name, why, self.skipped_shards)
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
            raise ValueError(f'data state was saved with {saved} but this stream has {mine}; the sample order depends on '
                             f'them, so resume with the same world size, data.num_workers, batch size per rank and seed')
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

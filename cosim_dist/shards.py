"""The dataset format: WebDataset tar shards and their `manifest.parquet`, in a local directory or any object store
(`storage.py`): dataset metadata, writing and reading the manifest, writing shards, fetching and verifying them
(sha256, size, content) and decoding their samples.


Dataset layout (written by `cosim-make-shards` and `cosim-encode-latents`):
    manifest.parquet    one row per shard: name, samples, bytes, sha256, class_hist (list of label_count ints);
                        the schema metadata 'cosim_dist.info' holds DatasetInfo as JSON (kind, resolution, channels,
                        label_count, latent_scale, latent_bias, extra provenance)
    shard-000000.tar    plain (uncompressed) WebDataset tars; each sample is a group of members sharing a key:
        <key>.x.npy     kind 'pixels': uint8 [C, H, W]; kind 'pixels_float': float32 [C, H, W] in about [-1, 1]
        <key>.mean.npy  kind 'latents': VAE posterior mean, float16 or float32 [C, H, W]
        <key>.std.npy   kind 'latents': VAE posterior std, same dtype and shape
        <key>.cls       class label as ASCII digits, present iff label_count > 0
    `webdataset.WebDataset(urls).decode()` reads the same shards.
"""

import dataclasses
import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import ObjectStore, StorageConfig, open_store

MANIFEST = 'manifest.parquet'
INFO_KEY = b'cosim_dist.info'
KINDS = ('pixels', 'pixels_float', 'latents')

#----------------------------------------------------------------------------
# Dataset metadata and manifest.

@dataclasses.dataclass(kw_only=True)
class DatasetInfo:
    # 'pixels' (uint8), 'pixels_float' (float32) or 'latents' (posterior mean/std)
    kind: str
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
                raise ValueError(f'dataset {key}={value}: latents need one value per channel ({self.channels}), '
                                 'other kinds none')

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
        raise FileNotFoundError(f'{store.url}/{MANIFEST} not found: '
                                f'is {store.url} a dataset written by cosim-make-shards?') from e
    meta = table.schema.metadata or {}
    if INFO_KEY not in meta:
        raise ValueError(f'{store.url}/{MANIFEST} has no {INFO_KEY.decode()} metadata; '
                         'rewrite it with cosim-make-shards')
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
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError('object arrays are not allowed in shards')
    return dtype, shape, 'F' if fortran else 'C'

def _npy(raw: bytes) -> np.ndarray:
    """np.load of an .npy member (version 1 or 2), parsing each distinct header once:
    np.load spends most of its time there."""
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

def verify_manifest(url: str | os.PathLike,
                    storage: StorageConfig | None = None) -> tuple[DatasetInfo, list[ShardEntry]]:
    """Read every shard of the dataset at `url` and check it against the manifest (bytes, sha256, sample count, sample
    shapes and dtypes, class histogram). Raises ValueError listing every problem;
    returns the manifest if all is well."""
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
        raise ValueError(f'{store.url}: {len(problems)} of {len(entries)} shards fail verification:\n  '
                         + '\n  '.join(problems))
    return info, entries

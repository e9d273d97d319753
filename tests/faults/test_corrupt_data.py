"""Corrupt training data: truncated shards, garbage shards (with and without a manifest that agrees), samples of the
wrong latent shape, samples without a label, and NaN samples. Bad shards are skipped and counted, every sample of the
good shards is still delivered exactly once, and NaN samples are dropped and counted by the trainer."""

import hashlib
import io
import random
import shutil

import numpy as np
import pytest
import torch
from fault_report import Trial, trials

from cosim_dist import build
from cosim_dist.config import load_config
from cosim_dist.data import ShardStream
from cosim_dist.shards import DatasetInfo, ShardEntry, read_manifest, shard_name, write_manifest, write_shard
from cosim_dist.storage import ObjectStore, open_store

SHARDS, PER_SHARD, C, R, CLASSES = 8, 8, 3, 16, 10       # the toy model's x0 (3x16x16, 10 classes)
INFO = DatasetInfo(kind='latents', resolution=R, channels=C, label_count=CLASSES, latent_scale=[1.0] * C,
                   latent_bias=[0.0] * C)
# what the toy (pixel) model trains on
PIXELS = DatasetInfo(kind='pixels_float', resolution=R, channels=C, label_count=CLASSES)
CORRUPTIONS = ('truncated shard', 'garbage shard', 'garbage shard, manifest agrees', 'wrong latent shape',
               'missing label')

def sample(index: int, rng: np.random.Generator, shape=(C, R, R), label: bool = True, kind: str = 'latents') -> dict:
    """x0[0, 0, 0] is the sample's index (latents: std = 0, so x0 is the mean exactly)."""
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[0] = index
    out = {'__key__': f'{index:08d}'} | ({'mean.npy': x, 'std.npy': np.zeros(shape, np.float32)}
                                         if kind == 'latents' else {'x.npy': x})
    return out | ({'cls': int(rng.integers(CLASSES))} if label else {})

def dataset(url: str, info: DatasetInfo) -> str:
    store, rng = open_store(url), np.random.default_rng(0)
    entries = [write_shard(store, shard_name(s),
                           [sample(s * PER_SHARD + i, rng, kind=info.kind) for i in range(PER_SHARD)], info)
               for s in range(SHARDS)]
    write_manifest(store, info, entries)
    return url

@pytest.fixture(scope='module')
def clean(tmp_path_factory) -> str:
    return dataset(str(tmp_path_factory.mktemp('latents')), INFO)

@pytest.fixture(scope='module')
def pixels(tmp_path_factory) -> str:
    return dataset(str(tmp_path_factory.mktemp('pixels')), PIXELS)

def raw_tar(samples: list[dict]) -> bytes:
    """A shard written without write_shard's checks (what a buggy or foreign writer could produce)."""
    import webdataset as wds
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as tar:
        for s in samples:
            tar.write(s)
    return buf.getvalue()

def corrupt(store: ObjectStore, shard: int, kind: str, rng: random.Random) -> None:
    """Damage one shard; kinds whose manifest is rewritten to agree model a writer bug rather than storage damage."""
    info, entries = read_manifest(store)
    name, data = shard_name(shard), store.read(shard_name(shard))
    nrng = np.random.default_rng(rng.randrange(2**32))
    base = shard * PER_SHARD
    if kind == 'truncated shard':
        store.put_bytes(data[:rng.randrange(len(data))], name)
        return
    if kind == 'garbage shard':
        store.put_bytes(rng.randbytes(len(data)), name)
        return
    if kind == 'garbage shard, manifest agrees':
        data = rng.randbytes(len(data))
    elif kind == 'wrong latent shape':
        odd = rng.randrange(PER_SHARD)
        data = raw_tar([sample(base + i, nrng, (C, R // 2, R // 2) if i == odd else (C, R, R))
                        for i in range(PER_SHARD)])
    else:
        odd = rng.randrange(PER_SHARD)
        data = raw_tar([sample(base + i, nrng, label=i != odd) for i in range(PER_SHARD)])
    store.put_bytes(data, name)
    entries[shard] = ShardEntry(name=name, samples=PER_SHARD, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                class_hist=entries[shard].class_hist)
    write_manifest(store, info, entries)

def copy(src: str, dst) -> ObjectStore:
    shutil.copytree(src, dst)
    return open_store(dst)

def test_corrupt_shards_are_skipped_and_counted(clean, tmp_path, record):
    rng = random.Random(3)
    for trial in range(trials(2)):
        store = copy(clean, tmp_path / str(trial))
        kinds = rng.sample(CORRUPTIONS, len(CORRUPTIONS) if trial == 0 else rng.randint(1, 3))  # all kinds in trial 0
        bad = dict(zip(rng.sample(range(SHARDS), len(kinds)), kinds))
        for shard, kind in bad.items():
            corrupt(store, shard, kind, rng)
        good = [s for s in range(SHARDS) if s not in bad]
        workers = rng.choice((0, 2))
        stream = ShardStream(store.url, batch_size=PER_SHARD, num_workers=workers, seed=trial)
        batches = [stream.next_batch()[0] for _ in range(2 * SHARDS)]      # past the end of every reader's epoch 0
        seen = [sorted(int(x[0, 0, 0]) for batch in part for x in batch) for part in (batches[:len(good)], batches)]
        want = sorted(s * PER_SHARD + i for s in good for i in range(PER_SHARD))
        skipped = {int(name[6:12]) for name in stream.bad_shards}
        stream.close()
        # One reader delivers exactly the good samples in its first epoch; several readers flow into their next
        # epochs independently, so there only "nothing from a bad shard" holds.
        exact = set(seen[1]) == set(want) and (seen[0] == want or workers > 0)
        for shard, kind in bad.items():
            record(Trial(kind, shard in skipped and exact, not exact, f'shard {shard}, {workers} workers'))
        assert skipped == set(bad) and stream.skipped_shards == len(bad), (bad, stream.bad_shards)
        assert exact, (bad, workers)

def test_nan_samples_are_dropped_in_training(pixels, tmp_path, record):
    """A short training run on shards holding NaN samples and one truncated shard: it finishes, the NaN samples are
    dropped and counted exactly, the corrupt shard is skipped and counted, the parameters stay finite."""
    rng = random.Random(4)
    for trial in range(trials(1)):
        store = copy(pixels, tmp_path / str(trial))
        nan_shard, cut_shard = rng.sample(range(SHARDS), 2)
        nrng = np.random.default_rng(trial)
        poisoned = [sample(nan_shard * PER_SHARD + i, nrng, kind=PIXELS.kind) for i in range(PER_SHARD)]
        for s in rng.sample(poisoned, rng.randint(1, 4)):
            s['x.npy'].flat[rng.randrange(1, C * R * R)] = rng.choice((np.nan, np.inf))
        info, entries = read_manifest(store)
        entries[nan_shard] = write_shard(store, shard_name(nan_shard), poisoned, PIXELS)
        write_manifest(store, info, entries)
        corrupt(store, cut_shard, 'truncated shard', rng)
        cfg = load_config([f'run.root={tmp_path}', f'run.name=nan{trial}', 'data.kind=shards', f'data.path={store.url}',
                           'train.kimg=0.128', 'train.batch=16', 'train.checkpoint_kimg=0', 'logging.wandb=disabled',
                           'logging.progress=false', 'model.net.model_channels=16'])
        build.prepare_run_dir(cfg)
        torch.manual_seed(0)
        trainer = build.build_trainer(cfg, build.new_network(cfg).eval().requires_grad_(False), torch.device('cpu'))
        state = trainer.train()
        replay = ShardStream(store.url, batch_size=16, seed=cfg.run.seed + 2)
        expected = sum(int((~torch.isfinite(replay.next_batch()[0].flatten(1)).all(1)).sum()) for _ in range(2 * 8))
        finite = all(torch.isfinite(p).all() for p in trainer.g.module.parameters())
        ok = state.nimg == 128 and state.nan_dropped == expected > 0 and finite and trainer.data.skipped_shards == 1
        record(Trial('NaN samples in training', ok, not finite, f'{state.nan_dropped} dropped, {expected} expected'))
        assert ok, (state, expected, finite, trainer.data.bad_shards)

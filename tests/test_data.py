"""ShardStream: world-size invariant epochs, exact mid-epoch resume, corrupt shards, S3, and the manifest."""

import collections
import logging
import os
import uuid

import numpy as np
import psutil
import pytest
import torch

from cosim_dist.data import ShardStream
from cosim_dist.shards import DatasetInfo, shard_name, verify_manifest, write_manifest, write_shard
from cosim_dist.storage import open_store

SHARDS, PER_SHARD, CLASSES = 8, 12, 5
N = SHARDS * PER_SHARD

def _write(url: str, info: DatasetInfo, make) -> None:
    store, rng = open_store(url), np.random.default_rng(0)
    entries = [write_shard(store, shard_name(s),
                           [make(rng, f'{s * PER_SHARD + i:08d}') for i in range(PER_SHARD)], info)
               for s in range(SHARDS)]
    write_manifest(store, info, entries)

@pytest.fixture(scope='module')
def latents(tmp_path_factory) -> str:
    """8 shards of 12 labelled 4x8x8 latents (fp16 mean and std)."""
    url = str(tmp_path_factory.mktemp('latents'))
    info = DatasetInfo(kind='latents', resolution=8, channels=4, label_count=CLASSES, latent_scale=[0.5, 1, 2, 1],
                       latent_bias=[0, 1, 0, -1])
    _write(url, info, lambda rng, key: {'__key__': key, 'mean.npy': rng.standard_normal((4, 8, 8)).astype(np.float16),
                                        'std.npy': rng.uniform(0.1, 1, (4, 8, 8)).astype(np.float16),
                                        'cls': int(rng.integers(CLASSES))})
    return url

def _take(stream: ShardStream, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next_batch() for _ in range(batches)]

def _multiset(batches) -> collections.Counter:
    return collections.Counter((x.numpy().tobytes(), c.numpy().tobytes()) for xb, cb in batches for x, c in zip(xb, cb))

def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ca), (xb, cb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ca, cb)

#----------------------------------------------------------------------------

def test_batches_and_pixel_mapping(tmp_path):
    info = DatasetInfo(kind='pixels', resolution=4, channels=3, label_count=0)
    _write(str(tmp_path), info,
           lambda rng, key: {'__key__': key, 'x.npy': np.full((3, 4, 4), int(key) % 256, np.uint8)})
    stream = ShardStream(tmp_path, batch_size=N, num_workers=0)
    x0, c = stream.next_batch()
    assert x0.dtype == torch.float32 and x0.shape == (N, 3, 4, 4) and c.shape == (N, 0) and stream.label_dim == 0
    # one epoch: every sample once, x/127.5 - 1
    assert torch.equal(x0[:, 0, 0, 0].sort().values, torch.arange(N) / 127.5 - 1)

def test_latent_resampling(latents):
    x0, c = ShardStream(latents, batch_size=6, num_workers=0).next_batch()
    assert x0.shape == (6, 4, 8, 8) and c.shape == (6, CLASSES) and (c.sum(1) == 1).all()
    # x0 = (mean + std*n)*scale + bias: with std = 0 it is exactly mean*scale + bias.
    info = DatasetInfo(kind='latents', resolution=2, channels=2, label_count=0, latent_scale=[2, 3],
                       latent_bias=[1, -1])
    url = f'{latents}-std0'
    mean = np.arange(8, dtype=np.float16).reshape(2, 2, 2)
    _write(url, info, lambda rng, key: {'__key__': key, 'mean.npy': mean, 'std.npy': np.zeros_like(mean)})
    x0, _ = ShardStream(url, batch_size=2).next_batch()
    want = (torch.tensor(mean, dtype=torch.float32) * torch.tensor([2., 3]).view(2, 1, 1)
            + torch.tensor([1., -1]).view(2, 1, 1))
    assert torch.equal(x0[0], want) and torch.equal(x0[1], want)

@pytest.mark.parametrize('workers', [0, 2])
def test_epoch_multiset_is_world_size_invariant(latents, workers):
    single = _take(ShardStream(latents, batch_size=4, num_workers=workers, seed=7), N // 4)
    ranks = [ShardStream(latents, batch_size=4, rank=r, world_size=2, num_workers=2, seed=7) for r in range(2)]
    double = [b for r in ranks for b in _take(r, N // 8)]
    assert _multiset(single) == _multiset(double) and sum(_multiset(single).values()) == N # latents noise included
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(single, double)) # the orders differ
    next_epoch = _take(ShardStream(latents, batch_size=4, num_workers=workers, seed=7), 2 * N // 4)[N // 4:]
    assert not _multiset(next_epoch) & _multiset(single) # fresh noise in epoch 1

@pytest.mark.parametrize('rank, world_size, workers', [(0, 1, 0), (1, 2, 2)])
def test_mid_epoch_resume_is_exact(latents, rank, world_size, workers):
    kw = dict(batch_size=4, rank=rank, world_size=world_size, num_workers=workers, seed=1)
    reference = _take(ShardStream(latents, **kw), 30) # crosses several epoch boundaries
    first = ShardStream(latents, **kw)
    _take(first, 7) # odd: the resumed stream starts at a worker other than 0
    state = first.state_dict()
    assert state['version'] == 2 and state['consumed'] == 7 * 4 * world_size
    resumed = ShardStream(latents, **kw)
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 23), reference[7:])

def _global(ranks: list[ShardStream], batches: int) -> list:
    """`batches` global batches: every rank's next batch in turn."""
    return [r.next_batch() for _ in range(batches) for r in ranks]

def _layout(url: str, world: int, workers: int, state: dict | None = None) -> list[ShardStream]:
    ranks = [ShardStream(url, batch_size=12 // world, rank=r, world_size=world, num_workers=workers, seed=3)
             for r in range(world)]
    for r in ranks if state else ():
        r.load_state_dict(state)
    return ranks

@pytest.mark.parametrize('before, after', [((2, 1), (3, 2)), ((1, 0), (2, 1)), ((3, 2), (1, 0))])
def test_another_layout_continues_every_epoch_without_repeats_or_gaps(latents, before, after):
    """A requeue on another number of ranks / workers (global batch 12 throughout): the samples read before and after
    the change hold each sample of the epoch that was under way exactly once, nothing is read twice, and the new
    layout's own state resumes exactly."""
    epochs = _multiset(_take(ShardStream(latents, batch_size=12, seed=3), 2 * N // 12))   # epochs 0 and 1
    epoch0 = _multiset(_take(ShardStream(latents, batch_size=12, seed=3), N // 12))
    old = _layout(latents, *before)
    read = _global(old, 3)                                            # 36 samples of epoch 0
    state = old[0].state_dict()
    assert state['version'] == 2 and state['consumed'] == 36
    new = _layout(latents, *after, state)
    read += _global(new, 8)                                           # 96 more: epoch 0's rest, then epoch 1
    seen = _multiset(read)
    assert max(seen.values()) == 1 and all(seen[k] == 1 for k in epoch0), 'a sample repeated or one of epoch 0 missed'
    assert not seen - epochs                                          # nothing from beyond epoch 1
    mid = new[0].state_dict()
    assert [s['world_size'] for s in mid['segments']] == [before[0], after[0]] and mid['consumed'] == 132
    continued = _global(new, 2)
    _assert_same(_global(_layout(latents, *after, mid), 2), continued)

def test_a_second_layout_change_keeps_the_inherited_visits_of_later_epochs():
    """Inherited visits span epochs 0 and 1; the next layout stops while its only reader is still inside the epoch-0
    visit: every inherited visit must pass on (none of epoch 1 dropped and then read again as a fresh epoch)."""
    from cosim_dist.data import _Plan
    from cosim_dist.shards import ShardEntry
    entries = [ShardEntry(name=f's{i}', samples=20, bytes=0, sha256='', class_hist=[]) for i in range(6)]
    plan = _Plan(entries, 0, 2, set(), carry=[[(0, 3, 10), (1, 1, 0)], [(1, 2, 0), (1, 5, 0)]], first_epoch=2)
    new = plan.handover([5, 0], 3)                   # reader 0 read 5 samples of (0, s3, 10); reader 1 read nothing
    assert sorted(i for c in new.carry for i in c) == [(0, 3, 15), (1, 1, 0), (1, 2, 0), (1, 5, 0)]
    assert new.first_epoch == 2

def test_workers_are_not_forks_of_the_reading_process(latents):
    """A fork of the reader copies the locks its other threads (gloo, boto3, tqdm's monitor, OpenMP) hold at that
    instant, and a worker that needs one hangs next_batch() for good (once in CI, inside the layout test above): the
    workers must be forks of the fork server, a fresh interpreter, not of this process."""
    stream = ShardStream(latents, batch_size=4, num_workers=2)
    assert sum(len(x) for x, _ in _take(stream, 4)) == 16
    workers = [psutil.Process(w.pid) for w in stream._batches._workers]
    assert len(workers) == 2 and all(w.ppid() not in (os.getpid(), 0) for w in workers)

def test_other_seeds_and_versions_are_refused(latents):
    state = ShardStream(latents, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match='saved with seed 1, this stream has 0'):
        ShardStream(latents, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match='version'):
        ShardStream(latents, batch_size=4).load_state_dict({'version': 3, 'consumed': 0})

def test_too_few_shards_is_a_clear_error(latents):
    with pytest.raises(ValueError, match='8 shards, fewer than the 12 readers of world_size=3 x num_workers=4'):
        ShardStream(latents, batch_size=4, world_size=3, num_workers=4)

@pytest.mark.parametrize('workers', [0, 2])
def test_truncated_shard_is_skipped_and_counted(latents, tmp_path, caplog, workers):
    url = open_store(tmp_path / 'copy')
    src = open_store(latents)
    for key in src.list():
        url.put_bytes(src.read(key), key)
    data = url.read(shard_name(3))
    url.put_bytes(data[:len(data) // 2], shard_name(3))
    with pytest.raises(ValueError, match='shard-000003.tar: .*bytes'):
        verify_manifest(url.url)
    kw = dict(batch_size=4, num_workers=workers, seed=2)
    stream = ShardStream(url.url, **kw)
    with caplog.at_level(logging.WARNING, logger='cosim_dist'):
        batches = _take(stream, (N - PER_SHARD) // 4)
    assert stream.skipped_shards == 1 and 'shard-000003.tar' in caplog.text and 'skipped corrupt shard' in caplog.text
    assert sum(_multiset(batches).values()) == N - PER_SHARD
    if workers == 0: # one reader: the first N - 12 samples are epoch 0 without shard 3
        assert not _multiset(batches) - _multiset(_take(ShardStream(latents, **kw), N // 4))
    # Resume across the skipped shard stays exact: the state lists it.
    reference = batches + _take(stream, 10)
    head = ShardStream(url.url, **kw)
    _take(head, 15)
    resumed = ShardStream(url.url, **kw)
    resumed.load_state_dict(head.state_dict())
    assert head.state_dict()['bad_shards'] == [shard_name(3)] and resumed.skipped_shards == 1
    _assert_same(_take(resumed, len(reference) - 15), reference[15:])

def test_all_shards_corrupt_is_an_error(latents, tmp_path):
    open_store(tmp_path).put_bytes(open_store(latents).read('manifest.parquet'), 'manifest.parquet') # shards missing
    with pytest.raises(RuntimeError, match='every shard is corrupt'):
        ShardStream(tmp_path, batch_size=4).next_batch()

def test_manifest_metadata_roundtrip(latents):
    info, entries = verify_manifest(latents)
    assert info.latent_scale == [0.5, 1, 2, 1] and len(entries) == SHARDS and all(len(e.sha256) == 64 for e in entries)
    assert sum(sum(e.class_hist) for e in entries) == N
    with pytest.raises(FileNotFoundError, match='manifest.parquet not found'):
        ShardStream(f'{latents}/nowhere', batch_size=1)

@pytest.mark.s3
def test_s3_stream_equals_local(latents, s3_endpoint, monkeypatch):
    """...with the endpoint and credentials set in the environment only after the workers' fork server started: the
    workers read with the environment of the reader, not the one the server started with."""
    _take(ShardStream(latents, batch_size=4, num_workers=1), 1)
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    remote = open_store(f's3://{s3_endpoint.bucket}/{uuid.uuid4().hex}/latents')
    local = open_store(latents)
    for key in local.list():
        remote.put_file(local.root / key, key)
    verify_manifest(remote.url)
    kw = dict(batch_size=4, rank=1, world_size=2, num_workers=2, seed=3)
    _assert_same(_take(ShardStream(remote.url, **kw), 15), _take(ShardStream(latents, **kw), 15))

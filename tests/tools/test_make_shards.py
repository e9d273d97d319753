"""make_shards: ADM crop, image-folder / array / GMM sources, manifest, and reading the result back."""

import collections

import numpy as np
import PIL.Image
import pytest
import torch

from cosim_dist.config import GMMConfig
from cosim_dist.data import ShardStream
from cosim_dist.shards import load_shard, read_manifest, verify_manifest
from cosim_dist.storage import open_store
from cosim_dist.tools.make_shards import adm_center_crop, main, write_gmm_shards
from cosim_dist.toy import GMMWorld

def _stored(url: str) -> list[dict]:
    store = open_store(url)
    info, entries = read_manifest(store)
    return [s for e in entries for s in load_shard(store, e, info)]

def test_adm_center_crop():
    blocks = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)) # 64x64 of constant 4x4 blocks
    assert np.array_equal(adm_center_crop(image, 16), blocks)       # two exact BOX halvings
    assert np.array_equal(adm_center_crop(PIL.Image.fromarray(blocks), 16), blocks)
    # 90x40 -> 45x20 -> bicubic 36x16 -> centre
    wide = adm_center_crop(PIL.Image.new('RGB', (90, 40), (10, 200, 30)), 16)
    assert wide.shape == (16, 16, 3) and (wide == [10, 200, 30]).all()
    marked = np.zeros((40, 90, 3), np.uint8)
    marked[:, 37:53] = 255 # a centred bright band survives the crop, the dark sides are cut to a thin border
    crop = adm_center_crop(PIL.Image.fromarray(marked), 16)
    assert crop[:, 6:10].min() > 200 and crop[:, 0].max() < 60

def test_image_folder(tmp_path):
    rng, counts = np.random.default_rng(1), {'cat': 5, 'dog': 3, 'eel': 4}
    for name, n in counts.items():
        (tmp_path / 'src' / name).mkdir(parents=True)
        for i in range(n):
            size = tuple(int(s) for s in rng.integers(20, 60, 2))
            mode = ('RGB', 'L', 'RGBA')[i % 3] # everything is converted to RGB
            pixels = rng.integers(0, 256, size[::-1] + ((3,), (), (4,))[i % 3], dtype=np.uint8)
            PIL.Image.fromarray(pixels, mode).save(tmp_path / 'src' / name / f'{i}.png')
    main(['--source', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'), '--resolution', '16',
          '--samples-per-shard', '5', '--workers', '2'])
    info, entries = verify_manifest(tmp_path / 'out')
    assert (info.kind, info.resolution, info.channels, info.label_count) == ('pixels', 16, 3, 3)
    assert info.extra['classes'] == ['cat', 'dog', 'eel'] and [e.samples for e in entries] == [5, 5, 2]
    assert np.sum([e.class_hist for e in entries], axis=0).tolist() == [5, 3, 4]
    stream = ShardStream(tmp_path / 'out', batch_size=4, num_workers=0)
    x, c = zip(*(stream.next_batch() for _ in range(3)))
    x, c = torch.cat(x), torch.cat(c)
    assert x.shape == (12, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and c.sum(0).tolist() == [5, 3, 4]

def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / 'a.npz', x=images, y=np.arange(6) % 2)
    main(['--source', str(tmp_path / 'a.npz'), '--out', str(tmp_path / 'out'), '--resolution', '8',
          '--samples-per-shard', '3'])
    samples = list(wds.WebDataset(str(tmp_path / 'out' / 'shard-{000000..000001}.tar'), shardshuffle=False).decode())
    assert len(samples) == 6 and samples[0]['x.npy'].shape == (3, 8, 8) and samples[0]['cls'] in (0, 1)

def test_arrays(tmp_path):
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 10)
    np.savez(tmp_path / 'a.npz', arr_0=images, arr_1=labels)
    main(['--source', str(tmp_path / 'a.npz'), '--out', str(tmp_path / 'npz'), '--resolution', '8',
          '--samples-per-shard', '4'])
    # same resolution: stored exactly
    got = sorted((s['x.npy'].tobytes(), s['cls']) for s in _stored(str(tmp_path / 'npz')))
    assert got == sorted((x.transpose(2, 0, 1).tobytes(), int(y)) for x, y in zip(images, labels))
    np.save(tmp_path / 'g.npy', rng.integers(0, 256, (5, 12, 12), dtype=np.uint8)) # greyscale, unlabelled, cropped
    main(['--source', str(tmp_path / 'g.npy'), '--out', str(tmp_path / 'g'), '--resolution', '6',
          '--samples-per-shard', '5'])
    info, _ = verify_manifest(tmp_path / 'g')
    assert (info.channels, info.label_count) == (1, 0)
    assert ShardStream(tmp_path / 'g', batch_size=5).next_batch()[1].shape == (5, 0)
    np.save(tmp_path / 'f.npy', np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match='need uint8 images'):
        main(['--source', str(tmp_path / 'f.npy'), '--out', str(tmp_path / 'f'), '--resolution', '4'])

def test_gmm_world_through_the_loader(tmp_path):
    world = GMMWorld(GMMConfig(classes=4))
    write_gmm_shards(world, 96, str(tmp_path / 'gmm'), seed=3, samples_per_shard=32)
    info, _ = verify_manifest(tmp_path / 'gmm')
    assert (info.kind, info.resolution, info.channels, info.label_count) == ('pixels_float', 16, 3, 4)
    gen = torch.Generator().manual_seed(3)
    x, y = zip(*(world.sample(32, gen) for _ in range(3))) # what write_gmm_shards drew
    want = collections.Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(torch.cat(x), torch.cat(y)))
    stream = ShardStream(tmp_path / 'gmm', batch_size=8, num_workers=0, seed=5)
    got = collections.Counter()
    for _ in range(12): # one epoch
        xb, cb = stream.next_batch()
        got.update((xi.numpy().tobytes(), int(ci.argmax())) for xi, ci in zip(xb, cb))
    assert got == want

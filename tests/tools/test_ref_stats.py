"""cosim-ref-stats on an image folder with randomly initialised extractor weights; reference files in
EDM2's pickle format and EDM's .npz; a reference pickle that refers to anything but numpy arrays is refused."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cosim_dist.eval import extractors
from cosim_dist.eval.metrics import frechet_distance, load_ref, save_ref
from cosim_dist.storage import sha256_file
from cosim_dist.tools import ref_stats

def test_ref_stats_of_an_image_folder(tmp_path):
    net = extractors.DinoV2()
    gen = torch.Generator().manual_seed(0)
    for p in net.parameters():
        if p.dim() > 1:
            torch.nn.init.kaiming_normal_(p, generator=gen)
    torch.save(net.state_dict(), tmp_path / 'dino.pth')
    rng = np.random.default_rng(0)
    for i in range(5):
        (tmp_path / 'imgs' / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3),
                                     dtype=np.uint8)).save(tmp_path / 'imgs' / f'c{i % 2}' / f'{i}.png')
    assert ref_stats.main(['--data', str(tmp_path / 'imgs'), '--out', str(tmp_path / 'ref.pkl'),
                           '--dinov2-weights', str(tmp_path / 'dino.pth'), '--resolution', '32', '--batch', '2']) == 0
    ref = load_ref(tmp_path / 'ref.pkl')
    mu, sigma = ref['fd_dinov2']
    assert mu.shape == (1024,) and sigma.shape == (1024, 1024) and np.trace(sigma) > 0
    # zero up to the rounding floor of a rank-4 covariance in d = 1024: the d - 4 null eigenvalues of S^1/2 S S^1/2 are
    # rounding errors <= u64 ||S||^2 whose square roots enter the distance: <= (d - 4) sqrt(u64) tr S = 1.07e-5 tr S
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < (1024 - 4) * np.sqrt(2.0 ** -53) * np.trace(sigma)
    meta = json.loads((tmp_path / 'ref.json').read_text())
    assert meta['num_images'] == 5 and meta['weights']['fd_dinov2']['sha256'] == sha256_file(tmp_path / 'dino.pth')

def test_reference_formats_and_refusal(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    save_ref(tmp_path / 'a.pkl', {'fid': (mu, sigma)})
    np.testing.assert_array_equal(load_ref(tmp_path / 'a.pkl')['fid'][1], sigma)
    np.savez(tmp_path / 'edm.npz', mu=mu, sigma=sigma)
    np.testing.assert_array_equal(load_ref(tmp_path / 'edm.npz')['fid'][0], mu)
    marker = tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'fid': {'mu': Evil(), 'sigma': sigma}}))
    with pytest.raises(pickle.UnpicklingError, match='system'):
        load_ref(tmp_path / 'evil.pkl')
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match='cosim-ref-stats'):
        load_ref(tmp_path / 'missing.pkl')

"""Metric naming: Inception distances are 'fid' only with the official weights; references must hold each metric."""

import numpy as np
import pytest
import torch

from cosim_dist.eval import extractors
from cosim_dist.eval.features import build_metric, reference_stats
from cosim_dist.eval.metrics import save_ref
from cosim_dist.storage import sha256_file

def test_only_the_official_inception_weights_give_fid(inception_weights, monkeypatch, tmp_path):
    metric = build_metric('inception', str(inception_weights), torch.device('cpu'))
    assert metric.name == 'fd_inception' and metric.info['official_weights'] is False
    assert metric.info['weights_sha256'] == sha256_file(inception_weights)
    monkeypatch.setattr(extractors, 'INCEPTION_SHA256', sha256_file(inception_weights))   # pretend these are official
    metric = build_metric('inception', str(inception_weights), torch.device('cpu'))
    assert metric.name == 'fid' and metric.info['official_weights'] is True

    save_ref(tmp_path / 'ref.pkl', {'fid': (np.ones(2048), np.eye(2048))})
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(7), sigma=np.eye(7))
    mu, _ = reference_stats(str(tmp_path / 'ref.pkl'), [metric])['fid']
    assert mu.tolist() == [1.0] * 2048
    with pytest.raises(ValueError, match=r'shape \(7,\), expected \(2048,\)'):
        reference_stats(str(tmp_path / 'ref.npz'), [metric])
    with pytest.raises(FileNotFoundError, match='eval.ref is not set'):
        reference_stats(None, [metric])

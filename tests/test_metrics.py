"""Frechet distance and float64 moments."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cosim_dist.eval.metrics import MomentAccumulator, frechet_distance

def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

def random_psd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)

def test_frechet_matches_scipy_and_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_psd(rng, d), random_psd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)
    v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)                 # diagonal: sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)

def test_moment_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((1000, 8)) * 3 + 1
    acc = MomentAccumulator(8)
    for chunk in np.array_split(f, 7):
        acc.update(torch.from_numpy(chunk).float())
    mu, sigma = acc.moments()
    f32 = f.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-9)

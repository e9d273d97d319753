"""Frechet distance and float64 moments."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cosim_dist.eval.metrics import MomentAccumulator, frechet_distance

pytestmark = pytest.mark.numeric        # tolerances depend on floating-point code paths (see .ci/run)

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
    # float64 eigen / Schur decompositions of 16 x 16 matrices: eigenvalue errors <= d u64 ||m|| = 7e-15 (||m|| = 3.8),
    # each through a square root at lambda_min(m) = 0.06: 2 d x 1.4e-14 = 4.5e-13 of a distance of 19.4, 2.3e-14
    # relative; rel=1e-12 leaves 40x for scipy's sqrtm of the non-normal s1 s2 (was 1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-12)
    # zero up to the same rounding: 2 d x d u64 ||s1||^2 / (2 lambda_min(s1)) = 2 d x 3.3e-14 = 1e-12 (||s1|| = 2.5,
    # lambda_min = 0.17): abs=1e-11 (was 1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-11)
    v1, v2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)                 # diagonal: sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    # float64, diagonal matrices: ~d roundings of terms summing to 46 for a distance of 20: rel=1e-12 (was 1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)

def test_moment_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((1000, 8)) * 3 + 1
    acc = MomentAccumulator(8)
    for chunk in np.array_split(f, 7):
        acc.update(torch.from_numpy(chunk).float())
    mu, sigma = acc.moments()
    f32 = f.astype(np.float32).astype(np.float64)
    # float64 sums of the same 1000 values (fp32 products are exact in float64), grouped in 7 chunks vs numpy's: worst
    # case n u64 E|f| / |mean| = 1000 x 1.1e-16 x 3.1 / 0.8 = 4e-13 for the means
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
    # and n u64 max E|f_i f_j| = 1000 x 1.1e-16 x 10.6 = 1.2e-12 per covariance entry, on each side: atol=3e-12
    # (was rtol=1e-9, which is not a bound for entries near 0)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=0, atol=3e-12)

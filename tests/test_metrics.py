"""Fréchet and kernel distances (hold_mlx.metrics) against closed forms and direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg as sla

from hold_mlx.metrics import (fd_from_features, feature_stats, frechet_distance, gaussian_kernel, kernel_distance,
                              mmd2_unbiased, polynomial_kernel)
from hold_mlx.quality import distances, quantize_images


def random_spd(d, rng, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.exp(rng.uniform(0, math.log(cond), d))) @ q.T


# ----------------------------------------------------------------------------- Fréchet distance


def test_fd_one_dimensional():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_fd_commuting_covariances():
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.3, 2.0, 4.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_non_commuting_two_by_two_closed_form():
    """For 2x2 SPD matrices, tr sqrt(C1 C2) = sqrt(tr(C1 C2) + 2 sqrt(det C1 det C2))."""
    c1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    c2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    cross = math.sqrt(np.trace(c1 @ c2) + 2 * math.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-12)


def test_fd_matches_scipy_sqrtm_in_higher_dimension():
    rng = np.random.default_rng(0)
    c1, c2 = random_spd(30, rng), random_spd(30, rng)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    cross = np.trace(sla.sqrtm(c1 @ c2)).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross
    got = frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(got, rel=1e-9)  # symmetric


def test_fd_is_stable_for_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances, like dead ReLU features): the
    result stays real, finite and >= 0, and a set against itself scores 0."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 64)) @ rng.standard_normal((64, 64))
    x[:, :8] = 0.0  # dead features
    assert fd_from_features(x, x) == pytest.approx(0.0, abs=1e-7 * np.trace(np.cov(x, rowvar=False)))
    y = x + 0.1 * rng.standard_normal(x.shape)
    value = fd_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_feature_stats_are_the_unbiased_moments():
    x = np.random.default_rng(2).standard_normal((50, 3))
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False))


def test_fd_rejects_bad_features():
    with pytest.raises(ValueError, match="NaN"):
        fd_from_features(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- kernel distance


def direct_mmd2(x, y, degree=3, gamma=None, coef0=1.0, k=None):
    """The unbiased MMD^2 written as explicit double loops over pairs (polynomial kernel unless k is
    given as a function of two points)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def polynomial(a, b):
        return (gamma * float(np.dot(a, b)) + coef0) ** degree

    k = k or polynomial
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel", [{}, {"degree": 2, "gamma": 0.3, "coef0": 0.5}])
def test_mmd2_matches_direct_pair_sums(kernel):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((9, 4)) + 0.5
    assert mmd2_unbiased(x, y, **kernel) == pytest.approx(direct_mmd2(x, y, **kernel), rel=1e-12)


def test_mmd2_gaussian_kernel_matches_direct_pair_sums():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3
    hs = (0.5, 2.0)

    def k(a, b):
        return np.mean([math.exp(-float(np.sum((a - b) ** 2)) / (2 * h * h)) for h in hs])

    assert mmd2_unbiased(x, y, gaussian_kernel, bandwidths=hs) == pytest.approx(direct_mmd2(x, y, k=k), rel=1e-12)
    # the kernel matrix itself, entry by entry
    np.testing.assert_allclose(gaussian_kernel(x, y, hs), [[k(a, b) for b in y] for a in x], rtol=1e-13)


def test_mmd2_is_unbiased_for_equal_laws():
    """Two samples of the same law: over 400 draws the mean is 0 within 4 standard errors."""
    rng = np.random.default_rng(4)
    values = np.array([mmd2_unbiased(rng.standard_normal((20, 3)), rng.standard_normal((20, 3)))
                       for _ in range(400)])
    assert abs(values.mean()) < 4 * values.std(ddof=1) / math.sqrt(len(values))
    assert (values < 0).any()  # an unbiased estimate of 0 must go negative


def test_mmd2_is_unbiased_for_different_laws():
    """Small-sample estimates (n = 8) average to the large-sample value; the biased V-statistic,
    which keeps the i = j terms, is off by O(1/n) and fails the same test."""
    rng = np.random.default_rng(5)
    cov = np.array([[1.0, 0.6], [0.6, 1.5]])

    def draw(n):
        return rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) @ np.linalg.cholesky(cov).T + 0.4

    big = np.array([mmd2_unbiased(*draw(2000)) for _ in range(4)])
    small_u, small_v = [], []
    for _ in range(1500):
        x, y = draw(8)
        small_u.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        small_v.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    small_u, small_v = np.array(small_u), np.array(small_v)
    se = math.sqrt(small_u.var(ddof=1) / len(small_u) + big.var(ddof=1) / len(big))
    assert big.mean() > 10 * se  # the laws really differ
    assert abs(small_u.mean() - big.mean()) < 4 * se
    assert abs(small_v.mean() - big.mean()) > 4 * se


def test_kernel_distance_subsets():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((40, 3)) + 0.3
    mean, std = kernel_distance(x, y, subsets=1, subset_size=30)
    # every row of x in the subset: the U-statistic does not depend on the order
    assert std == 0.0
    sub = kernel_distance(x, y, subsets=20, subset_size=10, seed=1)
    assert sub[1] > 0
    assert kernel_distance(x, y, subsets=20, subset_size=10, seed=1) == sub  # seeded


# ----------------------------------------------------------------------------- names


def test_metric_names_say_what_they_are():
    rng = np.random.default_rng(7)
    f, g = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    assert set(distances(f, g, "FMNIST-classifier", subsets=2, subset_size=10)) == {
        "FD-FMNIST-classifier", "KD-FMNIST-classifier"}
    assert set(distances(f, g, "inception", subsets=2, subset_size=10)) == {"FID", "KID"}


def test_quantize_images_to_eight_bits():
    x = np.array([-0.1, 0.0, 0.5 / 255, 0.3, 1.0, 1.2])
    q = quantize_images(x)
    np.testing.assert_allclose(q * 255, np.round(q * 255), atol=1e-4)
    assert q.min() == 0.0 and q.max() == 1.0


# ----------------------------------------------------------------------------- MMD² against a known mixture


def _anisotropic_mixture():
    from hold_mlx.exact import GaussianMixture

    covs = np.array([[[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]], np.diag([0.05, 0.4, 0.2])])
    return GaussianMixture(np.array([0.3, 0.7]), np.array([[1.0, -0.5, 0.0], [-0.5, 0.5, 1.0]]), covs)


def test_mmd2_to_mixture_matches_monte_carlo_expectations():
    """The closed-form terms E k(x_i, Y) and E k(Y, Y') against Monte-Carlo averages over 400 000
    mixture draws: the whole estimate agrees to well within 4 Monte-Carlo standard errors."""
    from hold_mlx.exact import mmd2_to_mixture

    mix, hs = _anisotropic_mixture(), (0.3, 1.0)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 3)) * 0.8
    y, y2 = mix.sample(400_000, rng), mix.sample(400_000, rng)
    kxx = gaussian_kernel(x, x, hs)
    within = (kxx.sum() - np.trace(kxx)) / (12 * 11)
    cross = gaussian_kernel(x, y, hs).mean(0)  # per draw of Y: mean over the x_i
    pair = np.mean([np.exp(-((y - y2) ** 2).sum(1) / (2 * h * h)) for h in hs], axis=0)  # per pair (Y, Y')
    terms = pair - 2.0 * cross  # per draw: an unbiased estimate of (MMD² - within)
    se = terms.std() / math.sqrt(len(terms))
    assert se < 2e-3
    assert mmd2_to_mixture(x, mix, hs) == pytest.approx(within + terms.mean(), abs=4 * se)


def test_mmd2_to_mixture_is_unbiased_and_sharper_than_a_sampled_reference():
    """Exact samples: mean 0 within 4 standard errors over 300 draws, and a smaller spread than the
    sample-vs-sample estimate, which also carries the reference set's noise."""
    from hold_mlx.exact import mmd2_to_mixture

    mix, hs = _anisotropic_mixture(), (0.2, 0.5, 1.0)
    rng = np.random.default_rng(8)
    exact = np.array([mmd2_to_mixture(mix.sample(30, rng), mix, hs) for _ in range(300)])
    sampled = np.array([mmd2_unbiased(mix.sample(30, rng), mix.sample(30, rng), gaussian_kernel, bandwidths=hs)
                        for _ in range(300)])
    assert abs(exact.mean()) < 4 * exact.std(ddof=1) / math.sqrt(len(exact))
    assert exact.std() < 0.8 * sampled.std()
    # and a biased sampler is seen: draws shrunk by 30% towards the origin
    shrunk = np.array([mmd2_to_mixture(0.7 * mix.sample(30, rng), mix, hs) for _ in range(100)])
    assert shrunk.mean() > 6 * shrunk.std(ddof=1) / math.sqrt(len(shrunk))


def test_mmd2_to_mixture_refuses_wrong_shapes():
    from hold_mlx.exact import mmd2_to_mixture

    with pytest.raises(ValueError, match=r"expected samples \(N >= 2, 3\)"):
        mmd2_to_mixture(np.zeros((5, 2)), _anisotropic_mixture(), (1.0,))

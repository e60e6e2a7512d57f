"""Distances between two sets of features (NumPy, float64): Fréchet distance and kernel distance.

These are the formulas behind FID and KID, applied to whatever feature space the caller names
("FD-FMNIST-classifier" for the shipped classifier, "FID" only for the Inception-v3 features):

- Fréchet distance between the Gaussians fitted to the two sets:
      FD = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2).
  The last trace equals tr((C1 C2)^1/2) (the two matrices are similar) but is computed from a
  symmetric eigendecomposition, which stays real and stable for singular or non-commuting
  covariances where a general sqrtm returns complex round-off.
- Kernel distance: the unbiased MMD^2 estimate with KID's cubic polynomial kernel
  k(x, y) = (x.y / dim + 1)^3, averaged over random subsets (mean and std over subsets, as KID).
  The same estimate with a multi-scale Gaussian kernel compares low-dimensional samples with data
  (the sampler benchmarks on exact scores).
"""

from __future__ import annotations

import numpy as np

__all__ = ["feature_stats", "frechet_distance", "fd_from_features", "polynomial_kernel", "gaussian_kernel",
           "squared_distances", "mmd2_unbiased", "kernel_distance"]


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features (N, dim) with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or Inf (did sampling diverge?)")
    return x


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (dim,) and unbiased covariance (dim, dim) of features (N, dim)."""
    x = _as_features(features, "features")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sym_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: means {mu1.shape}, {mu2.shape}; covariances {cov1.shape}, {cov2.shape}")
    s1 = _sym_sqrt(cov1)
    middle = s1 @ (0.5 * (cov2 + cov2.T)) @ s1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross, 0.0))


def fd_from_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N1, dim), (N2, dim)."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def polynomial_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    """(gamma x.y + coef0)^degree with gamma = 1/dim by default (KID)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def squared_distances(x, y) -> np.ndarray:
    """|x_i - y_j|^2 for x (m, dim) and y (n, dim), as an (m, n) matrix (round-off clipped at 0)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def gaussian_kernel(x, y, bandwidths) -> np.ndarray:
    """mean_h exp(-|x - y|^2 / (2 h^2)) over ``bandwidths``: a multi-scale Gaussian kernel,
    sensitive to both a mixture's layout and its components' widths."""
    d = squared_distances(x, y)
    return sum(np.exp(-d / (2.0 * h * h)) for h in bandwidths) / len(bandwidths)


def mmd2_unbiased(x, y, kernel=polynomial_kernel, **kernel_options) -> float:
    """Unbiased MMD^2 between samples x (m, dim) and y (n, dim): the U-statistic

        1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_ij k(x_i, y_j)

    whose expectation is the population MMD^2 (it can be negative). ``kernel(a, b, **kernel_options)``
    returns the matrix of k(a_i, b_j): KID's ``polynomial_kernel`` by default, or e.g.
    ``gaussian_kernel`` with ``bandwidths=...``."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = len(x), len(y)
    kxx, kyy = kernel(x, x, **kernel_options), kernel(y, y, **kernel_options)
    kxy = kernel(x, y, **kernel_options)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_distance(x, y, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                    **kernel) -> tuple[float, float]:
    """KID-style kernel distance: mean and std of ``mmd2_unbiased`` over random subsets.

    Each subset draws min(subset_size, len(x), len(y)) rows of each set without replacement (the
    same protocol as torch-fidelity's KID). Returns (mean, std over subsets).
    """
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(int(subset_size), len(x), len(y))
    if size == len(x) == len(y):  # every subset would be the whole of both sets
        return mmd2_unbiased(x, y, **kernel), 0.0
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                     y[rng.choice(len(y), size, replace=False)], **kernel)
                       for _ in range(subsets)])
    return float(values.mean()), float(values.std())

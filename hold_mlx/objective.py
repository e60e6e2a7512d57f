"""Block-coordinate (hybrid) score matching: the training objective, written once.

The float64 coefficients come from the SDE module (``objective_coefficients``); the loss itself
is a few array operations shared by MLX and torch (docs/math.md §3). With u_t = A x0 + L eps
(per data dimension, A = mean_coeff, L = lower Cholesky factor of the hybrid-start covariance),
the conditional score of the last block is -eps_n / ell_t, ell_t = L[n, n]. The network
predicts alpha; the score is s = -alpha / ell_t - mixed_coeff * u_n / ell_t, where the optional
mixed term mixed_coeff = ell_t / Sigma^mix_nn adds the exact score of a Gaussian (docs/math.md §3).
Every weighting is a multiple of || alpha + mixed_coeff u_n - eps_n ||^2:
  "eps":        weight 1  (CLD's reweightedv2)
  "likelihood": weight beta(t) sigma^2 / ell_t^2  (maximum-likelihood weighting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sde import LinearSDE

__all__ = ["WEIGHTINGS", "Coefficients", "objective_coefficients", "sample_times", "score_scale"]

WEIGHTINGS = ("eps", "likelihood")


@dataclass
class Coefficients:
    """Per-sample float64 coefficients for one training batch."""

    t: np.ndarray  # (B,)
    mean: np.ndarray  # (B, n): first column of A(t), since the auxiliaries start at mean 0
    chol: np.ndarray  # (B, n, n) lower Cholesky factor of Sigma_t
    mixed: np.ndarray  # (B,) coefficient of u_n in the alpha-space residual (0 if not mixed)
    weight: np.ndarray  # (B,) loss weight

    def as_float32(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32)
                for k in ("t", "mean", "chol", "mixed", "weight")}


def sample_times(sde: LinearSDE, rng: np.random.Generator, batch: int) -> np.ndarray:
    """t ~ U[eps_loss, T]."""
    return sde.eps_loss + (sde.T - sde.eps_loss) * rng.random(batch)


def objective_coefficients(sde: LinearSDE, t: np.ndarray, *, mixed_score: bool = True,
                           weighting: str = "eps") -> Coefficients:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    t = np.asarray(t, dtype=np.float64)
    k = sde.kernel(t)
    ell = k.ell
    mixed = ell / sde.mixed_score_var(t) if mixed_score else np.zeros_like(t)
    if weighting == "eps":
        weight = np.ones_like(t)
    else:
        weight = sde.beta(t) * sde.sigma**2 / ell**2
    return Coefficients(t, k.mean_coeff[:, :, 0], k.chol, mixed, weight)


def score_scale(sde: LinearSDE, t, *, mixed_score: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with score = a * alpha + b * u_n, per time: a = -1/ell_t, b = -1/Sigma^mix_nn.

    Samplers pass one time for the whole batch, so the float64 kernel is computed once per
    distinct time and broadcast back.
    """
    times, index = np.unique(np.atleast_1d(np.asarray(t, dtype=np.float64)), return_inverse=True)
    ell = sde.kernel(times).ell
    b = -1.0 / sde.mixed_score_var(times) if mixed_score else np.zeros_like(times)
    return (-1.0 / ell)[index], b[index]


def perturb(x0, eps_blocks: list, mean, chol, per_sample):
    """u_t blocks: u_i = mean_i x0 + sum_{j<=i} chol_ij eps_j (array-framework neutral).

    ``mean`` (B, n) and ``chol`` (B, n, n) are backend arrays; ``per_sample(col)`` reshapes a (B,)
    column to broadcast over a block.
    """
    n = len(eps_blocks)
    blocks = []
    for i in range(n):
        acc = per_sample(mean[:, i]) * x0
        for j in range(i + 1):
            acc = acc + per_sample(chol[:, i, j]) * eps_blocks[j]
        blocks.append(acc)
    return blocks


def residual(alpha, u_last, eps_last, mixed, per_sample):
    """alpha + mixed u_n - eps_n: zero exactly when the model's score is the conditional score."""
    return alpha + per_sample(mixed) * u_last - eps_last

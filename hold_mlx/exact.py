"""Exact scores of Gaussian mixtures pushed through a linear SDE (NumPy, float64).

A Gaussian mixture in data space, with every auxiliary block started at N(0, aux_var), stays a
Gaussian mixture in the extended space at every t, so its score is known in closed form. This
gives samplers and likelihoods a ground truth free of training noise (tests, tools/bench_exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sde import LinearSDE

__all__ = ["GaussianMixture", "ExactScore", "checkerboard_like_mixture", "ring_mixture"]


@dataclass
class GaussianMixture:
    """sum_k w_k N(means[k], covs[k]) in R^d."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    covs: np.ndarray  # (K, d, d)

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = np.asarray(self.means, dtype=np.float64)
        self.covs = np.asarray(self.covs, dtype=np.float64)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covs)
        z = rng.standard_normal((n, self.dim))
        return self.means[comp] + np.einsum("nij,nj->ni", chol[comp], z)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return _mixture_log_prob(x, self.weights, self.means, self.covs)

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def cov(self) -> np.ndarray:
        mu = self.mean()
        diff = self.means - mu
        return np.einsum("k,kij->ij", self.weights, self.covs) + np.einsum("k,ki,kj->ij", self.weights, diff, diff)


def _mixture_log_prob(x, weights, means, covs):
    """log sum_k w_k N(x; means[k], covs[k]) for x (N, D); means (K, D), covs (K, D, D)."""
    chol = np.linalg.cholesky(covs)
    diff = x[None, :, :] - means[:, None, :]  # (K, N, D)
    sol = np.linalg.solve(chol[:, None], diff[..., None])[..., 0]
    maha = (sol**2).sum(-1)
    logdet = 2 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    logs = np.log(weights)[:, None] - 0.5 * (maha + logdet[:, None] + x.shape[1] * np.log(2 * np.pi))
    top = logs.max(0)
    return top + np.log(np.exp(logs - top).sum(0))


class ExactScore:
    """The score of the last block for a mixture data law under ``sde``, at any t.

    Call as ``score(u, t)`` with u a NumPy array (B, n*d) (blocks side by side) and t (B,) or a
    scalar; the result is (B, d). Works as a sampler ``score_fn`` with the NumPy adapter.

    Per component, Cov_t = P (x) C_k + Q (x) I with P = a e1 e1^T a^T and
    Q = a diag(0, aux) a^T + S - a S a^T (a = expm(F B(t)), S = Sigma_inf), so in the eigenbasis
    of C_k the extended covariance splits into d independent n x n systems: exact, and cheap
    enough for a different t per sample.
    """

    def __init__(self, sde: LinearSDE, mixture: GaussianMixture, chunk: int = 512):
        self.sde, self.mixture, self.chunk = sde, mixture, chunk
        self._eig = [np.linalg.eigh(c) for c in mixture.covs]

    def _terms(self, u: np.ndarray, times: np.ndarray):
        """Per component: log weight + log density (K, R) and grad_u log N (K, R, n, d)."""
        sde, mix = self.sde, self.mixture
        n, d = sde.order, mix.dim
        a = sde.mean_coeff(times)  # (R, n, n)
        S = sde.stationary_cov()
        Q = a @ sde.initial_cov @ np.swapaxes(a, -1, -2) + S - a @ S @ np.swapaxes(a, -1, -2)
        p = a[:, :, 0]  # how the data mean spreads over the blocks
        P = p[:, :, None] * p[:, None, :]
        blocks = u.reshape(len(u), n, d)
        logs, grads = [], []
        for k, (lam, V) in enumerate(self._eig):
            w = (blocks - p[:, :, None] * mix.means[k][None, None, :]) @ V  # (R, n, d) rotated
            M = lam[None, :, None, None] * P[:, None] + Q[:, None]  # (R, d, n, n)
            wt = np.swapaxes(w, 1, 2)[..., None]  # (R, d, n, 1)
            sol = np.linalg.solve(M, wt)[..., 0]  # (R, d, n)
            _, logdet = np.linalg.slogdet(M)
            maha = (sol * wt[..., 0]).sum((1, 2))
            logs.append(np.log(mix.weights[k]) - 0.5 * (maha + logdet.sum(1) + n * d * np.log(2 * np.pi)))
            grads.append(-np.swapaxes(sol, 1, 2) @ V.T)  # back to the data basis: (R, n, d)
        return np.array(logs), np.array(grads)

    def _evaluate(self, u, t):
        u = np.asarray(u, dtype=np.float64)
        times = np.broadcast_to(np.asarray(t, dtype=np.float64), (u.shape[0],))
        n, d = self.sde.order, self.mixture.dim
        logp = np.empty(len(u))
        score = np.empty((len(u), n, d))
        for lo in range(0, len(u), self.chunk):
            sl = slice(lo, lo + self.chunk)
            logs, grads = self._terms(u[sl], times[sl])
            top = logs.max(0)
            resp = np.exp(logs - top)
            total = resp.sum(0)
            logp[sl] = top + np.log(total)
            score[sl] = np.einsum("kr,krnd->rnd", resp / total, grads)
        return logp, score.reshape(len(u), n * d)

    def log_prob(self, u, t) -> np.ndarray:
        """log p_t(u) of the extended state (B,), the auxiliary start included."""
        return self._evaluate(u, t)[0]

    def full_score(self, u, t) -> np.ndarray:
        """grad_u log p_t(u) for all blocks, (B, n d)."""
        return self._evaluate(u, t)[1]

    def __call__(self, u, t):
        d = self.mixture.dim
        return self.full_score(u, t)[:, -d:].astype(np.asarray(u).dtype)


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """k equal Gaussians on a circle in 2-D (the "8 gaussians" toy)."""
    angles = 2 * np.pi * np.arange(k) / k
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(np.ones(k), means, np.tile(std**2 * np.eye(2), (k, 1, 1)))


def checkerboard_like_mixture(dim: int, k: int = 8, seed: int = 0, spread: float = 1.0) -> GaussianMixture:
    """k anisotropic Gaussians at random places in R^dim (the high-dimensional benchmark law)."""
    rng = np.random.default_rng(seed)
    means = spread * rng.standard_normal((k, dim))
    covs = []
    for _ in range(k):
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        scales = np.exp(rng.uniform(np.log(0.02), np.log(0.3), dim))
        covs.append((q * scales) @ q.T)
    return GaussianMixture(rng.uniform(0.5, 1.5, k), means, np.array(covs))

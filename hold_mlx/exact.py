"""Exact scores of Gaussian mixtures pushed through a linear SDE (NumPy, float64).

A Gaussian mixture in data space, with every auxiliary block started at N(0, aux_var), stays a
Gaussian mixture in the extended space at every t, so its score is known in closed form. This
gives samplers and likelihoods a ground truth free of training noise (tests, tools/bench_exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sde import LinearSDE, expm

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

    Per component, Cov_t = P (x) C_k + Q (x) I with P = p p^T, p = a e_1 (a = expm(F B(t))) and
    Q = a diag(0, aux) a^T + S - a S a^T (S = Sigma_inf). In the eigenbasis of C_k the extended
    covariance splits into d independent n x n systems M_i = Q + lam_i p p^T, which are rank-one
    updates of one Q per time: Sherman-Morrison gives every M_i^-1 and log det M_i from Q^-1, so
    a call costs two d x d rotations per component, whatever t each row has. Where Q is nearly
    singular (t -> 0: the data block has not been perturbed yet) the n x n systems are solved
    directly instead, which is exact at t = 0 too.
    """

    #: Q with a larger condition number than this is solved directly (dense path).
    max_condition = 1e12

    def __init__(self, sde: LinearSDE, mixture: GaussianMixture, chunk: int = 2048):
        self.sde, self.mixture, self.chunk = sde, mixture, chunk
        self._eig = [np.linalg.eigh(c) for c in mixture.covs]

    def _time_terms(self, times: np.ndarray):
        """p (U, n), Q (U, n, n) at the unique times, and the index of each row's time."""
        sde, n = self.sde, self.sde.order
        uniq, index = np.unique(times, return_inverse=True)
        # W, the noise the forward process has added by time t: S - a S a^T loses every digit of
        # the data block's tiny variance as t -> 0, so early times use Van Loan's
        # expm([[-F, G G^T], [0, F^T]] B) = [[., a^-1 W], [0, a^T]] instead (whose a^-1 grows
        # without bound at late times, where the stationary form is accurate).
        dB = sde.B(uniq)[:, None, None]
        block = np.zeros((len(uniq), 2 * n, 2 * n))
        block[:, :n, :n] = -sde.F * dB
        block[:, :n, n:] = np.outer(sde.G, sde.G) * dB
        block[:, n:, n:] = sde.F.T * dB
        E = expm(block)
        a = np.swapaxes(E[:, n:, n:], -1, -2)
        at = np.swapaxes(a, -1, -2)
        S = sde.stationary_cov()
        early = (np.abs(sde.F).sum(0).max() * dB[:, 0, 0] < 1.0)[:, None, None]
        W = np.where(early, a @ E[:, :n, n:], S - a @ S @ at)
        Q = a @ sde.initial_cov @ at + W
        return a[:, :, 0], 0.5 * (Q + np.swapaxes(Q, -1, -2)), index.reshape(-1)

    def _terms(self, u: np.ndarray, times: np.ndarray):
        """Per component: log weight + log density (K, R) and grad_u log N (K, R, n, d)."""
        p, Q, index = self._time_terms(times)
        fast = np.linalg.cond(Q) < self.max_condition
        logs = np.empty((len(self.mixture.weights), len(u)))
        grads = np.empty((len(self.mixture.weights), len(u), self.sde.order, self.mixture.dim))
        for rows, kind in ((fast[index], self._rank_one_terms), (~fast[index], self._dense_terms)):
            if rows.any():
                used, local = np.unique(index[rows], return_inverse=True)
                logs[:, rows], grads[:, rows] = kind(u[rows], p[used], Q[used], local.reshape(-1))
        return logs, grads

    def _rank_one_terms(self, u, p, Q, index):
        n, d, mix = self.sde.order, self.mixture.dim, self.mixture
        Qinv = np.linalg.inv(Q)
        q = np.einsum("unm,um->un", Qinv, p)
        kappa = np.einsum("un,un->u", p, q)
        logdetQ = np.linalg.slogdet(Q)[1]
        Qinv, q, kappa, logdetQ, p = Qinv[index], q[index], kappa[index], logdetQ[index], p[index]
        blocks = u.reshape(len(u), n, d)
        logs, grads = [], []
        for k, (lam, V) in enumerate(self._eig):
            w = _rotate(blocks - p[:, :, None] * mix.means[k][None, None, :], V)  # (R, n, d)
            Qw = np.einsum("rnm,rmd->rnd", Qinv, w)
            qw = np.einsum("rn,rnd->rd", q, w)
            denom = 1.0 + lam[None, :] * kappa[:, None]  # (R, d)
            coef = lam[None, :] * qw / denom
            sol = Qw - q[:, :, None] * coef[:, None, :]  # M_i^-1 w_i for every i
            maha = (w * Qw).sum((1, 2)) - (coef * qw).sum(1)
            logdet = d * logdetQ + np.log(denom).sum(1)
            logs.append(np.log(mix.weights[k]) - 0.5 * (maha + logdet + n * d * np.log(2 * np.pi)))
            grads.append(_rotate(-sol, V.T))
        return np.array(logs), np.array(grads)

    def _dense_terms(self, u, p, Q, index):
        n, d, mix = self.sde.order, self.mixture.dim, self.mixture
        p, Q = p[index], Q[index]
        P = p[:, :, None] * p[:, None, :]
        blocks = u.reshape(len(u), n, d)
        logs, grads = [], []
        for k, (lam, V) in enumerate(self._eig):
            w = _rotate(blocks - p[:, :, None] * mix.means[k][None, None, :], V)
            M = lam[None, :, None, None] * P[:, None] + Q[:, None]  # (R, d, n, n)
            wt = np.swapaxes(w, 1, 2)[..., None]  # (R, d, n, 1)
            sol = np.linalg.solve(M, wt)[..., 0]  # (R, d, n)
            logdet = np.linalg.slogdet(M)[1].sum(1)
            maha = (sol * wt[..., 0]).sum((1, 2))
            logs.append(np.log(mix.weights[k]) - 0.5 * (maha + logdet + n * d * np.log(2 * np.pi)))
            grads.append(_rotate(-np.swapaxes(sol, 1, 2), V.T))
        return np.array(logs), np.array(grads)

    def _evaluate(self, u, t):
        u = np.asarray(u, dtype=np.float64)
        times = np.broadcast_to(np.asarray(t, dtype=np.float64), (u.shape[0],))
        n, d = self.sde.order, self.mixture.dim
        if u.ndim != 2 or u.shape[1] != n * d:
            raise ValueError(f"u must be (B, {n * d}) (the {n} blocks side by side), got {u.shape}")
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
        out = self.full_score(u, t)[:, -d:]
        dtype = np.asarray(u).dtype
        return out.astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def _rotate(x: np.ndarray, V: np.ndarray) -> np.ndarray:
    """x @ V over the last axis of (R, n, d) as one matrix product (one BLAS call)."""
    return (x.reshape(-1, x.shape[-1]) @ V).reshape(x.shape)


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

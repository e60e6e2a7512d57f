"""Exact scores of Gaussian mixtures pushed through a linear SDE (NumPy, float64).

A Gaussian mixture in data space, with every auxiliary block started at N(0, aux_var), stays a
Gaussian mixture in the extended space at every t, so its score is known in closed form. This
gives samplers and likelihoods a ground truth free of training noise (tests, tools/bench_exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import squared_distances
from .sde import LinearSDE

__all__ = [
    "GaussianMixture", "ExactScore", "checkerboard_like_mixture", "ring_mixture", "sliced_wasserstein",
    "median_distance", "mmd2_to_mixture",
]


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
    """The score of the last block for a mixture data law under ``sde``, at any t >= 0.

    Call as ``score(u, t)`` with u a NumPy array (B, n*d) (blocks side by side) and t (B,) or a
    scalar; the result is (B, d). Works as a sampler ``score_fn`` with the NumPy adapter.

    Per component, Cov_t = P (x) C_k + Q (x) I with P = p p^T, p = a e_1 (a = expm(F B(t))) and Q
    the covariance of everything but the data at time t. In the eigenbasis of C_k the extended
    covariance splits into d independent n x n systems M_i = Q + lam_i P: their inverses are
    computed once per distinct time and component (a sampler's batch shares one time), so a call
    costs little more than two d x d rotations per component. M_i stays well conditioned as
    t -> 0 (the data block's variance is lam_i), so this is exact at t = 0 too.
    """

    def __init__(self, sde: LinearSDE, mixture: GaussianMixture, chunk: int = 1024):
        self.sde, self.mixture, self.chunk = sde, mixture, chunk
        eig = [np.linalg.eigh(c) for c in mixture.covs]
        self._lam = np.array([lam for lam, _ in eig])  # (K, d)
        self._V = [V for _, V in eig]

    def _time_terms(self, times: np.ndarray):
        """p (U, n), Q (U, n, n) at the unique times, and the index of each row's time."""
        uniq, index = np.unique(times, return_inverse=True)
        # W, the noise added by time t, stays accurate as t -> 0 (where Q -> the auxiliary start)
        a, W = self.sde.forward_transition(uniq)
        at = np.swapaxes(a, -1, -2)
        Q = a @ self.sde.initial_cov @ at + W
        return a[:, :, 0], 0.5 * (Q + np.swapaxes(Q, -1, -2)), index.reshape(-1)

    def _terms(self, u: np.ndarray, times: np.ndarray, last_only: bool = False):
        """Per component: log weight + log density (K, R) and grad_u log N (K, R, n, d), or only
        its last block (K, R, 1, d) with ``last_only`` (what a sampler needs).

        With a few distinct times (a sampler's batch shares one) every M_i^-1 is computed
        directly. With many (adaptive ODE solvers), M_i = Q + lam_i P is a rank-one update of Q,
        and one Q^-1 per time replaces K d inverses (Sherman-Morrison); that update cancels
        digits where Q is ill-conditioned (t -> 0), so those times stay on the direct path.
        """
        p, Q, index = self._time_terms(times)
        rank_one = (len(p) > self.max_direct_times) & (np.linalg.cond(Q) < 1e6)
        K, n_out = len(self._V), 1 if last_only else self.sde.order
        logs = np.empty((K, len(u)))
        grads = np.empty((K, len(u), n_out, self.mixture.dim))
        for use, solver in ((rank_one, self._rank_one_solver), (~rank_one, self._direct_solver)):
            rows = use[index]
            if rows.any():
                used, local = np.unique(index[rows], return_inverse=True)
                local = local.reshape(-1)
                logs[:, rows], grads[:, rows] = self._component_terms(
                    u[rows], p[used][local], solver(p[used], Q[used], local), last_only)
        return logs, grads

    #: Up to this many distinct times in a call, every n x n system is inverted directly.
    max_direct_times = 16

    def _component_terms(self, u, p_rows, solve, last_only):
        n, d, mix = self.sde.order, self.mixture.dim, self.mixture
        blocks = u.reshape(len(u), n, d)
        logs, grads = [], []
        for k, V in enumerate(self._V):
            w = _rotate(blocks - p_rows[:, :, None] * mix.means[k][None, None, :], V)  # (R, n, d)
            sol, logdet = solve(k, w)  # sol[:, :, i] = M_i^-1 w[:, :, i]; sum_i log det M_i
            maha = (w * sol).sum((1, 2))
            logs.append(np.log(mix.weights[k]) - 0.5 * (maha + logdet + n * d * np.log(2 * np.pi)))
            grads.append(_rotate(-sol[:, -1:] if last_only else -sol, V.T))
        return np.array(logs), np.array(grads)

    def _direct_solver(self, p, Q, index):
        P = p[:, :, None] * p[:, None, :]
        M = self._lam[None, :, :, None, None] * P[:, None, None] + Q[:, None, None]  # (U, K, d, n, n)
        Minv = np.linalg.inv(M)
        logdet = np.linalg.slogdet(M)[1].sum(-1)  # (U, K)
        shared = len(p) == 1  # one time for the whole batch: no gathers

        def solve(k, w):
            Mk = Minv[:, k]
            coef = (lambda a, b: Mk[0, :, a, b]) if shared else (lambda a, b: Mk[index, :, a, b])
            return _apply(coef, w), logdet[index, k]

        return solve

    def _rank_one_solver(self, p, Q, index):
        d = self.mixture.dim
        Qinv = np.linalg.inv(Q)
        q = np.einsum("unm,um->un", Qinv, p)
        kappa = np.einsum("un,un->u", p, q)[index][:, None]  # (R, 1)
        logdetQ = d * np.linalg.slogdet(Q)[1][index]
        Qinv, q = Qinv[index], q[index]

        def solve(k, w):
            lam = self._lam[k][None, :]
            Qw = _apply(lambda a, b: Qinv[:, a, b][:, None], w)
            qw = np.einsum("rn,rnd->rd", q, w)
            denom = 1.0 + lam * kappa  # (R, d)
            sol = Qw - q[:, :, None] * (lam * qw / denom)[:, None, :]
            return sol, logdetQ + np.log(denom).sum(1)

        return solve

    def _evaluate(self, u, t, last_only: bool = False):
        u = np.asarray(u, dtype=np.float64)
        times = np.broadcast_to(np.asarray(t, dtype=np.float64), (u.shape[0],))
        n, d = self.sde.order, self.mixture.dim
        if u.ndim != 2 or u.shape[1] != n * d:
            raise ValueError(f"u must be (B, {n * d}) (the {n} blocks side by side), got {u.shape}")
        logp = np.empty(len(u))
        score = np.empty((len(u), 1 if last_only else n, d))
        for lo in range(0, len(u), self.chunk):
            sl = slice(lo, lo + self.chunk)
            logs, grads = self._terms(u[sl], times[sl], last_only)
            top = logs.max(0)
            resp = np.exp(logs - top)
            total = resp.sum(0)
            logp[sl] = top + np.log(total)
            score[sl] = np.einsum("kr,krnd->rnd", resp / total, grads)
        return logp, score.reshape(len(u), -1)

    def log_prob(self, u, t) -> np.ndarray:
        """log p_t(u) of the extended state (B,), the auxiliary start included."""
        return self._evaluate(u, t, last_only=True)[0]

    def full_score(self, u, t) -> np.ndarray:
        """grad_u log p_t(u) for all blocks, (B, n d)."""
        return self._evaluate(u, t)[1]

    def __call__(self, u, t):
        out = self._evaluate(u, t, last_only=True)[1]
        dtype = np.asarray(u).dtype
        return out.astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def _apply(coef, w: np.ndarray) -> np.ndarray:
    """out[:, a] = sum_b coef(a, b) * w[:, b] for w (R, n, d): n^2 whole-array multiply-adds."""
    n = w.shape[1]
    out = np.zeros_like(w)
    for a in range(n):
        for b in range(n):
            out[:, a] += coef(a, b) * w[:, b]
    return out


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


# ----------------------------------------------------------------------------- sample quality


def median_distance(x: np.ndarray, max_points: int = 2000) -> float:
    """Median pairwise Euclidean distance of (up to max_points of) x: the usual bandwidth scale of
    ``metrics.gaussian_kernel`` (the MMD of samples is ``metrics.mmd2_unbiased``)."""
    x = np.asarray(x, dtype=np.float64)[:max_points]
    d = squared_distances(x, x)[np.triu_indices(len(x), 1)]
    return float(np.sqrt(np.median(d)))


def _gaussian_smoothing(means, covs, h: float, points):
    """E k_h(x, Y) for Y ~ N(means[k], covs[k]) and each row x of ``points``, with the Gaussian
    kernel k_h(x, y) = exp(-|x - y|^2 / (2 h^2)): the Gaussian integral
    det(I + C/h^2)^(-1/2) exp(-(x - m)^T (C + h^2 I)^(-1) (x - m) / 2). Returns (K, N)."""
    d = means.shape[1]
    chol = np.linalg.cholesky(covs + h * h * np.eye(d))  # (K, d, d)
    diff = points[None, :, :] - means[:, None, :]  # (K, N, d)
    sol = np.linalg.solve(chol, np.swapaxes(diff, 1, 2))  # (K, d, N): L^-1 (x - m)
    maha = (sol ** 2).sum(1)
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1) - 2.0 * d * np.log(h)
    return np.exp(-0.5 * (maha + log_det[:, None]))


def mmd2_to_mixture(x, mixture: GaussianMixture, bandwidths) -> float:
    """Unbiased MMD^2 between samples x (N, d) and the mixture ITSELF, with the multi-scale
    Gaussian kernel of ``metrics.gaussian_kernel``:

        1/(N(N-1)) sum_{i!=j} k(x_i, x_j) - 2/N sum_i E k(x_i, Y) + E k(Y, Y')

    the two expectations over the mixture in closed form (``_gaussian_smoothing``; for Y, Y'
    independent, Y - Y' given the components is Gaussian with covariance C_a + C_b). Its mean is the
    population MMD^2, like ``metrics.mmd2_unbiased`` against N fresh data samples, but without the
    reference set's share of the noise: exact samples give 0 +- O(1/N) with about half the spread."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != mixture.dim or len(x) < 2:
        raise ValueError(f"expected samples (N >= 2, {mixture.dim}), got shape {x.shape}")
    n, w = len(x), mixture.weights
    d2 = squared_distances(x, x)
    total = 0.0
    for h in bandwidths:
        kxx = np.exp(-d2 / (2.0 * h * h))
        within = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        cross = float(w @ _gaussian_smoothing(mixture.means, mixture.covs, h, x).mean(1))
        # E k(Y, Y') = sum_ab w_a w_b E k(0, Y_a - Y_b), Y_a - Y_b ~ N(m_a - m_b, C_a + C_b)
        yy = 0.0
        for a in range(len(w)):
            smooth = _gaussian_smoothing(mixture.means[a] - mixture.means, mixture.covs[a] + mixture.covs, h,
                                         np.zeros((1, mixture.dim)))[:, 0]  # (K,) over b
            yy += w[a] * float(w @ smooth)
        total += within - 2.0 * cross + yy
    return total / len(bandwidths)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of W2^2 between
    the projected samples (quantiles matched by sorting; x and y may differ in size)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    dirs = np.random.default_rng(seed).standard_normal((x.shape[1], projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
    levels = (np.arange(max(len(px), len(py))) + 0.5) / max(len(px), len(py))
    qx = px[np.minimum((levels * len(px)).astype(int), len(px) - 1)]
    qy = py[np.minimum((levels * len(py)).astype(int), len(py) - 1)]
    return float(np.sqrt(((qx - qy) ** 2).mean()))

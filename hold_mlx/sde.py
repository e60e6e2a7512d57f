"""The linear SDE family behind VP, CLD and HOLD, in float64 NumPy.

    du = beta(t) F u dt + sqrt(beta(t)) sigma e_n dW,   u = (u_1, ..., u_n)

u_1 is the data, u_2.. are auxiliary blocks (velocity, acceleration, ...); the noise enters the
last block only. F is n x n and acts identically on every data dimension, so every coefficient
here is a small n x n matrix; frameworks only apply them to arrays (see ``samplers.py``).
beta(t) = beta0 + beta1 t is a time change with integral B(t).

This module is the single source of truth for the math: it imports nothing but NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LinearSDE", "Perturbation", "ReverseDrift", "get_sde", "expm", "psd_sqrt", "SDE_NAMES"]

SDE_NAMES = ("vp", "cld", "hold")


# ----------------------------------------------------------------------------- small linear algebra


def expm(a: np.ndarray) -> np.ndarray:
    """Matrix exponential of ``a`` (..., n, n) in float64: scaling and squaring with Taylor.

    After scaling, ||a / 2^s||_1 <= 1/4 and 18 Taylor terms leave a truncation error below 1e-24,
    so the result is accurate to rounding. Works for defective matrices (critical damping).
    """
    a = np.asarray(a, dtype=np.float64)
    # Each matrix is scaled by its own norm, so a result never depends on the rest of the batch.
    norm = np.abs(a).sum(axis=-2).max(axis=-1) if a.size else np.zeros(a.shape[:-2])
    s = np.ceil(np.log2(np.maximum(norm, 0.25) / 0.25)).astype(int)
    x = a / (2.0**s)[..., None, None]
    eye = np.broadcast_to(np.eye(a.shape[-1]), a.shape)
    result, term = eye.copy(), eye.copy()
    for k in range(1, 19):
        term = term @ x / k
        result = result + term
    for j in range(int(s.max()) if s.size else 0):
        result = np.where((j < s)[..., None, None], result @ result, result)
    return result


def psd_sqrt(q: np.ndarray) -> np.ndarray:
    """A factor C with C C^T = q for a symmetric positive semi-definite q (..., n, n).

    Uses the eigendecomposition, so it is exact for singular q (a short reverse step injects
    noise of rank one) where a Cholesky factor would need jitter.
    """
    q = 0.5 * (q + np.swapaxes(q, -1, -2))
    w, v = np.linalg.eigh(q)
    return v * np.sqrt(np.clip(w, 0.0, None))[..., None, :]


def _as_times(t) -> tuple[np.ndarray, bool]:
    arr = np.asarray(t, dtype=np.float64)
    return arr.reshape(-1), arr.ndim == 0


# ----------------------------------------------------------------------------- the SDE object


@dataclass(frozen=True)
class Perturbation:
    """The hybrid-start perturbation law p(u_t | x0) = N(A(t) x0, Sigma_t) at times t (leading axis k, one entry per time).

    mean_coeff: (k, n, n) expm(F B(t)); cov: (k, n, n) Sigma_t; chol: lower Cholesky factor of
    Sigma_t + numerical_eps I; ell: (k,) chol[n-1, n-1], the scale of the last block's noise, so
    the conditional score of the last block is -eps_n / ell.
    """

    t: np.ndarray
    mean_coeff: np.ndarray
    cov: np.ndarray
    chol: np.ndarray
    ell: np.ndarray


@dataclass(frozen=True)
class ReverseDrift:
    """Drift of the reverse-time SDE or of the probability-flow ODE, in reverse time, per unit of B.

        du = (linear u + score_coeff s) dB  [+ noise_scale e_n sqrt(dB) z for the SDE]

    with s the score of the last block. SDE: linear = -F, score_coeff = G G^T e_n = sigma^2 e_n,
    noise_scale = sigma. Probability-flow ODE: the score term is halved and there is no noise.
    """

    linear: np.ndarray  # (n, n)
    score_coeff: np.ndarray  # (n,), nonzero in the last entry only
    noise_scale: float
    probability_flow: bool

    @property
    def score_scale(self) -> float:
        """The factor of s in the last block (the only block the score enters)."""
        return float(self.score_coeff[-1])

    def matrix(self, score_row) -> np.ndarray:
        """The whole drift as one n x n matrix when the score is linear, s = score_row . u
        (a Gaussian law, or the stationary part -(Sigma_inf^-1 u)_n split off the score)."""
        return self.linear + np.outer(self.score_coeff, np.asarray(score_row, dtype=np.float64))


class LinearSDE:
    """du = beta(t) F u dt + sqrt(beta(t)) sigma e_n dW with beta(t) = beta0 + beta1 t.

    Args:
        F: (n, n) drift matrix before the time change; must be stable (eigenvalues in the open
            left half-plane), so the process forgets the data.
        sigma: noise scale on the last block.
        aux_var: initial variance of each auxiliary block (n - 1 values) in the hybrid start used
            for training; the data block starts with variance 0.
        T: end time of the forward process.
        beta0, beta1: the time change beta(t) = beta0 + beta1 t (must stay positive on [0, T]).
        eps_sample: the time where reverse-time sampling stops before the final denoising step.
        eps_loss: smallest training time.
        numerical_eps: added to the diagonal of Sigma_t before its Cholesky factorisation.
        mixed_data_var: data variance assumed by the analytic Gaussian part of the mixed score
            (see ``mixed_score_var``); None picks 0 for n >= 2 (CLD-SGM) and 1 for n = 1.
        name, params: the preset and its resolved parameters, to rebuild it from a checkpoint.
    """

    def __init__(
        self,
        F,
        sigma: float,
        *,
        aux_var=(),
        T: float = 1.0,
        beta0: float = 1.0,
        beta1: float = 0.0,
        eps_sample: float = 1e-3,
        eps_loss: float = 1e-5,
        numerical_eps: float = 1e-9,
        mixed_data_var: float | None = None,
        name: str = "linear",
        params: dict | None = None,
    ):
        F = np.array(F, dtype=np.float64)
        if F.ndim != 2 or F.shape[0] != F.shape[1] or F.shape[0] < 1:
            raise ValueError(f"F must be a square n x n matrix with n >= 1, got shape {F.shape}")
        if not np.all(np.isfinite(F)):
            raise ValueError("F has NaN or infinite entries")
        n = F.shape[0]
        eig = np.linalg.eigvals(F)
        if np.max(eig.real) >= -1e-12:
            raise ValueError(
                f"F is not stable: it has an eigenvalue with real part {np.max(eig.real):.3g} >= 0, "
                "so the forward process would never forget the data; check the couplings/friction"
            )
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma}")
        aux_var = np.broadcast_to(np.asarray(aux_var, dtype=np.float64), (n - 1,)).copy()
        if np.any(aux_var < 0) or not np.all(np.isfinite(aux_var)):
            raise ValueError(f"aux_var (initial auxiliary variances) must be >= 0, got {aux_var}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        if not (beta0 > 0 and beta0 + beta1 * T > 0):
            raise ValueError(f"beta(t) = {beta0} + {beta1} t must stay positive on [0, T={T}]")
        for label, value in (("eps_sample", eps_sample), ("eps_loss", eps_loss)):
            if not 0 < value < T:
                raise ValueError(f"{label} must lie in (0, T={T}), got {value}")
        if numerical_eps < 0:
            raise ValueError(f"numerical_eps must be >= 0, got {numerical_eps}")

        self.F = F
        self.order = n
        self.sigma = float(sigma)
        self.aux_var = aux_var
        self.T = float(T)
        self.beta0, self.beta1 = float(beta0), float(beta1)
        self.eps_sample, self.eps_loss = float(eps_sample), float(eps_loss)
        self.numerical_eps = float(numerical_eps)
        self.mixed_data_var = float(mixed_data_var if mixed_data_var is not None else (1.0 if n == 1 else 0.0))
        self.name = name
        self.params = dict(params or {})

        self.G = np.zeros(n)
        self.G[-1] = self.sigma
        self.initial_cov = np.diag(np.concatenate([[0.0], aux_var]))
        self._stationary = self._solve_lyapunov()
        self._stationary_inv = np.linalg.inv(self._stationary)
        # Reverse-time drift of the linear part of the splitting: F~ = S F^T S^-1 (docs/math.md §4).
        self.F_reverse = self._stationary @ F.T @ self._stationary_inv
        self.prior_factor = np.linalg.cholesky(self._stationary)

    # -- description ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"LinearSDE(name={self.name!r}, order={self.order}{', ' + extra if extra else ''})"

    def to_config(self) -> dict:
        """A JSON-able description that ``get_sde(**config)`` turns back into this SDE."""
        if self.name not in SDE_NAMES:
            raise ValueError("only presets (vp, cld, hold) can be stored in a checkpoint")
        return {"name": self.name, **self.params}

    # -- time change ------------------------------------------------------------------------------

    def beta(self, t):
        return self.beta0 + self.beta1 * np.asarray(t, dtype=np.float64)

    def B(self, t):
        """Integrated time change: B(t) = int_0^t beta."""
        t = np.asarray(t, dtype=np.float64)
        return self.beta0 * t + 0.5 * self.beta1 * t * t

    # -- moments of the forward process -----------------------------------------------------------

    def _solve_lyapunov(self) -> np.ndarray:
        # F S + S F^T + G G^T = 0, as one (n^2 x n^2) linear system; n is tiny.
        n = self.order
        eye = np.eye(n)
        lhs = np.kron(eye, self.F) + np.kron(self.F, eye)
        rhs = -np.outer(self.G, self.G).reshape(-1)
        s = np.linalg.solve(lhs, rhs).reshape(n, n)
        return 0.5 * (s + s.T)

    def stationary_cov(self) -> np.ndarray:
        """Sigma_inf, the covariance of the stationary law (per data dimension)."""
        return self._stationary.copy()

    def stationary_precision_last_row(self) -> np.ndarray:
        """Row n of Sigma_inf^-1: the linear part (Sigma_inf^-1 u)_n split off the score."""
        return self._stationary_inv[-1].copy()

    def mean_coeff(self, t) -> np.ndarray:
        """expm(F B(t)): (n, n) for a scalar t, (k, n, n) for k times."""
        times, scalar = _as_times(t)
        a = expm(self.F[None] * self.B(times)[:, None, None])
        return a[0] if scalar else a

    def cov(self, t, initial_cov: np.ndarray | None = None) -> np.ndarray:
        """Sigma_t = S + A (Sigma_0 - S) A^T for the start covariance Sigma_0 (hybrid by default)."""
        times, scalar = _as_times(t)
        s0 = self.initial_cov if initial_cov is None else np.asarray(initial_cov, dtype=np.float64)
        a = self.mean_coeff(times)
        c = self._stationary + a @ (s0 - self._stationary) @ np.swapaxes(a, -1, -2)
        c = 0.5 * (c + np.swapaxes(c, -1, -2))
        return c[0] if scalar else c

    def perturbation(self, t) -> Perturbation:
        """Everything training needs at times t (array of k times)."""
        times, _ = _as_times(t)
        a = self.mean_coeff(times)
        c = self.cov(times)
        jitter = self.numerical_eps * np.eye(self.order)
        try:
            chol = np.linalg.cholesky(c + jitter)
        except np.linalg.LinAlgError as err:
            raise FloatingPointError(
                "the perturbation kernel covariance is not positive definite at some t; "
                "increase numerical_eps or eps_loss"
            ) from err
        return Perturbation(times, a, c, chol, chol[:, -1, -1].copy())

    def mixed_score_var(self, t) -> np.ndarray:
        """Var of the last block when the data is Gaussian with variance ``mixed_data_var``.

        The mixed score is s = -u_n / this - alpha / ell (docs/math.md §3). For n >= 2 CLD-SGM uses
        the hybrid-start covariance (data variance 0, auxiliaries aux_var); for VP (n = 1) that
        would be singular at t -> 0 and CLD-SGM uses data variance 1 instead.
        """
        times, scalar = _as_times(t)
        s0 = self.initial_cov.copy()
        s0[0, 0] = self.mixed_data_var
        v = self.cov(times, s0)[:, -1, -1] + self.numerical_eps
        return v[0] if scalar else v

    # -- reverse-time pieces used by the samplers -------------------------------------------------

    def reverse_linear_step(self, t_from: float, t_to: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact flow of the linear part of the reverse SDE from t_from down to t_to.

        du = beta F~ u dtau + sqrt(beta) G dW has stationary law N(0, Sigma_inf), so over the step
        u <- E u + C z with E = expm(F~ (B(t_from) - B(t_to))) and C C^T = S - E S E^T.
        """
        dB = float(self.B(t_from) - self.B(t_to))
        E = expm(self.F_reverse * dB)
        S = self._stationary
        return E, psd_sqrt(S - E @ S @ E.T)

    def reverse(self, probability_flow: bool = False) -> ReverseDrift:
        """The reverse-time drift (``probability_flow=False``) or the probability-flow ODE's."""
        factor = 0.5 if probability_flow else 1.0
        score_coeff = np.zeros(self.order)
        score_coeff[-1] = self.sigma**2 * factor
        return ReverseDrift(-self.F, score_coeff, 0.0 if probability_flow else self.sigma, bool(probability_flow))

    def stationary_precision(self) -> np.ndarray:
        """Sigma_inf^-1 (n, n), computed once per SDE."""
        return self._stationary_inv.copy()

    def ode_exp_coefficients(self, t_from: float, t_to: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exponential-integrator coefficients of the probability-flow ODE from t_from down to t_to.

        With the score split as s = -(Sigma_inf^-1 u)_n + b (b the remainder), the ODE in reverse
        time is du = (L u + N) dB with L = -F - G G^T Sigma_inf^-1 / 2 (for the HOLD form a pure
        rotation, which Heun integrates unstably at large steps) and N = sigma^2 b e_n / 2. Returns
        E = expm(L h) and the last columns of h phi_1(L h) and h phi_2(L h) times sigma^2 / 2
        (h = B(t_from) - B(t_to)), read off one expm of the augmented matrix
        [[L h, h, 0], [0, 0, 1], [0, 0, 0]] (blocks n x n). One step u <- E u + c1 b_0 + c2 (b_1 - b_0)
        is exact when the remainder is linear in B across the step.
        """
        n = self.order
        h = float(self.B(t_from) - self.B(t_to))
        flow = self.reverse(probability_flow=True)
        big = np.zeros((3 * n, 3 * n))
        big[:n, :n] = flow.matrix(-self._stationary_inv[-1]) * h
        big[:n, n:2 * n] = np.eye(n) * h
        big[n:2 * n, 2 * n:] = np.eye(n)
        X = expm(big)
        half = flow.score_scale
        return X[:n, :n], half * X[:n, 2 * n - 1], half * X[:n, 3 * n - 1]

    def prior_log_density(self, u) -> np.ndarray:
        """log N(u; 0, Sigma_inf per data dimension) of extended states u (B, ..., n*C), the n blocks
        side by side on the last axis (the samplers' layout); float64 (B,)."""
        n = self.order
        u = np.asarray(u, dtype=np.float64)
        if u.ndim < 2 or u.shape[-1] % n:
            raise ValueError(f"expected extended states (batch, ..., {n} * channels), got shape {u.shape}")
        blocks = u.reshape(len(u), -1, n, u.shape[-1] // n)  # (B, P, n, C): block i = u[..., iC:(i+1)C]
        quad = np.einsum("bpic,ij,bpjc->b", blocks, self._stationary_inv, blocks)
        d = blocks.shape[1] * blocks.shape[3]
        _, logdet = np.linalg.slogdet(self._stationary)
        return -0.5 * quad - 0.5 * d * (n * math.log(2 * math.pi) + logdet)

    def linear_divergence(self) -> float:
        """tr(F): divergence of the forward drift's linear part F u per data dimension and unit of B.

        Along the probability-flow ODE from t0 to t1 it changes the log-density of d-dimensional
        data by d tr(F) (B(t1) - B(t0)); the score part is what a trace estimator must supply.
        """
        return float(np.trace(self.F))

    def forward_transition(self, t) -> tuple[np.ndarray, np.ndarray]:
        """(A, W) of the forward transition from time 0: u_t = A u_0 + N(0, W), A = expm(F B(t)) and
        W the covariance the noise has added by t; (n, n) each for a scalar t, (k, n, n) for k times.

        W = S - A S A^T loses every digit of the data block's tiny variance as t -> 0, so early
        times use Van Loan's expm([[-F, G G^T], [0, F^T]] B) = [[., A^-1 W], [0, A^T]] instead
        (whose A^-1 grows without bound at late times, where the stationary form is accurate).
        """
        times, scalar = _as_times(t)
        n = self.order
        dB = self.B(times)[:, None, None]
        block = np.zeros((len(times), 2 * n, 2 * n))
        block[:, :n, :n] = -self.F * dB
        block[:, :n, n:] = np.outer(self.G, self.G) * dB
        block[:, n:, n:] = self.F.T * dB
        E = expm(block)
        A = np.swapaxes(E[:, n:, n:], -1, -2)
        S = self._stationary
        early = (np.abs(self.F).sum(0).max() * dB[:, 0, 0] < 1.0)[:, None, None]
        W = np.where(early, A @ E[:, :n, n:], S - A @ S @ np.swapaxes(A, -1, -2))
        return (A[0], W[0]) if scalar else (A, W)

    def prior_sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draw u_T ~ N(0, Sigma_inf) per data dimension; shape is the data shape (blocks appended)."""
        z = rng.standard_normal(shape + (self.order,))
        return z @ self.prior_factor.T


# ----------------------------------------------------------------------------- presets


def critical_hold_couplings(order: int) -> tuple[list[float], float]:
    """Couplings gamma_1..gamma_{n-1} and friction xi of the critically damped HOLD form.

    HOLD++ (Sterling & Bugallo): lambda* = -sqrt(2n - 3), xi = n sqrt(2n - 3),
    gamma_k = sqrt(2n - 3) sqrt((n^2 - (n - k)^2) / (4 (n - k)^2 - 1)); then (F - lambda* I)^n = 0.
    """
    if order < 2:
        raise ValueError("critical damping needs order >= 2; give xi for an order-1 HOLD SDE")
    n = order
    r = math.sqrt(2 * n - 3)
    gammas = [r * math.sqrt((n * n - (n - k) ** 2) / (4 * (n - k) ** 2 - 1)) for k in range(1, n)]
    return gammas, n * r


def hold_drift(couplings, xi: float) -> np.ndarray:
    """F = sum_i gamma_i (E_{i,i+1} - E_{i+1,i}) - xi E_{n,n}."""
    n = len(couplings) + 1
    F = np.zeros((n, n))
    for i, g in enumerate(couplings):
        F[i, i + 1] = g
        F[i + 1, i] = -g
    F[-1, -1] = -xi
    return F


def _vp(beta_min=0.1, beta_max=20.0, T=1.0, **common):
    if beta_max < 0 or beta_min <= 0:
        raise ValueError(f"vp needs beta_min > 0 and beta_max >= 0, got {beta_min}, {beta_max}")
    params = dict(beta_min=beta_min, beta_max=beta_max, T=T)
    return LinearSDE(
        [[-0.5]], 1.0, T=T, beta0=beta_min, beta1=(beta_max - beta_min) / T,
        name="vp", params={**params, **common}, **common,
    )


def _cld(beta=4.0, m_inv=4.0, friction=None, gamma_v=0.04, T=1.0, **common):
    if m_inv <= 0:
        raise ValueError(f"cld needs m_inv (inverse mass) > 0, got {m_inv}")
    if gamma_v < 0:
        raise ValueError(f"cld needs gamma_v (initial velocity variance factor) >= 0, got {gamma_v}")
    if friction is None:
        friction = 2.0 / math.sqrt(m_inv)  # critical damping: Gamma^2 = 4 M
    if friction <= 0:
        raise ValueError(f"cld needs friction > 0, got {friction}")
    F = [[0.0, m_inv], [-1.0, -friction * m_inv]]
    params = dict(beta=beta, m_inv=m_inv, friction=friction, gamma_v=gamma_v, T=T)
    return LinearSDE(
        F, math.sqrt(2.0 * friction), aux_var=[gamma_v / m_inv], T=T, beta0=beta, beta1=0.0,
        name="cld", params={**params, **common}, **common,
    )


def _hold(order=3, couplings=None, xi=None, L_inv=0.5, aux_scale=0.08, T=5.0, beta=1.0, alpha=None, **common):
    # ``alpha`` is aux_scale's name in the HOLD paper and in checkpoints written before the rename
    # ("alpha" also named the network output); it is read, never written.
    if alpha is not None:
        if aux_scale != 0.08 and aux_scale != alpha:
            raise ValueError("hold: give aux_scale or its old name alpha, not both")
        aux_scale = alpha
    if int(order) != order or order < 1:
        raise ValueError(f"hold needs an integer order >= 1, got {order}")
    order = int(order)
    if couplings is None and xi is None and order >= 2:
        couplings, xi = critical_hold_couplings(order)
    elif couplings is None and order >= 2:
        couplings = critical_hold_couplings(order)[0]
    elif xi is None:
        xi = critical_hold_couplings(order)[1] if order >= 2 else 1.0
    couplings = [float(c) for c in (couplings or [])]
    if len(couplings) != order - 1:
        raise ValueError(f"hold of order {order} needs {order - 1} couplings, got {len(couplings)}")
    if any(c <= 0 for c in couplings) or xi <= 0:
        raise ValueError(f"hold couplings and xi must be positive, got {couplings}, xi={xi}")
    if L_inv <= 0:
        raise ValueError(f"hold needs L_inv (stationary variance) > 0, got {L_inv}")
    if aux_scale < 0:
        raise ValueError(f"hold needs aux_scale (the auxiliary start variance factor; alpha in older "
                         f"checkpoints) >= 0, got {aux_scale}")
    params = dict(order=order, couplings=couplings, xi=float(xi), L_inv=L_inv, aux_scale=aux_scale, T=T, beta=beta)
    return LinearSDE(
        hold_drift(couplings, xi), math.sqrt(2.0 * xi * L_inv), aux_var=[aux_scale * L_inv] * (order - 1),
        T=T, beta0=beta, beta1=0.0, name="hold", params={**params, **common}, **common,
    )


_PRESETS = {"vp": _vp, "cld": _cld, "hold": _hold}
_COMMON = ("eps_sample", "eps_loss", "numerical_eps", "mixed_data_var")


def get_sde(name: str, **overrides) -> LinearSDE:
    """Build a preset SDE: "vp" (order 1), "cld" (order 2) or "hold" (order n, default 3).

    Overrides: vp(beta_min, beta_max, T); cld(beta, m_inv, friction, gamma_v, T);
    hold(order, couplings, xi, L_inv, aux_scale (old name: alpha), T, beta); and for all: eps_sample, eps_loss,
    numerical_eps, mixed_data_var.
    """
    key = str(name).lower()
    if key not in _PRESETS:
        raise ValueError(f"unknown SDE {name!r}; choose one of {', '.join(SDE_NAMES)}")
    import inspect

    allowed = set(inspect.signature(_PRESETS[key]).parameters) - {"common"} | set(_COMMON)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for SDE {key!r}; allowed: {sorted(allowed)}")
    return _PRESETS[key](**overrides)


# ----------------------------------------------------------------------------- gDDIM coefficients
#
# The probability-flow ODE and its stochastic relatives, per unit of B in forward time,
#     du = [F u - k sigma^2 e_n s_n] dB + eta G dW,   k = (1 + eta^2) / 2,
# keep the marginals p_t for every eta in [0, 1]. With the hybrid-start kernel N(mu_t x0, Sigma_t),
# mu_t = expm(F B(t)) e_1, the last block's score is s_n = -(Sigma_t^-1 u)_n + d_t x0_hat with
# d_t = (Sigma_t^-1 mu_t)_n and x0_hat = E[x0 | u_t] (Tweedie), so
#     du = [M_t u + g_t x0_hat] dB,   M_t = F + k sigma^2 e_n (Sigma_t^-1)_{n,:},  g_t = -k sigma^2 d_t e_n.
# x0_hat is the smooth quantity (constant along the flow for a one-point data law), so a step
# extrapolates it by a polynomial in t and integrates the linear part exactly.


def accurate_cov(sde: LinearSDE, t) -> np.ndarray:
    """Sigma_t (hybrid start) without the cancellation of S - A S A^T at small t.

    For B(t) |F| < 1 the added noise W_t comes from Van Loan's expm([[-F, G G^T], [0, F^T]] B),
    which keeps the data block's tiny variance to full relative precision.
    """
    times, scalar = _as_times(t)
    a, W = sde.forward_transition(times)
    at = np.swapaxes(a, -1, -2)
    c = a @ sde.initial_cov @ at + W
    c = 0.5 * (c + np.swapaxes(c, -1, -2))
    return c[0] if scalar else c


def data_prediction_terms(sde: LinearSDE, t):
    """(row, scale) with x0_hat = scale * (s_n + row . u) at times t: row = (Sigma_t^-1)_{n,:}
    (k, n) and scale = 1 / (Sigma_t^-1 mu_t)_n (k,)."""
    times, _ = _as_times(t)
    cov = accurate_cov(sde, times)
    mu = sde.mean_coeff(times)[:, :, 0]
    inv = np.linalg.inv(cov)
    row = inv[:, -1, :]
    return row, 1.0 / np.einsum("kn,kn->k", row, mu)


def log_noise_scale(sde: LinearSDE, t) -> np.ndarray:
    """lambda(t) = log sigma_eff(t), sigma_eff^2 = 1 / (mu_t^T Sigma_t^-1 mu_t): the posterior
    variance of x0 from u_t under a flat prior. Strictly increasing in t (u_t -> u_t' is Markov,
    so u_t' knows less about x0); for VP it is EDM's sigma = sqrt(1 - a^2) / a."""
    times, scalar = _as_times(t)
    cov = accurate_cov(sde, times)
    mu = sde.mean_coeff(times)[:, :, 0]
    info = np.einsum("kn,kn->k", mu, np.linalg.solve(cov, mu[..., None])[..., 0])
    lam = -0.5 * np.log(info)
    return lam[0] if scalar else lam


@dataclass(frozen=True)
class GDDIMStep:
    """One step t_from -> t_to: u <- transition u + sum_j weights[j] x0_hat_j + noise_factor z.

    weights[j] (n,) multiplies the data prediction at the j-th most recent grid time (j = 0 is
    t_from); noise_factor is None for eta = 0.
    """

    transition: np.ndarray
    weights: np.ndarray
    noise_factor: np.ndarray | None
    corrector: np.ndarray | None = None  # (q + 1, n): weights on x0_hat at t_to, t_from, ...


def _lagrange_basis(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """l_j(x) for the Lagrange basis on ``nodes`` (q,), at points x (m,): (q, m)."""
    out = np.ones((len(nodes), len(x)))
    for j, xj in enumerate(nodes):
        for i, xi in enumerate(nodes):
            if i != j:
                out[j] *= (x - xi) / (xj - xi)
    return out


def _cholesky_frame_generator(sde: LinearSDE, t: np.ndarray, k_coef: float):
    """Sigma_t = L L^T (Cholesky) and the generator A of w = L^-1 u: dw/dB = A w + L^-1 g x0_hat.

    A = L^-1 M L - L^-1 L', with L' = L Phi(L^-1 Sigma' L^-T) (Phi: lower triangle, half diagonal)
    and Sigma' = F Sigma + Sigma F^T + G G^T. For the ODE A is skew (a rotation: Psi Sigma Psi^T =
    Sigma' exactly); its entries grow only about like 1/t (ratios of Cholesky diagonals), so a grid
    geometric in t resolves it, where M itself grows like a higher power of 1/t and is stiff.
    """
    n = sde.order
    cov = accurate_cov(sde, t)
    L = np.linalg.cholesky(cov)
    Linv = np.linalg.inv(L)
    GG = np.outer(sde.G, sde.G)
    dcov = sde.F @ cov + cov @ sde.F.T + GG
    X = Linv @ dcov @ np.swapaxes(Linv, -1, -2)
    phi = np.tril(X, -1) + 0.5 * np.eye(n) * np.diagonal(X, axis1=-2, axis2=-1)[..., None, :]
    M = sde.F + k_coef * GG @ np.linalg.inv(cov)
    A = Linv @ M @ L - phi
    return L, Linv, A


def _lagrange_slope(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """d l_j / dx on ``nodes`` (q,), at points x (m,): (q, m)."""
    q = len(nodes)
    out = np.zeros((q, len(x)))
    for j in range(q):
        for m in range(q):
            if m == j:
                continue
            term = np.full(len(x), 1.0 / (nodes[j] - nodes[m]))
            for i in range(q):
                if i not in (j, m):
                    term = term * (x - nodes[i]) / (nodes[j] - nodes[i])
            out[j] += term
    return out


def gddim_steps(sde: LinearSDE, ts, order: int = 2, eta: float = 0.0, substeps: int = 64,
                variable: str = "t", corrector: bool = False) -> list[GDDIMStep]:
    """Float64 coefficients of the gDDIM multistep exponential integrator on the decreasing grid ts.

    Step k uses q = min(order, k + 1) data predictions (at t_k, t_{k-1}, ...), extrapolated by the
    Lagrange polynomial in ``variable`` ("t", "B" or "lambda" = log sigma_eff; t measured best on
    the exact-score benchmark, see docs/samplers.md). The transition Psi of the linear part is
    integrated in the Cholesky frame of Sigma_t (see ``_cholesky_frame_generator``) over
    ``substeps`` sub-intervals per step, geometric in t, by one matrix exponential each with A at
    its midpoint (second order); the weights int Psi(t_to, tau) g_tau l_j(tau) dB come by parts
    (below) with the trapezoidal rule. The noise covariance uses that every member of the family
    keeps the marginals: for a one-point data law at 0 the law N(0, Sigma_t) must map to
    N(0, Sigma_t'), so Q = Sigma_t' - Psi Sigma_t Psi^T = L' (I - R R^T) L'^T, R the frame's transition.
    ``corrector=True`` adds each step's corrector weights: the same integral on the nodes t_to,
    t_k, t_{k-1}, ... (docs/math.md 4.11, item 8).
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"gddim order must be 1, 2 or 3, got {order!r}")
    if not (np.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"gddim eta must lie in [0, 1] (0: ODE, 1: reverse SDE), got {eta!r}")
    if variable not in ("lambda", "B", "t"):
        raise ValueError(f"unknown extrapolation variable {variable!r}; choose lambda, B or t")
    ts = np.asarray(ts, dtype=np.float64)
    n = sde.order
    k_coef = 0.5 * (1.0 + eta * eta)
    coord = {"lambda": lambda t: log_noise_scale(sde, t), "B": sde.B,
             "t": lambda t: np.asarray(t, dtype=np.float64)}[variable]
    nodes_all = coord(ts)
    L_grid = np.linalg.cholesky(accurate_cov(sde, ts))
    steps = []
    for k in range(len(ts) - 1):
        t0, t1 = ts[k], ts[k + 1]
        q = min(order, k + 1)
        nodes = nodes_all[k - q + 1:k + 1][::-1]  # t_k, t_{k-1}, ...
        edges = np.geomspace(t0, t1, substeps + 1)
        mids = np.sqrt(edges[:-1] * edges[1:])
        h = sde.B(edges[:-1]) - sde.B(edges[1:])  # > 0: a reverse-time step in B
        A = _cholesky_frame_generator(sde, mids, k_coef)[2]
        # Reverse time (ds = -dB): dw/ds = -A w, one expm per sub-interval; R_to[i] = R(t_to, edge_i).
        R_sub = expm(-A * h[:, None, None])
        R_to = np.empty((substeps + 1, n, n))
        R_to[-1] = np.eye(n)
        for i in range(substeps - 1, -1, -1):
            R_to[i] = R_to[i + 1] @ R_sub[i]
        R = R_to[0]
        L0, L1 = L_grid[k], L_grid[k + 1]
        psi = L1 @ R @ np.linalg.inv(L0)
        mu0, mu1 = sde.mean_coeff(t0)[:, 0], sde.mean_coeff(t1)[:, 0]
        v_edges = coord(edges)
        carried = None
        if q > 1 or corrector:
            _, Linv_e, _ = _cholesky_frame_generator(sde, edges, k_coef)
            frame_mean = np.einsum("kij,kj->ki", Linv_e, sde.mean_coeff(edges)[:, :, 0])
            carried = np.einsum("kij,kj->ki", R_to, frame_mean) @ L1.T  # Psi(t1, edge) mu_edge

        def weights_on(nodes):
            # By parts: g = mu' - M mu (the mean solves the ODE with x0_hat = 1), so
            # int Psi(t1, tau) g l_j dB = mu_1 l_j(t1) - Psi mu_0 l_j(t0) - int Psi(t1, tau) mu_tau dl_j;
            # Psi(t1, tau) mu_tau stays bounded where g grows like 1/t^n; for one node this is exact.
            ends = _lagrange_basis(nodes, np.array([coord(t0), coord(t1)]).reshape(-1))
            w = mu1[None] * ends[:, 1:2] - (psi @ mu0)[None] * ends[:, 0:1]
            if len(nodes) > 1:
                slope = _lagrange_slope(nodes, v_edges)  # (q, substeps + 1)
                dv = np.diff(v_edges)
                for j in range(len(nodes)):
                    f = carried * slope[j][:, None]
                    w[j] -= (0.5 * (f[:-1] + f[1:]) * dv[:, None]).sum(0)
            return w

        weights = weights_on(nodes)
        # The corrector interpolates through t_to as well (the call made there by the next step),
        # one node more than the predictor: UniPC's corrector (Zhao et al. 2023) in this frame.
        correction = weights_on(np.concatenate([coord(np.array([t1])).reshape(-1), nodes])) if corrector else None
        noise = L1 @ psd_sqrt(np.eye(n) - R @ R.T) if eta > 0 else None
        steps.append(GDDIMStep(psi, weights, noise, correction))
    return steps

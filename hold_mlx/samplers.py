"""Every sampler, written once over a score callable.

A sampler is a plain function ``sampler(ctx, u, ts, **options) -> u``: ``u`` is the extended state
at ts[0] = T (the n blocks side by side on the last axis), ``ts`` the decreasing time grid, and
``ctx`` a :class:`Context` holding the SDE, the score callable, the array adapter and the noise.
Coefficients are float64 NumPy n x n matrices from ``sde.py``; a step is a few multiply-adds of
whole blocks with Python floats, which NumPy, MLX and torch arrays all support, so the same code
runs on every backend (docs/math.md §4 has the update rules).

NFE convention: one batched ``score_fn`` call is one NFE, the final denoising call included
(``denoise_final=False`` drops it). With ``steps = N``:

    lie-trotter, strang, euler-maruyama, exp-euler   N + 1
    ode (heun, exp-heun)                             2 N + 1
    ode (rk45)                                       1 + 6 per attempted step + 1 (ignores N)
    poisson-midpoint                                 N + (steps that drew a midpoint j >= 1) + 1,
                                                     between N + 1 and 2 N + 1; the midpoints of
                                                     a step go in ONE call on a k-fold batch
    ams                                              (1 + corrector_steps) N + 1
    gddim                                            N + 1 (its final call returns x0_hat)

``SampleResult.nfe`` reports the count; ``SampleResult.evals`` counts network evaluations per
sample (a call on a k-fold batch counts k).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backends import Backend
from .sde import LinearSDE, data_prediction_terms, gddim_steps, log_noise_scale

__all__ = [
    "Context", "SampleResult", "run_sampler", "time_grid", "resolve_sampler", "SAMPLERS",
    "ALIASES", "GRIDS", "solve_rk45",
]

GRIDS = ("uniform", "quadratic", "log-sigma", "edm")
#: The grids set by the SDE's noise level rather than by a power of the time fraction.
NOISE_LEVEL_GRIDS = ("log-sigma", "edm")

#: EDM's rho for the "edm" grid (Karras et al. 2022).
EDM_RHO = 7.0


# ----------------------------------------------------------------------------- shared helpers


def time_grid(sde: LinearSDE, steps: int, kind: str = "uniform") -> np.ndarray:
    """steps + 1 decreasing times from T to eps_sample.

    "quadratic" is CLD's quadratic striding: dense near the data, tau_k = 1 - (1 - k/N)^2;
    "power-R" the same with the power R in [1, 10] (uniform is power-1, quadratic power-2).
    "log-sigma": uniform in lambda = log sigma_eff(t) (``sde.log_noise_scale``, the SDE's own
    noise level; for VP log of EDM's sigma); "edm": EDM's rho-schedule (rho = 7) in sigma_eff.
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    frac = np.arange(steps + 1, dtype=np.float64) / steps
    if kind in NOISE_LEVEL_GRIDS:
        return _noise_level_grid(sde, frac, kind)
    tau = 1.0 - (1.0 - frac) ** grid_power(kind)
    ts = sde.T - (sde.T - sde.eps_sample) * tau
    ts[-1] = sde.eps_sample  # exactly, not up to rounding
    return ts


def grid_power(kind: str) -> float:
    """The power R of a time-power grid: uniform 1, quadratic 2, "power-R" R (1 <= R <= 10);
    a ValueError naming the choices for anything else."""
    named = {"uniform": 1.0, "quadratic": 2.0}
    if kind in named:
        return named[kind]
    try:
        rho = float(kind[len("power-"):]) if isinstance(kind, str) and kind.startswith("power-") else math.nan
    except ValueError:
        rho = math.nan
    if not 1.0 <= rho <= 10.0:  # False for NaN too
        raise ValueError(f"unknown time grid {kind!r}; choose one of {', '.join(GRIDS)} or power-R with R in "
                         "[1, 10] (e.g. power-2.5)")
    return rho


def check_grid(kind: str) -> str:
    """``kind`` if it names a time grid, else the ValueError of ``grid_power``."""
    if kind not in NOISE_LEVEL_GRIDS:
        grid_power(kind)
    return kind


def _noise_level_grid(sde: LinearSDE, frac: np.ndarray, kind: str) -> np.ndarray:
    """Times whose lambda = log sigma_eff is uniform ("log-sigma") or follows EDM's rho-schedule in
    sigma_eff ("edm"); t(lambda) is inverted on a dense table (lambda is strictly increasing)."""
    table_t = np.geomspace(sde.eps_sample, sde.T, 4001)
    table_lam = log_noise_scale(sde, table_t)
    lo, hi = table_lam[0], table_lam[-1]
    if kind == "log-sigma":
        lam = hi + (lo - hi) * frac
    else:
        inv_rho = 1.0 / EDM_RHO
        a, b = np.exp(hi * inv_rho), np.exp(lo * inv_rho)
        lam = EDM_RHO * np.log(a + (b - a) * frac)
    ts = np.exp(np.interp(lam, table_lam, np.log(table_t)))
    ts[0], ts[-1] = sde.T, sde.eps_sample
    return ts


def mix(M: np.ndarray, blocks: list) -> list:
    """Apply an n x n float64 matrix across blocks: out_i = sum_j M[i, j] blocks_j."""
    out = []
    for row in np.asarray(M):
        acc = None
        for coef, block in zip(row, blocks):
            if coef != 0.0:
                term = float(coef) * block
                acc = term if acc is None else acc + term
        out.append(acc if acc is not None else 0.0 * blocks[0])
    return out


@dataclass
class Context:
    """What every sampler needs: the SDE, the score, the array adapter and the noise.

    ``score_fn(u, t)`` takes the extended state and a backend array t of shape (B,) in forward
    time and returns the score of the last block, shaped like one block.
    """

    sde: LinearSDE
    score_fn: Callable
    ops: Backend
    noise: object
    batch: int
    callback: Callable | None = None
    nfe: int = 0  # batched score calls
    evals: float = 0.0  # network evaluations per sample (a call on a k-fold batch counts k)
    _cache: dict = field(default_factory=dict)

    # -- blocks ---------------------------------------------------------------------------------

    def split(self, u) -> list:
        n = self.sde.order
        width = u.shape[-1] // n
        return [u[..., i * width:(i + 1) * width] for i in range(n)]

    def join(self, blocks: list):
        return blocks[0] if len(blocks) == 1 else self.ops.concat(blocks)

    # -- the score and the drift remainder ------------------------------------------------------

    def score(self, u, t):
        """One batched network call at forward time(s) t (a float or (rows,) array)."""
        rows = u.shape[0]
        self.nfe += 1
        self.evals += rows / self.batch
        t_arr = np.broadcast_to(np.asarray(t, dtype=np.float64), (rows,))
        return self.score_fn(u, self.ops.asarray(t_arr))

    def remainder(self, u, t):
        """b(u, t) = s(u, t) + (Sigma_inf^-1 u)_n: the part of the score the exact linear flow
        does not already carry (docs/math.md §4 splitting)."""
        precision_row = self.sde.stationary_precision_last_row()
        linear = mix(precision_row[None], self.split(u))[0]
        return self.score(u, t) + linear

    # -- exact and Euler pieces -----------------------------------------------------------------

    def linear_flow(self, u, t_from: float, t_to: float):
        """Exact flow of the linear OU part from t_from down to t_to (fresh noise)."""
        key = ("linear", t_from, t_to)
        if key not in self._cache:
            self._cache[key] = self.sde.reverse_linear_step(t_from, t_to)
        E, C = self._cache[key]
        z = self.split(self.noise.normal(self.ops, tuple(u.shape[1:])))
        return self.join([a + b for a, b in zip(mix(E, self.split(u)), mix(C, z))])

    def kick(self, u, b, t_from: float, t_to: float):
        """Euler step of the score part: u_n += (B(t_from) - B(t_to)) sigma^2 b."""
        dB = float(self.sde.B(t_from) - self.sde.B(t_to))
        blocks = self.split(u)
        blocks[-1] = blocks[-1] + (dB * self.sde.sigma**2) * b
        return self.join(blocks)

    def reverse_drift(self, u, s, t: float, ode: bool):
        """Reverse-time drift per unit of B (``LinearSDE.reverse``): -F u + sigma^2 s e_n (x 1/2 for
        the ODE), as a list of blocks."""
        drift = self.sde.reverse(probability_flow=ode)
        blocks = mix(drift.linear, self.split(u))
        blocks[-1] = blocks[-1] + drift.score_scale * s
        return blocks

    def step_done(self, step: int, t: float, u) -> None:
        self.ops.eval(u)
        if self.callback is not None:
            self.callback(step, t, u)


def _pairs(ts):
    return zip(ts[:-1], ts[1:])


# ----------------------------------------------------------------------------- splitting samplers


def lie_trotter_step(ctx: Context, u, t0: float, t1: float):
    """One L step (exact OU flow t0 -> t1) then one S step (score at the reached time t1)."""
    u = ctx.linear_flow(u, t0, t1)
    return ctx.kick(u, ctx.remainder(u, t1), t0, t1)


def lie_trotter(ctx: Context, u, ts):
    """HOLD's Lie-Trotter splitting: exact linear part, Euler score part; 1 NFE per step."""
    for k, (t0, t1) in enumerate(_pairs(ts)):
        u = lie_trotter_step(ctx, u, t0, t1)
        ctx.step_done(k, t1, u)
    return u


def exponential_step(ctx: Context, u, b, t0: float, t1: float):
    """Exponential integrator with the remainder b frozen: u <- E (u + dB sigma^2 b e_n) + C z."""
    return ctx.linear_flow(ctx.kick(u, b, t0, t1), t0, t1)


def exp_euler(ctx: Context, u, ts):
    """S then L: the remainder at the step's start, then the exact flow; 1 NFE per step.

    The same chain as Lie-Trotter with the score kick moved to the start of each interval; it is
    the fine chain the Poisson midpoint method approximates.
    """
    for k, (t0, t1) in enumerate(_pairs(ts)):
        u = exponential_step(ctx, u, ctx.remainder(u, t0), t0, t1)
        ctx.step_done(k, t1, u)
    return u


def strang(ctx: Context, u, ts):
    """Strang splitting (CLD's SSCS): half L, S at the midpoint, half L; 1 NFE per step.

    Each half of the linear flow is integrated exactly over its own interval (CLD-SGM reuses the
    first half's beta integral for both, exact only for constant beta).
    """
    for k, (t0, t1) in enumerate(_pairs(ts)):
        tm = 0.5 * (t0 + t1)
        u = ctx.linear_flow(u, t0, tm)
        u = ctx.kick(u, ctx.remainder(u, tm), t0, t1)
        u = ctx.linear_flow(u, tm, t1)
        ctx.step_done(k, t1, u)
    return u


def euler_maruyama(ctx: Context, u, ts):
    """Euler-Maruyama on the reverse SDE (drift and noise over the beta integral); 1 NFE per step."""
    sigma = ctx.sde.sigma
    for k, (t0, t1) in enumerate(_pairs(ts)):
        dB = float(ctx.sde.B(t0) - ctx.sde.B(t1))
        drift = ctx.reverse_drift(u, ctx.score(u, t0), t0, ode=False)
        blocks = [b + dB * d for b, d in zip(ctx.split(u), drift)]
        z = ctx.noise.normal(ctx.ops, tuple(blocks[-1].shape[1:]))
        blocks[-1] = blocks[-1] + (math.sqrt(dB) * sigma) * z
        u = ctx.join(blocks)
        ctx.step_done(k, t1, u)
    return u


# ----------------------------------------------------------------------------- probability-flow ODE


def ode_velocity(ctx: Context, u, s, t):
    """dy/dt of the probability-flow ODE in forward time, beta(t) [F u - sigma^2 s e_n / 2], from
    the score s at (u, t): minus beta(t) times the reverse-time drift per unit of B."""
    beta = ctx.sde.beta(t)
    drift = ctx.reverse_drift(u, s, t, ode=True)
    scale = ctx.ops.per_sample(-beta, u.ndim) if np.ndim(beta) else -float(beta)
    return ctx.join([scale * d for d in drift])


def _ode_rhs(ctx: Context):
    """The probability-flow ODE as a right-hand side ys -> [dy/dt] for the ODE solvers."""

    def rhs(ys, t):
        (u,) = ys
        return [ode_velocity(ctx, u, ctx.score(u, t), t)]

    return rhs


def _exp_heun(ctx: Context, u, ts):
    """Exponential Heun (ETD2RK, Cox & Matthews 2002) on the probability-flow ODE: the linear part
    exactly, the remainder to second order; 2 NFE per step."""
    for k, (t0, t1) in enumerate(_pairs(ts)):
        key = ("ode-exp", t0, t1)
        if key not in ctx._cache:
            ctx._cache[key] = ctx.sde.ode_exp_coefficients(t0, t1)
        E, c1, c2 = ctx._cache[key]
        n0 = ctx.remainder(u, t0)
        a = mix(E, ctx.split(u))
        a = ctx.join([blk + float(c) * n0 for blk, c in zip(a, c1)])
        dn = ctx.remainder(a, t1) - n0
        u = ctx.join([blk + float(c) * dn for blk, c in zip(ctx.split(a), c2)])
        ctx.step_done(k, t1, u)
    return u


def ode(ctx: Context, u, ts, method: str = "heun", rtol: float = 1e-5, atol: float = 1e-5):
    """Probability-flow ODE. method="heun": fixed steps on ts, 2 NFE per step;
    "exp-heun": exponential Heun on ts (exact linear part), 2 NFE per step;
    "rk45": adaptive Dormand-Prince from ts[0] to ts[-1] with per-sample step sizes."""
    if method not in ("heun", "exp-heun", "rk45"):
        raise ValueError(f"unknown ODE method {method!r}; choose heun, exp-heun or rk45")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got {rtol} and {atol}")
    rhs = _ode_rhs(ctx)
    if method == "rk45":
        (u,), _ = solve_rk45(rhs, [u], float(ts[0]), float(ts[-1]), ctx.ops, rtol=rtol, atol=atol,
                             callback=lambda k, t, ys: ctx.step_done(k, t, ys[0]))
        return u
    if method == "exp-heun":
        return _exp_heun(ctx, u, ts)
    for k, (t0, t1) in enumerate(_pairs(ts)):
        h = t1 - t0
        (d0,) = rhs([u], t0)
        guess = u + h * d0
        (d1,) = rhs([guess], t1)
        u = u + (0.5 * h) * (d0 + d1)
        ctx.step_done(k, t1, u)
    return u


# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_ERR = (
    35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40,
)


def solve_rk45(f, ys: list, t0: float, t1: float, ops: Backend, *, rtol=1e-5, atol=1e-5,
               first_step: float | None = None, max_steps: int = 100_000, callback=None):
    """Adaptive Dormand-Prince integration of dy/dt = f(ys, t) from t0 to t1, per sample.

    ``ys`` is a list of backend arrays with the batch on axis 0; ``f(ys, t)`` gets t as a (B,)
    float64 array and returns the list of derivatives. Every sample has its own time and step
    size, accepted or rejected on its own error, so a sample's path does not depend on the rest
    of the batch. All samples share each batched call of f; finished samples take zero steps.
    Returns (ys at t1, number of f calls).
    """
    batch = ys[0].shape[0]
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    t = np.full(batch, float(t0))
    h = np.full(batch, direction * (first_step or 1e-2 * span))
    done = np.zeros(batch, dtype=bool)
    total_size = float(sum(np.prod(y.shape[1:]) for y in ys))

    def scaled(arrs, factors):  # per-sample float64 factors times each array
        return [ops.per_sample(factors, a.ndim) * a for a in arrs]

    k_first = f(ys, t)
    calls, attempts = 1, 0
    while not done.all():
        attempts += 1
        if attempts > max_steps:
            raise RuntimeError(f"RK45 did not reach t={t1} in {max_steps} steps; loosen rtol/atol")
        h = np.where(done, 0.0, direction * np.minimum(np.abs(h), np.abs(t1 - t)))
        ks = [k_first]
        for i in range(1, 7):
            stage = [y + sum_terms for y, sum_terms in zip(ys, _combine(ks, _DP_A[i], ops, h))]
            ks.append(f(stage, t + _DP_C[i] * h))
            calls += 1
        y_new = stage  # the 7th stage's input is the 5th-order solution (FSAL)
        err = _combine(ks, _DP_ERR, ops, h)
        ratio = np.zeros(batch)
        for y, yn, e in zip(ys, y_new, err):
            tol = atol + rtol * ops.maximum(ops.abs(y), ops.abs(yn))
            ratio += ops.sum_squares(e / tol)
        err_norm = np.sqrt(ratio / total_size)  # RMS over all of a sample's numbers
        accept = (err_norm <= 1.0) & ~done
        ys = [ops.where(ops.per_sample_mask(accept, y.ndim), yn, y) for y, yn in zip(ys, y_new)]
        k_first = [ops.where(ops.per_sample_mask(accept, k.ndim), kn, k) for k, kn in zip(k_first, ks[-1])]
        t = np.where(accept, t + h, t)
        with np.errstate(divide="ignore"):
            factor = np.clip(0.9 * np.power(np.maximum(err_norm, 1e-10), -0.2), 0.2, 10.0)
        h = h * np.where(accept, factor, np.minimum(factor, 1.0))
        done = done | (np.abs(t1 - t) <= 1e-12 * max(span, 1e-300))
        ops.eval(*ys)
        if callback is not None:
            callback(attempts - 1, float(np.mean(t)), ys)
    return ys, calls


def _combine(ks, coefs, ops, h):
    """h * sum_j coefs[j] ks[j], for each array of the state list."""
    out = []
    for part in range(len(ks[0])):
        acc = None
        for c, k in zip(coefs, ks):
            if c != 0.0:
                term = float(c) * k[part]
                acc = term if acc is None else acc + term
        out.append(ops.per_sample(h, acc.ndim) * acc)
    return out


# ----------------------------------------------------------------------------- Poisson midpoint


def poisson_midpoint(ctx: Context, u, ts, substeps: int = 4, variant: str = "bernoulli"):
    """Poisson midpoint method (PLMC): each coarse step stands for ``substeps`` (K) fine steps of
    the exponential integrator at about two batched calls.

    b0 is the remainder at the coarse step's start; a frozen-drift chain (no calls) proposes the
    fine states; midpoints j with H_j = 1 are evaluated in ONE batched call; the corrected chain
    reuses the same Gaussian draws with drift b0 + K H_j (b(X^_j) - b0).
    variant="bernoulli": H_j ~ Bernoulli(1/K) independently (the paper's scheme);
    variant="one": exactly one uniformly chosen midpoint, weight K (lower variance).
    The coin flips are shared by the batch (they depend on the seed only); j = 0 needs no call
    because X^_0 is the current state.
    """
    K = int(substeps)
    if K < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    if variant not in ("bernoulli", "one"):
        raise ValueError(f"unknown Poisson-midpoint variant {variant!r}; choose bernoulli or one")
    rng = ctx.noise.shared
    shape = tuple(u.shape[1:])
    for k, (t0, t1) in enumerate(_pairs(ts)):
        fine = np.linspace(t0, t1, K + 1)
        b0 = ctx.remainder(u, t0)
        zs = [ctx.noise.normal(ctx.ops, shape) for _ in range(K)]
        if variant == "bernoulli":
            hits = rng.random(K) < 1.0 / K
        else:
            hits = np.zeros(K, dtype=bool)
            hits[rng.integers(K)] = True
        # Frozen-drift chain X^_0..X^_{K-1}: exponential steps with b0, driven by the same z's.
        frozen, x = [u], u
        for j in range(K - 1):
            x = _exp_step_with_noise(ctx, x, b0, fine[j], fine[j + 1], zs[j])
            frozen.append(x)
        picked = [j for j in range(1, K) if hits[j]]
        corrections = {}
        if picked:
            big = ctx.ops.concat_batch([frozen[j] for j in picked])
            times = np.repeat(fine[picked], ctx.batch)
            values = ctx.remainder(big, times)
            for slot, j in enumerate(picked):
                corrections[j] = values[slot * ctx.batch:(slot + 1) * ctx.batch] - b0
        y = u
        for j in range(K):
            b = b0 + float(K) * corrections[j] if j in corrections else b0
            y = _exp_step_with_noise(ctx, y, b, fine[j], fine[j + 1], zs[j])
        u = y
        ctx.step_done(k, t1, u)
    return u


def _exp_step_with_noise(ctx: Context, u, b, t0: float, t1: float, z):
    """exponential_step with a given noise draw z (shaped like u)."""
    key = ("linear", t0, t1)
    if key not in ctx._cache:
        ctx._cache[key] = ctx.sde.reverse_linear_step(t0, t1)
    E, C = ctx._cache[key]
    kicked = ctx.split(ctx.kick(u, b, t0, t1))
    return ctx.join([a + c for a, c in zip(mix(E, kicked), mix(C, ctx.split(z)))])


# ----------------------------------------------------------------------------- adaptive momentum


def ams(ctx: Context, u, ts, snr: float = 0.16, momentum: bool = True, corrector_steps: int = 1,
        norms: str = "sample"):
    """Predictor-corrector: a Lie-Trotter predictor step, then ``corrector_steps`` Langevin steps
    with adaptive momentum (AMS, Wen et al.) on the last block; 1 + corrector_steps NFE per step.

    A step u_n <- u_n + a s + sqrt(2 a) z leaves p(u_n | other blocks) invariant, so the corrector
    moves the last block only. Per sample, with z fresh noise and s the score:
      first step (and always with momentum=False): rho = 0, m = s, h = 2 (snr |z| / |s|)^2,
        which is score_sde's Langevin corrector;
      later steps: L^ = |s - s_prev| / |Delta_prev| with Delta_prev = h~_prev m_prev,
        rho = clip(((1 - h~_prev L^) / (1 + h~_prev L^))^2, 0, 1 - 1e-4),
        h = 2 (snr |z| / |m_prev|)^2, m = rho m_prev + (1 - rho) s;
      h~ = h (1 + rho)^2, u_n += h~ m + sqrt(2 h) z.
    The state (m, s, |Delta|, h~) carries over from step to step, as in the AMS code; score_sde's
    alpha_t factor (1 - beta_i for VP) is taken as 1.

    norms="sample" (default) takes every norm per sample, so a sample does not depend on its
    batch; this is sound for images, where a norm over thousands of numbers barely fluctuates, but
    in a few dimensions |s| of one sample can be near 0 and its step size explode. norms="batch"
    averages each norm over the batch as score_sde and the AMS code do (a sample then depends on
    the batch it is drawn in).
    """
    if norms not in ("sample", "batch"):
        raise ValueError(f"unknown norms {norms!r}; choose sample or batch")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if int(corrector_steps) != corrector_steps or corrector_steps < 1:
        raise ValueError(f"corrector_steps must be an integer >= 1, got {corrector_steps}")
    ops = ctx.ops

    def norm(x):  # per sample (B,) float64, or the batch mean of the per-sample norms
        values = np.sqrt(ops.sum_squares(x))
        return values if norms == "sample" else np.full_like(values, values.mean())

    state = None  # (m, s, |Delta|, h~) of the previous corrector step
    for k, (t0, t1) in enumerate(_pairs(ts)):
        u = lie_trotter_step(ctx, u, t0, t1)
        for _ in range(int(corrector_steps)):
            blocks = ctx.split(u)
            s = ctx.score(u, t1)
            z = ctx.noise.normal(ops, tuple(s.shape[1:]))
            if state is None or not momentum:
                rho, m, direction = np.zeros(ctx.batch), s, norm(s)
            else:
                m_prev, s_prev, delta_prev, h_eff_prev = state
                lhat = norm(s - s_prev) / np.maximum(delta_prev, 1e-30)
                ratio = h_eff_prev * lhat
                rho = np.clip(((1.0 - ratio) / (1.0 + ratio)) ** 2, 0.0, 1.0 - 1e-4)
                direction = norm(m_prev)
                bb = ops.per_sample(rho, s.ndim)
                m = bb * m_prev + (1.0 - bb) * s
            h = 2.0 * (snr * norm(z) / np.maximum(direction, 1e-30)) ** 2
            h_eff = h * (1.0 + rho) ** 2
            blocks[-1] = (blocks[-1] + ops.per_sample(h_eff, m.ndim) * m
                          + ops.per_sample(np.sqrt(2.0 * h), z.ndim) * z)
            u = ctx.join(blocks)
            state = (m, s, h_eff * norm(m), h_eff)
        ctx.step_done(k, t1, u)
    return u


# ----------------------------------------------------------------------------- gDDIM


def _data_prediction(ctx: Context, u, t: float):
    """x0_hat = E[x0 | u_t] from the last block's score (Tweedie; sde.data_prediction_terms); 1 NFE."""
    key = ("x0", t)
    if key not in ctx._cache:
        row, scale = data_prediction_terms(ctx.sde, t)
        ctx._cache[key] = (row[0] * scale[0], float(scale[0]))
    weights, scale = ctx._cache[key]
    return mix(weights[None], ctx.split(u))[0] + scale * ctx.score(u, t)


def gddim(ctx: Context, u, ts, order: int = 2, eta: float = 0.0, corrector: bool = False):
    """gDDIM: a multistep exponential integrator of the probability-flow ODE (eta = 0) or of the
    reverse SDE family du = [F u - (1 + eta^2)/2 sigma^2 s e_n] dB + eta G dW (eta = 1: the reverse
    SDE) in data prediction; 1 NFE per step and the final denoising call returns x0_hat.

    u <- Psi u + sum_j W_j x0_hat(t_{k-j}) + C z: the data prediction extrapolated by a Lagrange
    polynomial of degree order - 1 in t through the last ``order`` calls (fewer for the first
    steps), the linear part integrated exactly (coefficients from ``sde.gddim_steps``). Exact for
    a one-point data law at every order and eta (in law for eta > 0). Its default grid is
    "quadratic" (the best measured, docs/samplers.md).

    ``corrector=True`` redoes each step once the next call has been made at its end: the same
    update with the polynomial through that new prediction as well (UniPC's corrector, Zhao et al.
    2023), with the same noise. It costs no call and raises the order by one.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"gddim order must be 1, 2 or 3, got {order!r}")
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"gddim eta must be a number in [0, 1] (0: ODE, 1: reverse SDE), got {eta!r}")
    if not isinstance(corrector, (bool, np.bool_)):
        raise ValueError(f"gddim corrector must be True or False, got {corrector!r}")
    key = ("gddim", tuple(np.asarray(ts, dtype=np.float64)), order, float(eta), bool(corrector))
    if key not in ctx._cache:
        ctx._cache[key] = gddim_steps(ctx.sde, ts, order, float(eta), corrector=bool(corrector))
    history = []  # data predictions, most recent first
    last = None  # (state, step, noise) the previous step started from, for the corrector
    for k, (step, (t0, t1)) in enumerate(zip(ctx._cache[key], _pairs(ts))):
        x0 = _data_prediction(ctx, u, float(t0))
        if last is not None:  # redo the previous step with the call made at its end: no extra NFE
            u = _gddim_update(ctx, *last, [x0] + history, corrected=True)
        history = [x0] + history[:order - 1]
        z = ctx.noise.normal(ctx.ops, tuple(u.shape[1:])) if step.noise_factor is not None else None
        if corrector:
            last = (u, step, z)
        u = _gddim_update(ctx, u, step, z, history)
        ctx.step_done(k, t1, u)
    return u


def _gddim_update(ctx: Context, u, step, z, x0s: list, corrected: bool = False):
    """u <- Psi u + sum_j W_j x0s[j] (+ C z): the predictor, or the corrector's weights."""
    blocks = mix(step.transition, ctx.split(u))
    for weights, x0 in zip(step.corrector if corrected else step.weights, x0s):
        blocks = [b + float(w) * x0 if w != 0.0 else b for b, w in zip(blocks, weights)]
    if z is not None:
        blocks = [b + c for b, c in zip(blocks, mix(step.noise_factor, ctx.split(z)))]
    return ctx.join(blocks)


def _gddim_denoise(ctx: Context, u, t: float):
    """The final call: the data block becomes x0_hat = E[x0 | u_t] (Tweedie); 1 NFE."""
    blocks = ctx.split(u)
    blocks[0] = _data_prediction(ctx, u, t)
    return ctx.join(blocks)


gddim.final_denoise = _gddim_denoise
gddim.default_grid = "quadratic"


# ----------------------------------------------------------------------------- registry and driver


SAMPLERS: dict[str, Callable] = {
    "lie-trotter": lie_trotter,
    "strang": strang,
    "euler-maruyama": euler_maruyama,
    "exp-euler": exp_euler,
    "ode": ode,
    "poisson-midpoint": poisson_midpoint,
    "ams": ams,
    "gddim": gddim,
}

#: Other names, each with the options it implies.
ALIASES: dict[str, tuple[str, dict]] = {
    "lt": ("lie-trotter", {}),
    "sscs": ("strang", {}),
    "em": ("euler-maruyama", {}),
    "ei": ("exp-euler", {}),
    "heun": ("ode", {"method": "heun"}),
    "rk45": ("ode", {"method": "rk45"}),
    "exp-heun": ("ode", {"method": "exp-heun"}),
    "ode-rk45": ("ode", {"method": "rk45"}),
    "plmc": ("poisson-midpoint", {}),
    "pm": ("poisson-midpoint", {}),
    "plmc-one": ("poisson-midpoint", {"variant": "one"}),
}


def resolve_sampler(name: str) -> tuple[str, Callable, dict]:
    """(canonical name, function, implied options) for a sampler name or alias."""
    key = str(name).lower().replace("_", "-")
    if key in SAMPLERS:
        return key, SAMPLERS[key], {}
    if key in ALIASES:
        canonical, options = ALIASES[key]
        return canonical, SAMPLERS[canonical], dict(options)
    names = ", ".join(list(SAMPLERS) + list(ALIASES))
    raise ValueError(f"unknown sampler {name!r}; choose one of {names}")


def denoise(ctx: Context, u, t: float):
    """Noise-free Euler step of the reverse SDE from t to 0 (the mean); 1 NFE."""
    dB = float(ctx.sde.B(t))
    drift = ctx.reverse_drift(u, ctx.score(u, t), t, ode=False)
    return ctx.join([b + dB * d for b, d in zip(ctx.split(u), drift)])


@dataclass
class SampleResult:
    x: object  # the data block, a backend array shaped like the data
    u: object  # the full extended state at the end
    nfe: int
    evals: float


def prior_sample(ctx: Context, data_shape: tuple[int, ...]):
    """u_T ~ N(0, Sigma_inf) per data dimension, blocks on the last axis."""
    n = ctx.sde.order
    ext = tuple(data_shape[1:-1]) + (n * data_shape[-1],)
    z = ctx.split(ctx.noise.normal(ctx.ops, ext))
    return ctx.join(mix(ctx.sde.prior_factor, z))


def run_sampler(sde: LinearSDE, score_fn: Callable, shape: tuple[int, ...], *, ops: Backend,
                noise, sampler: str = "lie-trotter", steps: int = 100, grid: str | None = None,
                denoise_final: bool = True, callback: Callable | None = None, **options) -> SampleResult:
    """Draw len(noise) = shape[0] samples of data shape ``shape`` on the backend of ``ops``.

    ``grid=None`` takes the sampler's default grid ("uniform"; "quadratic" for gddim).
    ``callback(step, t, u)`` is called after every step. Extra ``options`` go to the sampler
    (e.g. substeps for poisson-midpoint, snr for ams, method/rtol/atol for ode).
    """
    name, fn, implied = resolve_sampler(sampler)
    options = {**implied, **options}
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("ctx", "u", "ts")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(allowed) or 'none'}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (batch, ..., channels), got {shape}")
    if noise.batch != shape[0]:
        raise ValueError(f"noise is for {noise.batch} samples but shape asks for {shape[0]}")
    ctx = Context(sde, score_fn, ops, noise, shape[0], callback)
    ts = time_grid(sde, steps, grid or getattr(fn, "default_grid", "uniform"))
    u = prior_sample(ctx, shape)
    u = fn(ctx, u, ts, **options)
    if denoise_final:  # a sampler may bring its own final denoising call
        u = getattr(fn, "final_denoise", denoise)(ctx, u, float(ts[-1]))
    ops.eval(u)
    if not ops.all_finite(u):  # the caller keeps the samples; a silent NaN grid helps nobody
        warnings.warn(f"{sampler}: the samples contain NaN or Inf (the score function returned non-finite "
                      "values, or the steps are too few for this sampler)", RuntimeWarning, stacklevel=2)
    return SampleResult(ctx.split(u)[0], u, ctx.nfe, ctx.evals)

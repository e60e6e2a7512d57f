"""Likelihood of a score model (bits/dim): the probability-flow ODE with a trace estimator.

docs/math.md §5. Along the probability-flow ODE, in forward time from t0 = eps to T,

    du/dt = f(u, t) = beta(t) [F u - 1/2 sigma^2 s(u, t) e_n],
    log p_t0(u_t0) = log N(u_T; 0, Sigma_inf) + int_t0^T div f dt,
    div f = beta(t) [d tr(F) - 1/2 sigma^2 tr(ds/du_n)].

The drift, the linear part's trace and the prior are the SDE's (``LinearSDE.reverse``,
``linear_divergence``, ``prior_log_density``); the trace integrates in closed form,
d tr(F) (B(T) - B(t0)). The score enters only the last block, so only tr(ds/du_n) is estimated:
by Hutchinson, z.(ds/du_n)z with a Rademacher probe z fixed over the solve (one VJP per
right-hand side), or exactly with the d basis probes (low-dimensional data). The VJP comes from
the score model's own framework (MLX or torch) through ``score_probe``; the integrator is the
samplers' per-sample adaptive RK45 (``solve_rk45``).

Extended states (order n >= 2) give a bound through the auxiliary start aux_0 ~ N(0, aux_var_i I)
for each auxiliary block i:

    -log p(x_0) <= E_aux[-log p(x_0, aux_0)] - H[aux_0],   H = sum_i d/2 (1 + log 2 pi aux_var_i);

one aux_0 is drawn per image, so the mean over images estimates the bound and its standard error
includes the auxiliary draw. Images are dequantised uniformly, y = (k + U)/256 with k the 8-bit
value, mapped to model space, and

    bits/dim = (NLL + sum log scale + d log 256) / (d ln 2)     (= NLL/(d ln 2) + 7 for [-1, 1]).

Every random number of image i (dequantisation, auxiliaries, probe) comes from a generator keyed
by (seed, i), and RK45 steps each image on its own, so a result does not depend on the batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backends import Backend
from .samplers import Context, ode_velocity, solve_rk45
from .sde import LinearSDE

__all__ = ["ESTIMATORS", "score_probe", "log_likelihood", "aux_entropy", "dequantize", "bits_per_dim",
           "data_nll", "evaluate_likelihood", "LikelihoodResult", "EXACT_MAX_DIM"]

ESTIMATORS = ("hutchinson", "exact")
EXACT_MAX_DIM = 256  # the exact trace costs d network passes per right-hand side


# ----------------------------------------------------------------------------- autodiff adapters


def score_probe(score_fn: Callable, ops: Backend, width: int) -> Callable:
    """(u, t, z) -> (s, q): the score s(u, t) and q = z.(ds/du_n) z per sample, shape (B,).

    ``width`` is the size of one block on the last axis; z is shaped like one block. The backend
    supplies the VJP (``Backend.vjp_probe``; NumPy/onnxruntime have none).
    """
    return ops.vjp_probe(score_fn, width)


# ----------------------------------------------------------------------------- extended-state likelihood


@dataclass
class ODELikelihood:
    logp: np.ndarray  # log p_t0(u_t0) per sample, nats (model space, extended state)
    prior_logp: np.ndarray  # log N(u_T; 0, Sigma_inf)
    nfe: int  # right-hand-side calls (each one batched score + VJP)


def log_likelihood(sde: LinearSDE, score_fn: Callable, u0, ops: Backend, *, probes=None, t0: float | None = None,
                   rtol: float = 1e-5, atol: float = 1e-5, callback: Callable | None = None) -> ODELikelihood:
    """log p_t0(u0) of extended states u0 (B, ..., n*C) under the model's probability-flow ODE.

    ``probes``: Hutchinson probes shaped like one block (backend array, fixed over the solve), or
    None for the exact trace (d probes; data with at most EXACT_MAX_DIM numbers). t0 defaults to
    the SDE's smallest training time. ``callback(step, mean_t)`` after every RK45 step.
    """
    n, batch = sde.order, u0.shape[0]
    width = u0.shape[-1] // n
    block_shape = tuple(u0.shape[1:-1]) + (width,)
    d = int(np.prod(block_shape))
    t0 = sde.eps_loss if t0 is None else float(t0)
    if not 0 < t0 < sde.T:
        raise ValueError(f"the likelihood's start time must lie in (0, T={sde.T}), got {t0}")
    ctx = Context(sde, score_fn, ops, noise=None, batch=batch)
    probe = score_probe(score_fn, ops, width)
    if probes is None:
        if d > EXACT_MAX_DIM:
            raise ValueError(f"the exact trace needs {d} network passes per step for {d}-dimensional data; "
                             "use the hutchinson estimator")
        basis = np.eye(d, dtype=np.float32).reshape((d, 1) + block_shape)
        probes = ops.asarray(np.broadcast_to(basis, (d, batch) + block_shape).reshape((d * batch,) + block_shape))
        copies = d
    else:
        copies = 1
    score_scale = sde.reverse(probability_flow=True).score_scale  # sigma^2 / 2

    def rhs(ys, t):
        u = ys[0]
        if copies == 1:
            s, q = probe(u, ops.asarray(t), probes)
        else:  # one batched call over the d basis probes
            s, q = probe(ops.concat_batch([u] * copies), ops.asarray(np.tile(t, copies)), probes)
            s, q = s[:batch], q.reshape(copies, batch).sum(axis=0)
        du = ode_velocity(ctx, u, s, t)
        dlog = ops.per_sample(-score_scale * sde.beta(t), 1) * q  # the score part of div f
        ops.eval(du, dlog)
        return [du, dlog]

    step_cb = (lambda k, t, ys: callback(k, t)) if callback is not None else None
    (u_T, score_part), nfe = solve_rk45(rhs, [u0, ops.asarray(np.zeros(batch))], t0, sde.T, ops,
                                        rtol=rtol, atol=atol, callback=step_cb)
    linear_part = d * sde.linear_divergence() * float(sde.B(sde.T) - sde.B(t0))
    prior = sde.prior_log_density(ops.to_numpy(u_T))
    return ODELikelihood(prior + linear_part + ops.to_numpy(score_part).astype(np.float64), prior, nfe)


# ----------------------------------------------------------------------------- data likelihood


def aux_entropy(sde: LinearSDE, d: int) -> float:
    """H[aux_0] for aux_0 ~ N(0, aux_var_i I_d) per auxiliary block (0 for order 1)."""
    if sde.order == 1:
        return 0.0
    if np.any(sde.aux_var <= 0):
        raise ValueError(f"the likelihood bound needs auxiliary start variances > 0, got {sde.aux_var}")
    return float(sum(0.5 * d * (1.0 + math.log(2 * math.pi * v)) for v in sde.aux_var))


def dequantize(images, rngs) -> np.ndarray:
    """Images in [0, 1] (levels k/255) -> (k + U)/256 with U ~ U[0, 1) from each image's generator."""
    images = np.asarray(images, dtype=np.float64)
    k = np.round(np.clip(images, 0.0, 1.0) * 255.0)
    u = np.stack([rng.random(images.shape[1:]) for rng in rngs])
    return (k + u) / 256.0


def _log_scale_sum(data_cfg: dict) -> float:
    """sum over data dimensions of log(scale), with model = (user - shift) / scale."""
    shape = tuple(data_cfg["shape"])
    return float(np.log(np.broadcast_to(np.asarray(data_cfg["scale"], np.float64), shape)).sum())


def bits_per_dim(nll_model, data_cfg: dict) -> np.ndarray:
    """Bits per dimension of 8-bit images from the NLL (nats) of dequantised images in model space."""
    d = int(np.prod(data_cfg["shape"]))
    nll = np.asarray(nll_model, np.float64)
    return (nll + _log_scale_sum(data_cfg) + d * math.log(256.0)) / (d * math.log(2.0))


def data_nll(sde: LinearSDE, score_fn: Callable, x_model: np.ndarray, ops: Backend, rngs, *,
             estimator: str = "hutchinson", **ode_options) -> tuple[np.ndarray, int]:
    """Per sample -log p(x, aux) - H[aux] (nats, model space) with aux and probes from ``rngs``.

    x_model: data (B, *shape) in model space. Returns (nll (B,), NFE).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown trace estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    x_model = np.asarray(x_model, dtype=np.float64)
    shape = x_model.shape[1:]
    blocks = [x_model]
    for v in sde.aux_var:
        blocks.append(np.stack([rng.standard_normal(shape) for rng in rngs]) * math.sqrt(v))
    u0 = ops.asarray(np.concatenate(blocks, axis=-1))
    probes = None
    if estimator == "hutchinson":
        probes = ops.asarray(np.stack([rng.integers(0, 2, shape) * 2.0 - 1.0 for rng in rngs]))
    result = log_likelihood(sde, score_fn, u0, ops, probes=probes, **ode_options)
    return -result.logp - aux_entropy(sde, int(np.prod(shape))), result.nfe


@dataclass
class LikelihoodResult:
    """Per-sample values and their summary. ``unit`` is "bits/dim" for images (dequantised, 8-bit)
    and "nats" (per point, user units) for low-dimensional data."""

    values: np.ndarray
    unit: str
    nll_model: np.ndarray  # nats in model space (dequantised for images)
    nfe: list = field(default_factory=list)  # per batch

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def stderr(self) -> float:
        n = len(self.values)
        return float(self.values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def evaluate_likelihood(sde: LinearSDE, score_fn: Callable, ops: Backend, data_user, data_cfg: dict, *,
                        seed: int = 0, first_index: int = 0, batch_size: int = 64, estimator: str = "hutchinson",
                        progress: Callable | None = None, **ode_options) -> LikelihoodResult:
    """NLL of data (user units: images in [0, 1], points as given) under a score model.

    Images are dequantised and reported in bits/dim; points in nats per point. ``progress(done,
    mean_t)`` is called after every RK45 step of every batch (done = samples finished so far).
    """
    data_user = np.asarray(data_user)
    shape = tuple(data_cfg["shape"])
    if data_user.shape[1:] != shape:
        raise ValueError(f"data has shape {data_user.shape[1:]}, the model takes {shape}")
    image = data_cfg["kind"] == "image"
    shift = np.asarray(data_cfg["shift"], np.float64)
    scale = np.asarray(data_cfg["scale"], np.float64)
    nll, nfes = [], []
    for lo in range(0, len(data_user), batch_size):
        batch = data_user[lo:lo + batch_size]
        rngs = [np.random.default_rng([seed, first_index + lo + i]) for i in range(len(batch))]
        x = dequantize(batch, rngs) if image else np.asarray(batch, np.float64)
        cb = (lambda k, t, done=lo: progress(done, t)) if progress is not None else None
        values, nfe = data_nll(sde, score_fn, (x - shift) / scale, ops, rngs, estimator=estimator,
                               callback=cb, **ode_options)
        nll.append(values)
        nfes.append(nfe)
        if progress is not None:
            progress(lo + len(batch), sde.T)
    nll = np.concatenate(nll)
    if image:
        return LikelihoodResult(bits_per_dim(nll, data_cfg), "bits/dim", nll, nfes)
    return LikelihoodResult(nll + _log_scale_sum(data_cfg), "nats", nll, nfes)

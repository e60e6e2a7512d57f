"""Tests for hold_mlx.sde: the linear SDE family (VP, CLD, HOLD) and its exact kernels.

Every reference value here is computed independently of ``hold_mlx.sde``: the drift matrices are
rebuilt from the formulas in docs/math.md §1-2, moments come from integrating the moment ODEs with
SciPy, matrix exponentials and Lyapunov solutions from ``scipy.linalg``, and the CLD numbers from
the closed forms of CLD-SGM (nv-tlabs, ``sde_lib.py``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.integrate import solve_ivp

from hold_mlx import sde as sde_mod
from hold_mlx.sde import LinearSDE, get_sde

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- independent references


def ref_hold_couplings(n: int) -> tuple[list[float], float]:
    """Critical HOLD++ couplings and friction, written out from docs/math.md §1 (not from sde.py)."""
    r = math.sqrt(2 * n - 3)
    gammas = [r * math.sqrt((n**2 - (n - k) ** 2) / (4 * (n - k) ** 2 - 1)) for k in range(1, n)]
    return gammas, n * r


def ref_model(name: str, order: int = 3) -> dict:
    """F, sigma, beta(t), aux_var and T of a preset with its default parameters, from docs/math.md."""
    if name == "vp":
        return dict(F=np.array([[-0.5]]), sigma=1.0, beta=lambda t: 0.1 + t * (20.0 - 0.1), aux=[], T=1.0)
    if name == "cld":
        m_inv, beta = 4.0, 4.0
        gamma = 2.0 / math.sqrt(m_inv)  # critical: Gamma^2 = 4 M
        return dict(
            F=np.array([[0.0, m_inv], [-1.0, -gamma * m_inv]]),
            sigma=math.sqrt(2.0 * gamma),  # sqrt(2 Gamma beta) with sqrt(beta) in the time change
            beta=lambda t: beta,
            aux=[0.04 / m_inv],  # gamma_v * M
            T=1.0,
        )
    assert name == "hold"
    L_inv, alpha = 0.5, 0.08
    if order == 1:
        gammas, xi = [], 1.0  # sde.py's documented order-1 default (an OU process on x alone)
    else:
        gammas, xi = ref_hold_couplings(order)
    F = np.zeros((order, order))
    for i, g in enumerate(gammas):
        F[i, i + 1], F[i + 1, i] = g, -g
    F[-1, -1] = -xi
    return dict(F=F, sigma=math.sqrt(2 * xi * L_inv), beta=lambda t: 1.0, aux=[alpha * L_inv] * (order - 1), T=5.0)


def make(name: str, order: int = 3) -> LinearSDE:
    return get_sde(name, order=order) if name == "hold" else get_sde(name)


def forward_step(sde: LinearSDE, t_from: float, t_to: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact forward transition over [t_from, t_to]: u <- A u + C z (stationary form)."""
    dB = float(sde.B(t_to) - sde.B(t_from))
    A = sla.expm(sde.F * dB)
    S = sde.stationary_cov()
    return A, sde_mod.psd_sqrt(S - A @ S @ A.T)


def simulate_forward(sde: LinearSDE, u0: np.ndarray, t_end: float, steps: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Euler-Maruyama simulation of the forward SDE from t = 0; u0 (..., n) with the blocks on the last axis."""
    u = np.array(u0, dtype=np.float64)
    ts = np.linspace(0.0, t_end, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dB = float(sde.B(t1) - sde.B(t0))
        noise = np.sqrt(dB) * sde.sigma * rng.standard_normal(u.shape[:-1])
        u = u + dB * (u @ sde.F.T)
        u[..., -1] += noise
    return u


def ode_moments(ref: dict, times) -> tuple[np.ndarray, np.ndarray]:
    """Integrate dA/dt = beta F A, dS/dt = beta (F S + S F^T + sigma^2 e_n e_n^T) from the hybrid start."""
    F, sigma, beta = ref["F"], ref["sigma"], ref["beta"]
    n = F.shape[0]
    Q = np.zeros((n, n))
    Q[-1, -1] = sigma**2

    def rhs(t, y):
        A = y[: n * n].reshape(n, n)
        S = y[n * n :].reshape(n, n)
        b = beta(t)
        return np.concatenate([(b * F @ A).ravel(), (b * (F @ S + S @ F.T + Q)).ravel()])

    y = np.concatenate([np.eye(n).ravel(), np.diag([0.0, *ref["aux"]]).ravel()])
    t_prev, As, Ss = 0.0, [], []
    for t in times:  # restart between output times: no dense-output interpolation error
        sol = solve_ivp(rhs, (t_prev, t), y, method="DOP853", rtol=1e-12, atol=1e-15)
        assert sol.success, sol.message
        y, t_prev = sol.y[:, -1], t
        As.append(y[: n * n].reshape(n, n))
        Ss.append(y[n * n :].reshape(n, n))
    return np.array(As), np.array(Ss)


def lyap(F: np.ndarray, sigma: float) -> np.ndarray:
    n = F.shape[0]
    Q = np.zeros((n, n))
    Q[-1, -1] = sigma**2
    return sla.solve_continuous_lyapunov(F, -Q)


def cld_sgm_moments(t, x, v, *, beta=4.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-9):
    """CLD-SGM's closed-form HSM mean and variance (var0x = 0), transcribed from its sde_lib.py."""
    f = 2.0 / np.sqrt(m_inv)
    g = 1.0 / f
    B = beta * np.asarray(t, dtype=np.float64)
    coeff = np.exp(-2.0 * B * g)
    mean_x = coeff * (2.0 * B * g * x + 4.0 * B * g**2 * v + x)
    mean_v = coeff * (-B * x - 2.0 * B * g * v + v)
    var0x, var0v = 0.0, gamma / m_inv
    mult = np.exp(-4.0 * B * g)
    var_xx = var0x + 1.0 / mult - 1.0 + 4.0 * B * g * (var0x - 1.0) + 4.0 * B**2 * g**2 * (var0x - 2.0) \
        + 16.0 * g**4 * B**2 * var0v
    var_xv = -var0x * B + 4.0 * g**2 * B * var0v - 2.0 * g * B**2 * (var0x - 2.0) - 8.0 * g**3 * B**2 * var0v
    var_vv = f**2 * (1.0 / mult - 1.0) / 4.0 + f * B - 4.0 * g * B * var0v + 4.0 * g**2 * B**2 * var0v \
        + var0v + B**2 * (var0x - 2.0)
    return (mean_x, mean_v), (var_xx * mult + numerical_eps, var_xv * mult, var_vv * mult + numerical_eps)


CASES = [("hold", n) for n in range(1, 6)] + [("vp", 1), ("cld", 2)]
CASE_IDS = [f"{name}{n}" if name == "hold" else name for name, n in CASES]


# ----------------------------------------------------------------------------- presets match docs/math.md


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
def test_preset_parameters_match_math(name, order):
    sde, ref = make(name, order), ref_model(name, order)
    assert sde.order == order
    np.testing.assert_allclose(sde.F, ref["F"], rtol=0, atol=1e-14)
    assert sde.sigma == pytest.approx(ref["sigma"], rel=1e-14)
    np.testing.assert_allclose(sde.aux_var, ref["aux"], rtol=1e-14)
    assert sde.T == ref["T"]
    for t in (0.0, 0.3 * ref["T"], ref["T"]):
        assert float(sde.beta(t)) == pytest.approx(ref["beta"](t), rel=1e-14)


def test_hold_couplings_known_values():
    from hold_mlx.sde import critical_hold_couplings

    for n, gammas, xi in [(2, [1.0], 2.0), (3, [1.0, 2 * math.sqrt(2)], 3 * math.sqrt(3)), (4, [1.0, 2.0, 5.0], 4 * math.sqrt(5))]:
        g, x = critical_hold_couplings(n)
        np.testing.assert_allclose(g, gammas, rtol=1e-14)
        assert x == pytest.approx(xi, rel=1e-14)


# ----------------------------------------------------------------------------- kernel vs moment ODEs


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
def test_kernel_matches_moment_ode(name, order):
    sde, ref = make(name, order), ref_model(name, order)
    T = ref["T"]
    times = np.array([1e-6, 1e-3, 0.05 * T, 0.37 * T, T])
    A_ref, S_ref = ode_moments(ref, times)

    A = sde.mean_coeff(times)
    S = sde.cov(times)
    assert A.shape == S.shape == (len(times), order, order)
    np.testing.assert_allclose(A, A_ref, rtol=0, atol=1e-11)
    np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-11)
    # scalar t gives an (n, n) matrix equal to the batched one
    for i, t in enumerate(times):
        np.testing.assert_allclose(sde.mean_coeff(float(t)), A[i], rtol=0, atol=1e-13)
        np.testing.assert_allclose(sde.cov(float(t)), S[i], rtol=0, atol=1e-13)
    # t -> 0: the hybrid start itself
    np.testing.assert_allclose(sde.cov(1e-12), np.diag([0.0, *ref["aux"]]), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sde.mean_coeff(0.0), np.eye(order), rtol=0, atol=0)
    # the kernel object carries the same numbers plus a jittered Cholesky factor
    k = sde.perturbation(times)
    np.testing.assert_allclose(k.mean_coeff, A_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(k.cov, S_ref, rtol=0, atol=1e-9)
    jittered = S + sde.numerical_eps * np.eye(order)
    np.testing.assert_allclose(k.chol @ np.swapaxes(k.chol, -1, -2), jittered, rtol=0, atol=1e-13)
    assert np.allclose(np.triu(k.chol, 1), 0.0)
    # ell = L[n, n] = 1 / sqrt((Sigma^-1)_nn)
    np.testing.assert_allclose(k.ell, 1.0 / np.sqrt(np.linalg.inv(jittered)[:, -1, -1]), rtol=1e-6)


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
def test_mean_coeff_matches_scipy_expm(name, order):
    sde, ref = make(name, order), ref_model(name, order)
    for t in (1e-6, 0.2 * ref["T"], ref["T"]):
        B = sde.B(t)
        np.testing.assert_allclose(sde.mean_coeff(t), sla.expm(ref["F"] * B), rtol=0, atol=1e-13)


def test_expm_against_scipy():
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((n, n)) * s for n in (1, 2, 3, 5) for s in (1e-3, 1.0, 30.0)]
    mats.append(np.array([[0.0, 1.0], [0.0, 0.0]]))  # nilpotent / defective
    for m in mats:
        ref = sla.expm(m)
        np.testing.assert_allclose(sde_mod.expm(m), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    batch = np.stack([mats[0], mats[1] * 0.0 + mats[0] * 2.0])
    np.testing.assert_allclose(sde_mod.expm(batch), np.stack([sla.expm(b) for b in batch]), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- kernel vs Monte Carlo


def em_moments(F, sigma, dBs, m0, S0):
    """Exact first two moments of the Euler-Maruyama chain (to bound its discretisation bias)."""
    n = F.shape[0]
    m, S = m0.copy(), S0.copy()
    for h in dBs:
        M = np.eye(n) + h * F
        m = M @ m
        S = M @ S @ M.T
        S[-1, -1] += h * sigma**2
    return m, S


@pytest.mark.parametrize(
    "name,order,t_end,steps",
    [("vp", 1, 0.3, 400), ("cld", 2, 0.25, 800), ("hold", 3, 1.0, 1200)],
    ids=["vp", "cld", "hold3"],
)
def test_kernel_matches_monte_carlo(name, order, t_end, steps):
    sde = make(name, order)
    ref = ref_model(name, order)
    n_paths = 40_000
    rng = np.random.default_rng(1234)
    # start: data x0 and fixed auxiliary means (so every column of A is exercised),
    # plus N(0, aux_var) noise on the auxiliary blocks (the hybrid start)
    m0 = np.array([0.8, -0.6, 0.4, -0.3, 0.2][:order])
    S0 = np.diag([0.0, *ref["aux"]])
    u0 = m0 + rng.standard_normal((n_paths, order)) * np.sqrt(np.diag(S0))
    u = simulate_forward(sde, u0, t_end, steps, rng)
    assert u.shape == (n_paths, order)

    mean_k = sde.mean_coeff(t_end) @ m0
    cov_k = sde.cov(t_end)

    # the EM chain is biased by O(h): make sure that bias is small against the statistical error
    ts = np.linspace(0.0, t_end, steps + 1)
    dBs = np.diff(np.array([sde.B(t) for t in ts]))
    m_em, S_em = em_moments(ref["F"], ref["sigma"], dBs, m0, S0)
    d = np.sqrt(np.diag(cov_k))
    se_mean = d / math.sqrt(n_paths)
    se_cov = np.sqrt((np.outer(d**2, d**2) + cov_k**2) / n_paths)
    assert np.all(np.abs(m_em - mean_k) < 0.5 * se_mean)
    assert np.all(np.abs(S_em - cov_k) < 1.0 * se_cov)

    mean_mc = u.mean(axis=0)
    cov_mc = np.cov(u, rowvar=False).reshape(order, order)
    z_mean = np.abs(mean_mc - mean_k) / se_mean
    z_cov = np.abs(cov_mc - cov_k) / se_cov
    assert z_mean.max() < 5.0, (z_mean, mean_mc, mean_k)
    assert z_cov.max() < 5.0, (z_cov, cov_mc, cov_k)


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    "params",
    [{}, dict(beta=1.5, m_inv=2.0, gamma_v=0.1)],
    ids=["cifar10", "m_inv2"],
)
def test_cld_matches_cld_sgm_closed_form(params):
    sde = get_sde("cld", **params)
    beta, m_inv, gamma = params.get("beta", 4.0), params.get("m_inv", 4.0), params.get("gamma_v", 0.04)
    x, v = 0.7, -1.3
    times = np.array([1e-6, 1e-3, 0.05, 0.25, 0.5, 1.0])
    (mx, mv), (vxx, vxv, vvv) = cld_sgm_moments(times, x, v, beta=beta, m_inv=m_inv, gamma=gamma)
    mean = sde.mean_coeff(times) @ np.array([x, v])
    np.testing.assert_allclose(mean[:, 0], mx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean[:, 1], mv, rtol=0, atol=1e-12)
    # sde.cov is the exact covariance; CLD-SGM adds numerical_eps to the diagonal, like perturbation().chol
    eps = sde.numerical_eps
    assert eps == 1e-9
    S = sde.cov(times)
    np.testing.assert_allclose(S[:, 0, 0], vxx - eps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(S[:, 0, 1], vxv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(S[:, 1, 0], vxv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(S[:, 1, 1], vvv - eps, rtol=0, atol=1e-12)
    k = sde.perturbation(times)
    LLt = k.chol @ np.swapaxes(k.chol, -1, -2)
    np.testing.assert_allclose(LLt[:, 0, 0], vxx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(LLt[:, 1, 1], vvv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(LLt[:, 0, 1], vxv, rtol=0, atol=1e-12)


def test_vp_closed_form():
    sde = get_sde("vp")
    times = np.array([1e-6, 1e-3, 0.1, 0.5, 0.9, 1.0])
    B = 0.1 * times + 9.95 * times**2
    np.testing.assert_allclose(sde.B(times), B, rtol=1e-14)
    np.testing.assert_allclose(sde.mean_coeff(times)[:, 0, 0], np.exp(-0.5 * B), rtol=1e-13)
    np.testing.assert_allclose(sde.cov(times)[:, 0, 0], -np.expm1(-B), rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(sde.cov(times)[:, 0, 0], 1.0 - np.exp(-B), rtol=0, atol=1e-14)
    np.testing.assert_allclose(sde.stationary_cov(), [[1.0]], rtol=1e-14)
    # VP preserves unit variance: the mixed-score Gaussian part (data variance 1) has variance 1
    np.testing.assert_allclose(sde.mixed_score_var(times), 1.0 + sde.numerical_eps, rtol=1e-13)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_critical_damping_nilpotent(n):
    sde = get_sde("hold", order=n)
    lam = -math.sqrt(2 * n - 3)
    N = sde.F - lam * np.eye(n)
    scale = np.abs(N).max() ** n
    assert np.abs(np.linalg.matrix_power(N, n)).max() < 1e-12 * scale
    assert np.abs(np.linalg.matrix_power(N, n - 1)).max() > 1e-3  # index exactly n: one Jordan block
    # characteristic polynomial = (lambda - lam)^n
    np.testing.assert_allclose(np.poly(sde.F), np.poly(np.full(n, lam)), rtol=1e-8, atol=1e-8)
    # A(t) = e^{lam B} sum_{k<n} N^k B^k / k!
    for t in (1e-6, 0.3, 1.7, 5.0):
        B = float(sde.B(t))
        A = sum(np.linalg.matrix_power(N, k) * B**k / math.factorial(k) for k in range(n)) * math.exp(lam * B)
        np.testing.assert_allclose(sde.mean_coeff(t), A, rtol=0, atol=1e-12)


def test_told_plus_plus_closed_form():
    sde = get_sde("hold", order=3)
    r2, r3, r6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    for t in (1e-6, 0.1, 0.5, 1.0, 2.5, 5.0):
        closed = math.exp(-r3 * t) * np.array(
            [
                [1 + r3 * t + t**2, t + r3 * t**2, r2 * t**2],
                [-t - r3 * t**2, 1 + r3 * t - 3 * t**2, 2 * r2 * t - r6 * t**2],
                [r2 * t**2, -2 * r2 * t + r6 * t**2, 1 - 2 * r3 * t + 2 * t**2],
            ]
        )
        np.testing.assert_allclose(sde.mean_coeff(t), closed, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- stationary law


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_stationary_cov_hold_is_L_inv(n):
    for L_inv in (0.5, 2.0):
        sde = get_sde("hold", order=n, L_inv=L_inv)
        np.testing.assert_allclose(sde.stationary_cov(), L_inv * np.eye(n), rtol=0, atol=1e-13)
    # also off-critical couplings: the law stays N(0, L^-1 I) for every c, gamma, xi > 0
    if n >= 2:
        sde = get_sde("hold", order=n, couplings=[0.7 + k for k in range(n - 1)], xi=1.3, L_inv=0.25)
        np.testing.assert_allclose(sde.stationary_cov(), 0.25 * np.eye(n), rtol=0, atol=1e-13)


@pytest.mark.parametrize("m_inv", [4.0, 2.0])
def test_stationary_cov_cld_is_diag_1_M(m_inv):
    sde = get_sde("cld", m_inv=m_inv)
    np.testing.assert_allclose(sde.stationary_cov(), np.diag([1.0, 1.0 / m_inv]), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
def test_stationary_cov_solves_lyapunov(name, order):
    sde = make(name, order)
    S = sde.stationary_cov()
    Q = np.outer(sde.G, sde.G)
    np.testing.assert_allclose(sde.F @ S + S @ sde.F.T + Q, 0.0, atol=1e-12)
    np.testing.assert_allclose(S, lyap(sde.F, sde.sigma), rtol=0, atol=1e-12)
    np.testing.assert_allclose(S, S.T, atol=0)
    np.testing.assert_allclose(sde.prior_factor @ sde.prior_factor.T, S, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sde.stationary_precision_last_row(), np.linalg.inv(S)[-1], rtol=1e-12, atol=1e-12)
    # the kernel converges to the stationary law
    np.testing.assert_allclose(sde.cov(50.0), S, atol=1e-9)


def test_stationary_cov_general_F():
    F = np.array([[-1.0, 2.0, 0.0], [-0.5, -0.3, 1.0], [0.2, -1.0, -2.0]])
    sde = LinearSDE(F, 0.7, aux_var=[0.1, 0.2])
    np.testing.assert_allclose(sde.stationary_cov(), lyap(F, 0.7), rtol=1e-12, atol=1e-14)
    times = np.array([1e-6, 0.4, 3.0])
    A_ref, S_ref = ode_moments(dict(F=F, sigma=0.7, beta=lambda t: 1.0, aux=[0.1, 0.2]), times)
    np.testing.assert_allclose(sde.mean_coeff(times), A_ref, atol=1e-9)
    np.testing.assert_allclose(sde.cov(times), S_ref, atol=1e-9)


def prior_test_sde(which: str) -> LinearSDE:
    if which == "cld":
        return get_sde("cld")
    # a non-diagonal stationary covariance, so a transposed factor or precision would show
    return LinearSDE([[-1.0, 2.0, 0.0], [-0.5, -0.3, 1.0], [0.2, -1.0, -2.0]], 0.7, aux_var=[0.1, 0.2])


@pytest.mark.parametrize("which", ["cld", "general"])
def test_prior_sample_law(which):
    sde = prior_test_sde(which)
    n = sde.order
    u = sde.prior_sample(np.random.default_rng(3), (200, 100))
    assert u.shape == (200, 100, n)
    c = np.cov(u.reshape(-1, n), rowvar=False)
    S = sde.stationary_cov()
    se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S**2) / u[..., 0].size)
    assert np.all(np.abs(c - S) < 5 * se)


# ----------------------------------------------------------------------------- exact steps


@pytest.mark.parametrize("name,order", [("vp", 1), ("cld", 2), ("hold", 2), ("hold", 3), ("hold", 5)],
                         ids=["vp", "cld", "hold2", "hold3", "hold5"])
def test_reverse_linear_step(name, order):
    sde, ref = make(name, order), ref_model(name, order)
    T = ref["T"]
    S = lyap(ref["F"], ref["sigma"])
    Si = np.linalg.inv(S)
    F_rev = S @ ref["F"].T @ Si
    if name == "hold":
        np.testing.assert_allclose(F_rev, ref["F"].T, atol=1e-12)  # F~ = F^T for the HOLD form
    for t_from, t_to in [(T, 0.9 * T), (0.5 * T, 0.1 * T), (0.01 * T, 1e-3 * T), (0.3 * T, 0.3 * T - 1e-7)]:
        E, C = sde.reverse_linear_step(t_from, t_to)
        # B(t_from) - B(t_to) is the integral of the reference beta(t) (linear in t: trapezoid is exact)
        dB = 0.5 * (ref["beta"](t_from) + ref["beta"](t_to)) * (t_from - t_to)
        assert float(sde.B(t_from) - sde.B(t_to)) == pytest.approx(dB, rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(E, sla.expm(F_rev * dB), rtol=0, atol=1e-12)
        # time reversal of the stationary forward process: E = S A^T S^-1
        np.testing.assert_allclose(E, S @ sla.expm(ref["F"] * dB).T @ Si, rtol=0, atol=1e-12)
        np.testing.assert_allclose(C @ C.T, S - E @ S @ E.T, rtol=0, atol=1e-12)
        assert np.all(np.isfinite(C))
    # a zero-length step is the identity with no noise
    E, C = sde.reverse_linear_step(0.4 * T, 0.4 * T)
    np.testing.assert_allclose(E, np.eye(order), atol=0)
    np.testing.assert_allclose(C, 0.0, atol=1e-7)


@pytest.mark.parametrize("name,order", [("vp", 1), ("cld", 2), ("hold", 4)], ids=["vp", "cld", "hold4"])
def test_forward_step_composes_kernel(name, order):
    sde = make(name, order)
    T = sde.T
    for t1, t2 in [(0.1 * T, 0.4 * T), (1e-4 * T, T)]:
        A, C = forward_step(sde, t1, t2)
        np.testing.assert_allclose(A @ sde.mean_coeff(t1), sde.mean_coeff(t2), atol=1e-12)
        np.testing.assert_allclose(A @ sde.cov(t1) @ A.T + C @ C.T, sde.cov(t2), atol=1e-12)


# ----------------------------------------------------------------------------- reverse-time coefficients


def forward_cov_rate(ref: dict, S: np.ndarray) -> np.ndarray:
    """dSigma/dB = F Sigma + Sigma F^T + sigma^2 e_n e_n^T, the forward moment ODE per unit of B."""
    Q = np.zeros_like(S)
    Q[-1, -1] = ref["sigma"] ** 2
    return ref["F"] @ S + S @ ref["F"].T + Q


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("probability_flow", [False, True], ids=["sde", "ode"])
def test_reverse_drift_transports_a_gaussian_law_backwards(name, order, probability_flow):
    """Gaussian data: the exact score of the last block is -(Sigma_t^-1 u)_n, so the reverse drift
    is linear; run backwards it must undo the forward covariance flow, dSigma/dtau = -dSigma/dB."""
    sde, ref = make(name, order), ref_model(name, order)
    rev = sde.reverse(probability_flow=probability_flow)
    half = 0.5 if probability_flow else 1.0
    np.testing.assert_array_equal(rev.linear, -ref["F"])
    np.testing.assert_allclose(rev.score_coeff, np.eye(order)[-1] * half * ref["sigma"] ** 2, rtol=1e-14)
    assert rev.score_scale == pytest.approx(half * ref["sigma"] ** 2, rel=1e-14)
    assert rev.noise_scale == (0.0 if probability_flow else pytest.approx(ref["sigma"], rel=1e-14))
    assert rev.probability_flow is probability_flow
    T = ref["T"]
    times = np.array([1e-3 * T, 0.05 * T, 0.37 * T, T])
    _, covs = ode_moments({**ref, "aux": [0.3 + 0.1 * i for i in range(order - 1)]}, times)
    for S in covs:
        S = S + np.diag([0.7] + [0.0] * (order - 1))  # data variance 0.7 (the flow is linear)
        M = rev.matrix(-np.linalg.inv(S)[-1])
        noise = np.zeros((order, order))
        noise[-1, -1] = rev.noise_scale**2
        np.testing.assert_allclose(M @ S + S @ M.T + noise, -forward_cov_rate(ref, S), rtol=0,
                                   atol=1e-11 * np.abs(forward_cov_rate(ref, S)).max())


@pytest.mark.parametrize("name,order", CASES, ids=CASE_IDS)
def test_stationary_score_gives_the_reverse_linear_drift(name, order):
    """With the stationary score -(Sigma_inf^-1 u)_n the reverse SDE's drift is F~ = S F^T S^-1
    (what reverse_linear_step integrates), and the ODE's keeps N(0, Sigma_inf) fixed."""
    sde, ref = make(name, order), ref_model(name, order)
    S = lyap(ref["F"], ref["sigma"])
    precision = sde.stationary_precision()
    np.testing.assert_allclose(precision, np.linalg.inv(S), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sde.reverse().matrix(-precision[-1]), S @ ref["F"].T @ np.linalg.inv(S), atol=1e-12)
    L = sde.reverse(probability_flow=True).matrix(-precision[-1])
    np.testing.assert_allclose(L @ S + S @ L.T, 0.0, atol=1e-12)
    assert sde.linear_divergence() == pytest.approx(np.trace(ref["F"]), rel=1e-14)


@pytest.mark.parametrize("name,order", [("vp", 1), ("cld", 2), ("hold", 3), ("hold", 5)],
                         ids=["vp", "cld", "hold3", "hold5"])
def test_ode_exp_coefficients_solve_the_linear_flow(name, order):
    """u <- E u + c1 b0 + c2 (b1 - b0) is exact for du/dtau = L u + (sigma^2 / 2) b(tau) e_n with
    L = -F - G G^T Sigma_inf^-1 / 2 and a remainder b linear in B across the step."""
    sde, ref = make(name, order), ref_model(name, order)
    T = ref["T"]
    S = lyap(ref["F"], ref["sigma"])
    half = 0.5 * ref["sigma"] ** 2
    L = -ref["F"] - half * np.outer(np.eye(order)[-1], np.linalg.inv(S)[-1])
    rng = np.random.default_rng(11)
    for t_from, t_to in [(T, 0.8 * T), (0.3 * T, 0.01 * T), (1e-3 * T, 1e-3 * T - 1e-7)]:
        E, c1, c2 = sde.ode_exp_coefficients(t_from, t_to)
        h = float(sde.B(t_from) - sde.B(t_to))
        # zero remainder (the data law is the stationary one): the exact linear flow
        np.testing.assert_allclose(E, sla.expm(L * h), rtol=0, atol=1e-12)
        np.testing.assert_allclose(E @ S @ E.T, S, rtol=0, atol=1e-12)
        u0, b0, b1 = rng.standard_normal(order), 0.8, -0.5
        rhs = lambda tau, u: L @ u + half * (b0 + (b1 - b0) * tau / h) * np.eye(order)[-1]  # noqa: E731
        exact = solve_ivp(rhs, (0.0, h), u0, method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1]
        np.testing.assert_allclose(E @ u0 + c1 * b0 + c2 * (b1 - b0), exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["cld", "general"])
def test_prior_log_density_matches_scipy(which):
    from scipy.stats import multivariate_normal

    sde = prior_test_sde(which)
    n, C = sde.order, 2
    rng = np.random.default_rng(4)
    u = rng.standard_normal((5, 3, 4, n * C))  # (B, H, W, n*C): the blocks side by side
    per_dim = u.reshape(5, 3, 4, n, C).swapaxes(-1, -2)  # (B, H, W, C, n): one n-vector per data number
    law = multivariate_normal(np.zeros(n), lyap(sde.F, sde.sigma))
    expected = law.logpdf(per_dim.reshape(-1, n)).reshape(5, -1).sum(1)
    np.testing.assert_allclose(sde.prior_log_density(u), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="extended states"):
        sde.prior_log_density(np.zeros((2, n * C + 1)))


@pytest.mark.parametrize("name,order", [("vp", 1), ("cld", 2), ("hold", 3)], ids=["vp", "cld", "hold3"])
def test_forward_transition_matches_moment_ode_at_every_t(name, order):
    """W is the covariance the noise adds from a fixed start: Sigma_t = A Sigma_0 A^T + W, and W
    keeps its relative digits as t -> 0 (where S - A S A^T cancels them)."""
    sde, ref = make(name, order), ref_model(name, order)
    T = ref["T"]
    times = np.array([1e-6, 1e-3, 0.05 * T, 0.37 * T, T])
    A_ref, S_ref = ode_moments(ref, times)
    A, W = sde.forward_transition(times)
    np.testing.assert_allclose(A, A_ref, rtol=0, atol=1e-11)
    start = np.diag([0.0, *ref["aux"]])
    np.testing.assert_allclose(A @ start @ np.swapaxes(A, -1, -2) + W, S_ref, rtol=0, atol=1e-11)
    A1, W1 = sde.forward_transition(float(times[2]))
    np.testing.assert_array_equal(A1, A[2])
    np.testing.assert_array_equal(W1, W[2])
    # relative accuracy of every entry at early times, against the Taylor series of
    # W(B) = int_0^B e^{F r} Q e^{F^T r} dr = sum_k B^(k+1) / (k+1)! Lyap^k(Q), Lyap(X) = F X + X F^T
    F = ref["F"]
    for t in (1e-6, 1e-3):
        B = float(sde.B(t))
        term = np.zeros((order, order))
        term[-1, -1] = ref["sigma"] ** 2 * B
        W_ref = term.copy()
        for k in range(1, 40):
            term = (F @ term + term @ F.T) * B / (k + 1)
            W_ref = W_ref + term
        np.testing.assert_allclose(sde.forward_transition(t)[1], W_ref, rtol=1e-10, atol=0)
    if name == "vp":  # closed form W = 1 - exp(-B)
        np.testing.assert_allclose(W[:, 0, 0], -np.expm1(-sde.B(times)), rtol=1e-13)


def test_psd_sqrt_singular():
    q = np.diag([0.0, 0.0, 2.0])
    c = sde_mod.psd_sqrt(q)
    np.testing.assert_allclose(c @ c.T, q, atol=1e-15)
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 3, 3))
    q = a @ np.swapaxes(a, -1, -2)
    c = sde_mod.psd_sqrt(q)
    np.testing.assert_allclose(c @ np.swapaxes(c, -1, -2), q, atol=1e-12)


# ----------------------------------------------------------------------------- config round trip


@pytest.mark.parametrize("name,kw", [("vp", {}), ("cld", dict(m_inv=2.0)), ("hold", dict(order=4, aux_scale=0.1))])
def test_to_config_round_trip(name, kw):
    sde = get_sde(name, **kw)
    cfg = sde.to_config()
    again = get_sde(**cfg)
    np.testing.assert_array_equal(again.F, sde.F)
    assert again.sigma == sde.sigma and again.T == sde.T
    np.testing.assert_array_equal(again.aux_var, sde.aux_var)
    assert (again.beta0, again.beta1) == (sde.beta0, sde.beta1)
    with pytest.raises(ValueError):
        LinearSDE([[-1.0]], 1.0).to_config()


# ----------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    "build,word",
    [
        (lambda: LinearSDE([[0.5]], 1.0), r"\bF\b.*not stable"),
        (lambda: LinearSDE([[0.0, 1.0], [-1.0, 0.0]], 1.0), r"\bF\b.*not stable"),  # undamped rotation
        (lambda: LinearSDE([[-1.0, 0.0], [0.0, 0.3]], 1.0, aux_var=[0.1]), r"\bF\b.*not stable"),
        (lambda: LinearSDE(np.ones((2, 3)), 1.0), r"\bF\b"),
        (lambda: LinearSDE([[-1.0, 1.0], [-1.0, -1.0]], 1.0, aux_var=[-0.1]), r"aux_var"),
        (lambda: LinearSDE([[-1.0]], -1.0), r"sigma"),
        (lambda: get_sde("hold", xi=-1.0), r"xi"),
        (lambda: get_sde("hold", aux_scale=-0.1), r"aux_scale"),
        (lambda: get_sde("hold", alpha=-0.1), r"alpha"),
        (lambda: get_sde("cld", gamma_v=-0.5), r"gamma_v"),
        (lambda: get_sde("cld", friction=-1.0), r"friction"),
        (lambda: get_sde("cld", m_inv=0.0), r"m_inv"),
        (lambda: get_sde("ve"), r"unknown SDE 've'"),
        (lambda: get_sde("hold", order=0), r"order"),
        (lambda: get_sde("hold", order=-2), r"order"),
        (lambda: get_sde("hold", order=2.5), r"order"),
        (lambda: get_sde("hold", order=3, couplings=[1.0]), r"couplings"),
        (lambda: get_sde("vp", bogus=1), r"bogus"),
        (lambda: get_sde("hold", m_inv=4.0), r"m_inv"),
        (lambda: get_sde("vp", eps_loss=2.0), r"eps_loss"),
        (lambda: get_sde("cld", T=-1.0), r"\bT\b"),
    ],
)
def test_bad_parameters_raise(build, word):
    with pytest.raises(ValueError, match=word):
        build()


def test_preset_names_case_insensitive():
    assert get_sde("HOLD").order == 3
    assert set(sde_mod.SDE_NAMES) == {"vp", "cld", "hold"}


# ----------------------------------------------------------------------------- import hygiene


def test_import_does_not_pull_mlx_or_torch():
    code = (
        "import sys\n"
        "import hold_mlx.sde\n"
        "from hold_mlx import get_sde\n"
        "get_sde('hold').perturbation([0.5])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'scipy'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hold_reads_the_old_name_of_aux_scale():
    """Checkpoints written before the rename store HOLD's auxiliary start variance factor as
    "alpha"; they build the same SDE, which writes the new name back."""
    old, new = get_sde("hold", order=3, alpha=0.1), get_sde("hold", order=3, aux_scale=0.1)
    np.testing.assert_array_equal(old.aux_var, new.aux_var)
    assert old.to_config() == new.to_config() and "alpha" not in new.to_config()
    with pytest.raises(ValueError, match="not both"):
        get_sde("hold", alpha=0.1, aux_scale=0.2)

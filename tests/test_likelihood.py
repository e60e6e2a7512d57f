"""Likelihood (hold_mlx.likelihood) on Gaussian data, where the score and the flow are exact.

For data x ~ N(0, C) and auxiliaries started at N(0, aux_var), the extended state stays Gaussian,
so the score of the last block is linear, s(u, t) = -(Lambda_t u)_n, and the probability-flow ODE
is a linear flow u_T = Phi u_t0. The model density is then exactly
    log p(u_t0) = log N(Phi u_t0; 0, Sigma_inf) + log det Phi,
which the tests integrate independently (SciPy DOP853 at rtol 1e-10 on the nd x nd matrix ODE).
The Gaussian score is written in MLX and in torch so the autodiff adapters are exercised.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from hold_mlx.backends import MLXBackend
from hold_mlx.exact import ExactScore, GaussianMixture
from hold_mlx.likelihood import (aux_entropy, bits_per_dim, data_nll, dequantize, evaluate_likelihood,
                                 log_likelihood, score_probe)
from hold_mlx.sde import get_sde

# ----------------------------------------------------------------------------- exact Gaussian model


def precision(sde, cov_data, t) -> np.ndarray:
    """(k, nd, nd) precision of the extended state at times t, blocks major (u = [u_1, ..., u_n])."""
    t = np.atleast_1d(np.asarray(t, np.float64))
    d = cov_data.shape[0]
    a = sde.mean_coeff(t)
    S = sde.stationary_cov()
    Q = a @ sde.initial_cov @ np.swapaxes(a, -1, -2) + S - a @ S @ np.swapaxes(a, -1, -2)
    P = a[:, :, :1] * a[:, None, :, 0]
    return np.linalg.inv(np.stack([np.kron(P[k], cov_data) + np.kron(Q[k], np.eye(d)) for k in range(len(t))]))


class GaussianScore:
    """Exact last-block score of N(0, C) data, as an MLX or torch function of u (differentiable).

    u is (B, ..., n*C) with the blocks on the last axis; C (d x d) is over the flattened block.
    """

    def __init__(self, sde, cov_data, framework="mlx"):
        self.sde, self.cov, self.framework = sde, np.asarray(cov_data, np.float64), framework

    def __call__(self, u, t):
        n, d = self.sde.order, self.cov.shape[0]
        times = np.array(t) if self.framework == "mlx" else t.detach().cpu().numpy()
        M = (-precision(self.sde, self.cov, times)[:, -d:, :]).astype(np.float32)  # (B, d, nd)
        width = u.shape[-1] // n
        flat = u.reshape(u.shape[0], -1, n, width)  # (B, P, n, C)
        if self.framework == "mlx":
            from hold_mlx._mlx import mx

            vec = flat.transpose(0, 2, 1, 3).reshape(u.shape[0], n * d, 1)
            return (mx.array(M) @ vec).reshape(u.shape[:-1] + (width,))
        import torch

        vec = flat.permute(0, 2, 1, 3).reshape(u.shape[0], n * d, 1)
        return (torch.as_tensor(M) @ vec).reshape(u.shape[:-1] + (width,))


def flow_reference(sde, cov_data, u0, t0) -> np.ndarray:
    """log p(u0) of the exact linear flow, integrated with SciPy (u0: (B, n*d) blocks major)."""
    d, n = cov_data.shape[0], sde.order
    nd = n * d
    Fk = np.kron(sde.F, np.eye(d))
    last = np.zeros((nd, nd))
    last[-d:, -d:] = np.eye(d)

    def rhs(t, y):
        A = sde.beta(t) * (Fk + 0.5 * sde.sigma**2 * last @ precision(sde, cov_data, t)[0])
        return np.concatenate([(A @ y[:-1].reshape(nd, nd)).ravel(), [np.trace(A)]])

    sol = solve_ivp(rhs, (t0, sde.T), np.concatenate([np.eye(nd).ravel(), [0.0]]), method="DOP853",
                    rtol=1e-10, atol=1e-12)
    phi, logdet = sol.y[:-1, -1].reshape(nd, nd), sol.y[-1, -1]
    return sde.prior_log_density(np.asarray(u0, np.float64) @ phi.T) + logdet  # checked in test_sde.py


def random_cov(d, rng, scale=0.3) -> np.ndarray:
    a = rng.standard_normal((d, d)) * 0.6 + np.eye(d)
    return scale * (a @ a.T) / d + 0.05 * np.eye(d)


def log_normal(x, cov) -> np.ndarray:
    d = cov.shape[0]
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("bi,ij,bj->b", x, np.linalg.inv(cov), x)
    return -0.5 * (maha + logdet + d * math.log(2 * math.pi))


# ----------------------------------------------------------------------------- the test model itself


def test_gaussian_score_matches_exact_mixture_score():
    """The test's closed-form score agrees with hold_mlx.exact (a one-component mixture)."""
    sde, rng = get_sde("hold"), np.random.default_rng(1)
    cov = random_cov(3, rng)
    u = rng.standard_normal((5, 9))
    t = np.array([1e-3, 0.1, 0.7, 2.0, 4.9])
    ref = ExactScore(sde, GaussianMixture([1.0], np.zeros((1, 3)), cov[None]))(u, t)
    from hold_mlx._mlx import mx

    got = np.array(GaussianScore(sde, cov)(mx.array(u.astype(np.float32)), mx.array(t.astype(np.float32))))
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- extended-state log-density


@pytest.mark.parametrize("name,d", [("vp", 1), ("cld", 2), ("hold", 3)])
def test_extended_log_density_matches_exact_flow(name, d):
    sde, rng = get_sde(name), np.random.default_rng(2)
    cov = random_cov(d, rng)
    u0 = rng.standard_normal((6, sde.order * d)) * 0.7
    ops = MLXBackend()
    got = log_likelihood(sde, GaussianScore(sde, cov), ops.asarray(u0), ops, rtol=1e-6, atol=1e-6)
    ref = flow_reference(sde, cov, u0, sde.eps_loss)
    # RK45 at 1e-6 in float32: measured |error| <= 5e-4 nats; the bound leaves 4x room.
    np.testing.assert_allclose(got.logp, ref, atol=2e-3, rtol=0)
    assert got.nfe > 20  # an adaptive solve, not a degenerate one


def test_torch_adapter_matches_exact_flow():
    torch = pytest.importorskip("torch")
    from hold_mlx.backends import TorchBackend

    sde, rng = get_sde("hold"), np.random.default_rng(3)
    cov = random_cov(2, rng)
    u0 = rng.standard_normal((4, 6)) * 0.7
    ops = TorchBackend()
    got = log_likelihood(sde, GaussianScore(sde, cov, "torch"), ops.asarray(u0), ops, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.logp, flow_reference(sde, cov, u0, sde.eps_loss), atol=2e-3, rtol=0)
    assert torch.is_grad_enabled()  # the adapter must not leave autograd switched off


def test_probe_is_the_quadratic_form_of_the_last_block_jacobian():
    """q = z.(ds/du_n)z; for the linear Gaussian score ds/du_n = -Lambda_t[n, n] exactly."""
    sde, rng = get_sde("cld"), np.random.default_rng(4)
    cov = random_cov(3, rng)
    u = rng.standard_normal((4, 6)).astype(np.float32)
    z = rng.choice([-1.0, 1.0], size=(4, 3)).astype(np.float32)
    t = np.array([0.01, 0.2, 0.5, 0.9])
    jac = -precision(sde, cov, t)[:, -3:, -3:]
    expected = np.einsum("bi,bij,bj->b", z, jac, z)
    ops = MLXBackend()
    _, q = score_probe(GaussianScore(sde, cov), ops, 3)(ops.asarray(u), ops.asarray(t), ops.asarray(z))
    np.testing.assert_allclose(np.array(q), expected, rtol=1e-4, atol=1e-4)


def test_hutchinson_is_unbiased():
    """Averaged over Rademacher probes, the Hutchinson log-density equals the exact-trace one.

    The flow does not depend on the probe here (linear score), so the estimate is
    z.(int J dt)z; its spread over 96 probes gives the standard error of the mean."""
    sde, rng = get_sde("hold"), np.random.default_rng(5)
    cov = random_cov(3, rng, scale=1.0)
    u0 = np.repeat(rng.standard_normal((1, 9)) * 0.7, 96, axis=0)
    probes = rng.choice([-1.0, 1.0], size=(96, 3))
    ops = MLXBackend()
    exact = log_likelihood(sde, GaussianScore(sde, cov), ops.asarray(u0[:1]), ops).logp[0]
    hutch = log_likelihood(sde, GaussianScore(sde, cov), ops.asarray(u0), ops, probes=ops.asarray(probes)).logp
    se = hutch.std(ddof=1) / math.sqrt(len(hutch))
    assert hutch.std() > 1e-3  # non-diagonal Jacobian: the estimator really is random
    assert abs(hutch.mean() - exact) < 4 * se + 2e-3


def test_exact_trace_refuses_high_dimensional_data():
    sde = get_sde("vp")
    ops = MLXBackend()
    with pytest.raises(ValueError, match="hutchinson"):
        log_likelihood(sde, lambda u, t: -u, ops.asarray(np.zeros((1, 300))), ops)


def test_likelihood_needs_an_autodiff_backend():
    from hold_mlx.backends import NumpyBackend

    with pytest.raises(ValueError, match="mlx or torch"):
        score_probe(lambda u, t: u, NumpyBackend(), 1)


# ----------------------------------------------------------------------------- the data bound


@pytest.mark.parametrize("name,d", [("vp", 1), ("hold", 1), ("cld", 2), ("hold", 3)])
def test_data_nll_bound_is_exact_in_expectation(name, d):
    """With the exact score the flow is exact: per draw, -log p(x, aux) - H[aux] equals
    -log p_t0(x, aux) - H, with p_t0 the Gaussian law of the extended state at the start time t0
    (not p_0: by t0 = 1e-5 the diffusion has already added sigma^2 beta t0 to the last block's
    variance, 0.8% of CLD's auxiliary variance, which moves a single draw by ~1e-2 nats). In
    expectation over aux that effect is second order, so the mean over K draws is -log N(x; 0, C)
    with standard error sqrt(d (n-1) / 2 / K) (the spread of -log N(aux), a chi-square)."""
    sde, rng = get_sde(name), np.random.default_rng(6)
    cov = random_cov(d, rng)
    x = rng.multivariate_normal(np.zeros(d), cov, size=1)
    K = 48
    rngs = [np.random.default_rng([7, i]) for i in range(K)]
    ops = MLXBackend()
    nll, _ = data_nll(sde, GaussianScore(sde, cov), np.repeat(x, K, axis=0), ops, rngs, estimator="exact",
                      rtol=1e-6, atol=1e-6)
    target = -log_normal(x, cov)[0]
    n = sde.order
    # Per draw: replay the auxiliary draws (data_nll draws them first, block by block).
    replay = [np.random.default_rng([7, i]) for i in range(K)]
    aux = [np.stack([r.standard_normal((d,)) for r in replay]) * math.sqrt(v) for v in sde.aux_var]
    u0 = np.concatenate([np.repeat(x, K, axis=0)] + aux, axis=1)
    cov_t0 = np.linalg.inv(precision(sde, cov, sde.eps_loss)[0])
    per_draw = -log_normal(u0, cov_t0) - aux_entropy(sde, d)
    np.testing.assert_allclose(nll, per_draw, atol=2e-3, rtol=0)
    se = math.sqrt(d * (n - 1) / 2 / K)
    assert abs(nll.mean() - target) < 4 * se + 5e-3
    if n == 1:
        assert nll.std() < 1e-3  # no auxiliaries: nothing random left


def test_aux_entropy_per_block():
    sde = get_sde("hold", order=3, L_inv=0.5, aux_scale=0.08)
    v = 0.04
    assert aux_entropy(sde, 5) == pytest.approx(2 * 2.5 * (1 + math.log(2 * math.pi * v)))
    assert aux_entropy(get_sde("vp"), 5) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        aux_entropy(get_sde("cld", gamma_v=0.0), 5)


# ----------------------------------------------------------------------------- dequantisation and bits/dim


IMAGE_CFG = {"kind": "image", "shape": [1, 2, 1], "shift": 0.5, "scale": 0.5}


def test_bits_per_dim_of_a_piecewise_constant_density_is_exact():
    """A model density constant on each dequantisation bin, with bin masses P_k, gives the 8-bit
    value k exactly -log2 P_k bits (the dequantisation bound is tight for such densities)."""
    rng = np.random.default_rng(8)
    masses = rng.dirichlet(np.ones(256))
    k = np.array([[0, 255], [17, 128], [200, 3], [90, 90]])
    images = (k / 255.0).reshape(4, 1, 2, 1)
    y = dequantize(images, [np.random.default_rng(i) for i in range(4)])  # [0, 1)
    model = (y - 0.5) / 0.5
    bins = np.floor((model + 1.0) / 2.0 * 256).astype(int).reshape(4, 2)  # bin of each model-space value
    np.testing.assert_array_equal(bins, k)
    nll_model = -np.log(masses[bins] / (2.0 / 256)).sum(1)  # density = mass / bin width (2/256)
    expected = -np.log2(masses[k]).mean(1)
    np.testing.assert_allclose(bits_per_dim(nll_model, IMAGE_CFG), expected, atol=1e-9)


def test_uniform_density_is_eight_bits():
    d = 2
    nll_uniform = np.full(3, d * math.log(2.0))  # U[-1, 1]^2 has density 2^-d
    np.testing.assert_allclose(bits_per_dim(nll_uniform, IMAGE_CFG), 8.0)


def test_images_end_to_end_match_the_dequantised_gaussian():
    """evaluate_likelihood on images: exact Gaussian model in model space, one image evaluated 40
    times (fresh dequantisation, auxiliaries and probes each time) against the closed form
    E_U[-log N(m; 0, C)] with m = 2 (k + U)/256 - 1, in bits/dim."""
    sde, rng = get_sde("hold"), np.random.default_rng(9)
    cfg = {"kind": "image", "shape": [2, 2, 1], "shift": 0.5, "scale": 0.5}
    d = 4
    cov = random_cov(d, rng, scale=0.4)
    k = np.array([40.0, 130.0, 200.0, 250.0])
    images = np.repeat((k / 255.0).reshape(1, 2, 2, 1), 40, axis=0)
    ops = MLXBackend()
    res = evaluate_likelihood(sde, GaussianScore(sde, cov), ops, images, cfg, seed=3, batch_size=20,
                              estimator="exact", rtol=1e-6, atol=1e-6)
    assert res.unit == "bits/dim" and len(res.values) == 40 and len(res.nfe) == 2
    prec = np.linalg.inv(cov)
    mean = 2 * (k + 0.5) / 256 - 1
    var_u = (2 / 256) ** 2 / 12
    nll = 0.5 * (mean @ prec @ mean + var_u * np.trace(prec) + np.linalg.slogdet(cov)[1] + d * math.log(2 * math.pi))
    expected = (nll + d * math.log(0.5) + d * math.log(256)) / (d * math.log(2))
    se = math.sqrt(d * 2 / 2 / 40) / (d * math.log(2))  # auxiliary spread, in bits/dim
    assert abs(res.mean - expected) < 4 * se + 1e-3
    assert res.stderr == pytest.approx(res.values.std(ddof=1) / math.sqrt(40))


def test_results_do_not_depend_on_the_batching():
    sde, rng = get_sde("cld"), np.random.default_rng(10)
    cov = random_cov(2, rng)
    cfg = {"kind": "points", "shape": [2], "shift": [0.0, 1.0], "scale": [2.0, 0.5]}
    pts = rng.standard_normal((5, 2))
    ops = MLXBackend()
    score = GaussianScore(sde, cov)
    a = evaluate_likelihood(sde, score, ops, pts, cfg, seed=1, batch_size=5)
    b = evaluate_likelihood(sde, score, ops, pts, cfg, seed=1, batch_size=2)
    c = evaluate_likelihood(sde, score, ops, pts[3:], cfg, seed=1, first_index=3)
    np.testing.assert_allclose(a.values, b.values, atol=2e-3)
    np.testing.assert_allclose(a.values[3:], c.values, atol=2e-3)
    # points: nats in user units = model-space nats + sum log scale
    np.testing.assert_allclose(a.values, a.nll_model + math.log(2.0) + math.log(0.5))

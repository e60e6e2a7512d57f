"""The training objective: its target is the score of the perturbation kernel, and the MLX loss
reaches its closed-form minimum at the analytic optimum for Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest

from hold_mlx.parameterisation import (ScoreParameterisation, objective_coefficients, perturb, residual,
                                       sample_times)
from hold_mlx.sde import get_sde

PRESETS = [("vp", {}), ("cld", {}), ("hold", {"order": 3}), ("hold", {"order": 4})]
IDS = ["vp", "cld", "hold3", "hold4"]


def linear_map(c, i: int) -> np.ndarray:
    """The matrix M with u = M [x0, eps_1..eps_n] that ``perturb`` applies for sample i."""
    n = c.chol.shape[-1]
    cols = []
    for j in range(n + 1):  # unit inputs: x0 = e_0 or eps_j = e_j, as scalar "blocks"
        x0 = np.array([1.0 if j == 0 else 0.0])
        eps = [np.array([1.0 if j == k + 1 else 0.0]) for k in range(n)]
        blocks = perturb(x0, eps, c.mean[i:i + 1], c.chol[i:i + 1], lambda col: col.reshape(-1))
        cols.append([b[0] for b in blocks])
    return np.array(cols).T  # (n, n + 1)


@pytest.mark.parametrize("name,kw", PRESETS, ids=IDS)
def test_perturbation_has_the_kernel_covariance_and_target(name, kw):
    """u_t = mean x0 + L eps has covariance Sigma_t(data var s^2), and eps_n enters u only
    through u_n with weight ell, so E[-eps_n/ell | u] is the marginal score of the last block."""
    sde = get_sde(name, **kw)
    t = np.array([sde.eps_loss, 1e-3, 0.1 * sde.T, 0.5 * sde.T, sde.T])
    c = objective_coefficients(sde, t, mixed_score=True)
    data_var = 0.7
    for i, ti in enumerate(t):
        M = linear_map(c, i)
        n = sde.order
        cov_u = M @ np.diag([data_var] + [1.0] * n) @ M.T
        start = np.diag([data_var, *sde.aux_var])
        exact = sde.cov(ti, start)
        np.testing.assert_allclose(cov_u, exact, atol=5 * n * sde.numerical_eps, rtol=1e-9)
        # Cov(u, eps_n) = ell e_n: the conditional score of the last block is -eps_n / ell.
        np.testing.assert_allclose(M[:, n], np.eye(n)[-1] * c.chol[i, -1, -1], atol=1e-15)


@pytest.mark.parametrize("name,kw", PRESETS, ids=IDS)
def test_score_scale_inverts_the_residual(name, kw):
    """With alpha = eps_n - mixed u_n (zero residual), score_scale gives exactly -eps_n / ell."""
    sde = get_sde(name, **kw)
    rng = np.random.default_rng(0)
    t = sample_times(sde, rng, 16)
    c = objective_coefficients(sde, t, mixed_score=True)
    u_last, eps_last = rng.standard_normal(16), rng.standard_normal(16)
    alpha = eps_last - c.mixed * u_last
    assert np.allclose(residual(alpha, u_last, eps_last, c.mixed, lambda x: x), 0.0)
    a, b = ScoreParameterisation(sde, {"mixed_score": True}).score_coefficients(t)
    np.testing.assert_allclose(a * alpha + b * u_last, -eps_last / c.chol[:, -1, -1], rtol=1e-12, atol=1e-12)


def test_likelihood_weighting_is_beta_sigma2_over_ell2():
    sde = get_sde("vp")
    t = np.array([0.01, 0.5, 1.0])
    c = objective_coefficients(sde, t, weighting="likelihood")
    np.testing.assert_allclose(c.weight, sde.beta(t) * sde.sigma**2 / c.chol[:, -1, -1] ** 2)
    with pytest.raises(ValueError, match="weighting"):
        objective_coefficients(sde, t, weighting="snr")


@pytest.mark.parametrize("name,kw", PRESETS, ids=IDS)
def test_mlx_loss_minimum_for_gaussian_data(name, kw):
    """For x0 ~ N(0, s^2) the optimal alpha is linear in u and the eps-weighted loss at the optimum
    is 1 - ell^2 (Sigma_u^-1)_nn; shifting alpha by c raises it by c^2 (Monte-Carlo, 4 SE)."""
    from hold_mlx._mlx import mx
    from hold_mlx.train import score_matching_loss

    sde = get_sde(name, **kw)
    n, d, batch, data_var = sde.order, 4, 20_000, 0.5
    t_value = 0.3 * sde.T
    c = objective_coefficients(sde, np.full(batch, t_value)).as_float32()
    cov_u = sde.cov(t_value, np.diag([data_var, *sde.aux_var]))
    prec_last = np.linalg.inv(cov_u)[-1]
    ell = float(c["chol"][0, -1, -1])
    mixed = float(c["mixed"][0])

    def optimal_alpha(shift):
        def model(u, t):
            blocks = [u[..., i * d:(i + 1) * d] for i in range(n)]
            cond_mean = sum(float(ell * prec_last[i]) * blocks[i] for i in range(n))  # E[eps_n | u]
            return cond_mean - mixed * blocks[-1] + shift
        return model

    rng = np.random.default_rng(1)
    x0 = mx.array((np.sqrt(data_var) * rng.standard_normal((batch, d))).astype(np.float32))
    args = [mx.array(c[k]) for k in ("t", "mean", "chol", "mixed", "weight")]
    key = mx.random.key(7)
    best = score_matching_loss(optimal_alpha(0.0), n, x0, key, *args).item()
    shifted = score_matching_loss(optimal_alpha(0.2), n, x0, key, *args).item()
    expected = 1.0 - ell**2 * prec_last[-1]
    se = expected * np.sqrt(2.0 / (batch * d))  # residuals are Gaussian: Var(r^2) = 2 var^2
    assert abs(best - expected) < 4 * se + 1e-6, (best, expected, se)
    assert abs((shifted - best) - 0.04) < 4 * 0.4 * np.sqrt(expected / (batch * d)) + 1e-6

"""Tests for the gddim sampler and its float64 coefficients (sde.gddim_steps).

Evidence that does not read numbers off the code under test: an RK4 solve of the linear ODE
for the transition, the SDE's own kernel (mean and covariance) for the weights and the noise, the
closed-form posterior variance of Gaussian data for the order of convergence (exact output
covariance from probe noise, no Monte-Carlo), a one-point data law for exactness, other backends.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from hold_mlx.api import sample_full
from hold_mlx.exact import ExactScore, ring_mixture
from hold_mlx.backends import NumpyBackend
from hold_mlx.noise import PortableNoise
from hold_mlx.samplers import GRIDS, run_sampler, time_grid
from hold_mlx.sde import accurate_cov, data_prediction_terms, gddim_steps, get_sde, log_noise_scale

from test_samplers import CountingScore, gaussian_score, mlx_score, probe_covariance  # noqa: E402

CASES = {"vp": ("vp", {}), "cld": ("cld", {}), "hold3": ("hold", {"order": 3}), "hold4": ("hold", {"order": 4})}


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        yield


@functools.lru_cache(maxsize=None)
def make_sde(case):
    name, kw = CASES[case]
    return get_sde(name, **kw)


# ----------------------------------------------------------------------------- coefficients


def rk4_transition(sde, t0, t1, k_coef, steps=4000):
    """Psi(t1, t0) of du/dB = (F + k sigma^2 e_n (Sigma_t^-1)_{n,:}) u by classical RK4 in t."""
    n = sde.order

    def M(t):
        return sde.beta(t) * (sde.F + k_coef * np.outer(sde.G, sde.G) @ np.linalg.inv(accurate_cov(sde, t)))

    X, h = np.eye(n), (t1 - t0) / steps
    for i in range(steps):
        t = t0 + i * h
        a = M(t) @ X
        b = M(t + h / 2) @ (X + h / 2 * a)
        c = M(t + h / 2) @ (X + h / 2 * b)
        d = M(t + h) @ (X + h * c)
        X = X + h / 6 * (a + 2 * b + 2 * c + d)
    return X


@pytest.mark.parametrize("case", ["vp", "cld", "hold3"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_transition_matches_an_rk4_solve(case, eta):
    sde = make_sde(case)
    t0, t1 = 0.6 * sde.T, 0.45 * sde.T  # away from t = 0, where RK4 would need tiny steps
    step = gddim_steps(sde, [t0, t1], order=1, eta=eta)[0]
    ref = rk4_transition(sde, t0, t1, 0.5 * (1 + eta**2), steps=400)
    np.testing.assert_allclose(step.transition, ref, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_coefficients_carry_the_kernel(case, eta):
    """A one-point law at 0 stays N(0, Sigma_t) (zero x0_hat), and one at 1 keeps its mean mu_t
    (x0_hat = 1, the weights of all extrapolation points sum to the one-step weight)."""
    sde = make_sde(case)
    ts = time_grid(sde, 6, "quadratic")
    for order in (1, 2, 3):
        steps = gddim_steps(sde, ts, order=order, eta=eta)
        for k, step in enumerate(steps):
            c0, c1 = accurate_cov(sde, ts[k]), accurate_cov(sde, ts[k + 1])
            moved = step.transition @ c0 @ step.transition.T
            if step.noise_factor is not None:
                moved = moved + step.noise_factor @ step.noise_factor.T
            whiten = np.linalg.inv(np.linalg.cholesky(c1))
            tol = 3e-3 if case == "hold4" else 1e-6  # hold4: Sigma_eps has condition number ~1e7
            np.testing.assert_allclose(whiten @ moved @ whiten.T, np.eye(sde.order), atol=tol)
            mu0, mu1 = sde.mean_coeff(ts[k])[:, 0], sde.mean_coeff(ts[k + 1])[:, 0]
            np.testing.assert_allclose(step.transition @ mu0 + step.weights.sum(0), mu1, atol=1e-8)
            assert len(step.weights) == min(order, k + 1)
        for k, step in enumerate(gddim_steps(sde, ts, order=order, eta=eta, corrector=True)):
            mu0, mu1 = sde.mean_coeff(ts[k])[:, 0], sde.mean_coeff(ts[k + 1])[:, 0]
            np.testing.assert_allclose(step.transition @ mu0 + step.corrector.sum(0), mu1, atol=1e-8)
            assert len(step.corrector) == min(order, k + 1) + 1
        if eta == 0.0:
            assert all(s.noise_factor is None for s in steps)
        else:  # noise only where the SDE injects it: more for larger eta
            assert all(np.abs(s.noise_factor).max() > 0 for s in steps)


def test_data_prediction_is_tweedie():
    """x0_hat from the last block's score equals the posterior mean of x0 (Gaussian data, where it
    is a closed form): E[x0 | u] = v mu^T (Sigma + v mu mu^T)^-1 u."""
    sde, v = make_sde("cld"), 0.3
    score = gaussian_score(sde, [v])
    rng = np.random.default_rng(0)
    for t in (sde.eps_sample, 0.05, 0.5):
        u = rng.standard_normal((5, sde.order))
        row, scale = data_prediction_terms(sde, t)
        x0 = scale[0] * (score(u, np.full(5, t))[:, 0] + u @ row[0])
        mu, cov = sde.mean_coeff(t)[:, 0], accurate_cov(sde, t)
        expected = u @ np.linalg.solve(cov + v * np.outer(mu, mu), v * mu)
        np.testing.assert_allclose(x0, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", list(CASES))
def test_noise_scale_grids_are_monotone(case):
    sde = make_sde(case)
    lam = log_noise_scale(sde, np.geomspace(sde.eps_sample, sde.T, 3000))
    assert np.all(np.diff(lam) > 0)
    for grid in GRIDS + ("power-2.5", "power-10"):
        ts = time_grid(sde, 12, grid)
        assert ts[0] == sde.T and ts[-1] == sde.eps_sample and np.all(np.diff(ts) < 0)
    steps = np.diff(log_noise_scale(sde, time_grid(sde, 12, "log-sigma")))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-3)  # uniform in log sigma_eff


def test_power_grids():
    """power-R: t_k = T - (T - eps) (1 - (1 - k/N)^R); power-1 is uniform and power-2 quadratic."""
    sde = make_sde("cld")
    np.testing.assert_array_equal(time_grid(sde, 7, "power-1"), time_grid(sde, 7, "uniform"))
    np.testing.assert_array_equal(time_grid(sde, 7, "power-2.0"), time_grid(sde, 7, "quadratic"))
    k = np.arange(8) / 7
    expected = sde.T - (sde.T - sde.eps_sample) * (1 - (1 - k) ** 2.5)
    np.testing.assert_allclose(time_grid(sde, 7, "power-2.5"), expected, rtol=1e-12)
    for bad in ("power-0.5", "power-11", "power-", "power-nan", "power-inf", "cubic", "Quadratic"):
        with pytest.raises(ValueError, match=r"unknown time grid .* or power-R with R in \[1, 10\]"):
            time_grid(sde, 7, bad)


# ----------------------------------------------------------------------------- exactness and order


def dirac_score(sde, x0):
    """Exact last-block score of the law delta_{x0} (per data dimension): -(Sigma_t^-1 (u - mu_t x0))_n."""

    def score(u, t):
        t0 = float(np.asarray(t).reshape(-1)[0])
        n, d = sde.order, len(x0)
        blocks = u.reshape(len(u), n, d)
        resid = blocks - sde.mean_coeff(t0)[:, 0][None, :, None] * x0[None, None, :]
        row = np.linalg.inv(accurate_cov(sde, t0))[-1]
        return -np.einsum("n,bnd->bd", row, resid)

    return score


@pytest.mark.parametrize("case", ["vp", "cld", "hold3"])
@pytest.mark.parametrize("order,eta,corrector", [(1, 0.0, False), (3, 0.0, False), (2, 1.0, False),
                                                 (2, 0.0, True), (1, 0.5, True)])
def test_one_point_law_is_exact(case, order, eta, corrector):
    """With the exact score of delta_{x0} every step is the exact map: after 1 to 3 steps the state
    is N(mu_t x0, Sigma_t) (whitened residuals have identity covariance; for eta = 0 the map is
    deterministic, the same as the exact flow) and the output is x0."""
    sde = make_sde(case)
    x0 = np.array([0.7, -1.2])
    states = []
    # float64: the score of a point law near t = 0 is -(Sigma^-1 (u - mu x0))_n with entries ~1e7
    res = run_sampler(sde, dirac_score(sde, x0), (4000, 2), ops=NumpyBackend(np.float64),
                      noise=PortableNoise(3, np.arange(4000)), sampler="gddim", steps=3, order=order, eta=eta,
                      corrector=corrector, callback=lambda k, t, u: states.append((t, np.array(u))))
    np.testing.assert_allclose(res.x, np.broadcast_to(x0, res.x.shape), atol=1e-6)
    for t, u in states:
        resid = u.reshape(len(u), sde.order, 2) - sde.mean_coeff(t)[:, 0][None, :, None] * x0[None, None, :]
        white = np.einsum("ij,bjd->bid", np.linalg.inv(np.linalg.cholesky(accurate_cov(sde, t))), resid)
        flat = white.transpose(0, 2, 1).reshape(-1, sde.order)
        np.testing.assert_allclose(flat.T @ flat / len(flat), np.eye(sde.order), atol=0.08)
        np.testing.assert_allclose(flat.mean(0), 0.0, atol=0.05)


def output_variance_error(sde, v, steps, order, corrector=False):
    """|Var(output) - Var(E[x0 | u_eps])| for data N(0, v): the exact target is v minus the
    posterior variance 1 / (1/v + mu^T Sigma^-1 mu) at eps (the final call returns x0_hat)."""
    cov = probe_covariance(sde, [v], "gddim", steps, order=order, grid="quadratic", corrector=corrector)[0, 0]
    eps = sde.eps_sample
    mu = sde.mean_coeff(eps)[:, 0]
    info = mu @ np.linalg.solve(accurate_cov(sde, eps), mu)
    return abs(cov - (v - 1.0 / (1.0 / v + info)))


@pytest.mark.parametrize("case", ["vp", "cld", "hold3"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_of_convergence_on_gaussian_data(case, order):
    """Halving the step divides the output covariance error by about 2^order."""
    sde = make_sde(case)
    grids = (20, 40, 80) if order == 3 else (40, 80, 160)  # in the asymptotic range, above quadrature error
    errs = [output_variance_error(sde, 0.4, n, order) for n in grids]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert errs[-1] < 0.1 * 0.4 ** order
    assert np.all(np.abs(rates - order) < 0.4), (errs, rates)


@pytest.mark.parametrize("case", ["vp", "cld", "hold3"])
@pytest.mark.parametrize("order", [1, 2])
def test_the_corrector_raises_the_order_by_one(case, order):
    """The corrector's interpolation through the new call makes order q an order q + 1 method."""
    sde = make_sde(case)
    grids = (40, 80, 160) if order == 1 else (20, 40, 80)  # order 2 + 1 meets the quadrature floor sooner
    errs = [output_variance_error(sde, 0.4, n, order, corrector=True) for n in grids]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(rates - (order + 1)) < 0.4), (errs, rates)


# ----------------------------------------------------------------------------- NFE, backends, options


@pytest.mark.parametrize("order,corrector", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_nfe_is_steps_plus_one(order, eta, corrector):
    sde = make_sde("hold3")
    score = CountingScore(ExactScore(sde, ring_mixture()))
    res = sample_full(sde, score, (5, 2), sampler="gddim", steps=7, backend="numpy", seed=1, order=order, eta=eta,
                      corrector=corrector)
    assert res.nfe == len(score.calls) == 8
    ts = time_grid(sde, 7, "quadratic")  # gddim's default grid
    np.testing.assert_allclose([t[0] for _, t in score.calls], ts, rtol=1e-6)
    plain = sample_full(sde, CountingScore(score.fn), (5, 2), sampler="gddim", steps=7, backend="numpy", seed=1,
                        order=order, eta=eta, corrector=corrector, denoise=False)
    assert plain.nfe == 7


@pytest.mark.parametrize("eta,corrector", [(0.0, False), (0.7, False), (0.7, True)])
def test_mlx_and_torch_match_numpy(eta, corrector):
    sde = make_sde("cld")
    score = ExactScore(sde, ring_mixture())
    run = functools.partial(sample_full, sde, sampler="gddim", steps=9, seed=4, order=3, eta=eta, corrector=corrector)
    ref = run(score, (6, 2), backend="numpy").x
    if pytest.importorskip("mlx.core"):
        whole = np.array(run(mlx_score(score), (6, 2), backend="mlx").x)
        parts = np.concatenate([np.array(run(mlx_score(score), (3, 2), backend="mlx").x),
                                np.array(run(mlx_score(score), (3, 2), backend="mlx", first_index=3).x)])
        np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")
    torch_score = lambda u, t: torch.as_tensor(score(u.numpy(), t.numpy()))  # noqa: E731
    out = run(torch_score, (6, 2), backend="torch").x
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options,message", [
    ({"order": 0}, "order must be 1, 2 or 3"),
    ({"order": 4}, "order must be 1, 2 or 3"),
    ({"order": 1.5}, "order must be 1, 2 or 3"),
    ({"eta": -0.1}, r"eta must be a number in \[0, 1\]"),
    ({"eta": 1.5}, r"eta must be a number in \[0, 1\]"),
    ({"eta": float("nan")}, r"eta must be a number in \[0, 1\]"),
    ({"corrector": "yes"}, "corrector must be True or False"),
    ({"substeps": 3}, "has no option 'substeps'"),
])
def test_bad_options_are_refused(options, message):
    sde = make_sde("vp")
    with pytest.raises(ValueError, match=message) as info:
        sample_full(sde, gaussian_score(sde, [1.0]), (2, 1), sampler="gddim", steps=3, backend="numpy", **options)
    assert "\n" not in str(info.value)

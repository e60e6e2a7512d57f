"""Tests for hold_mlx.samplers: every sampler against the math of docs/math.md §4, with exact scores.

Three kinds of evidence, none of which reads a number off the code under test:
- Gaussian data, no Monte-Carlo noise. With a linear score every sampler except AMS and RK45 is an
  affine map of the Gaussian draws, so running it on a batch of unit impulses ("probe noise")
  gives its exact output covariance. That covariance must equal an independent propagation of
  covariances through the update rules written out here from docs/math.md (SciPy expm and Lyapunov
  solver); the propagation then shows convergence to the exact reverse process (a SciPy ODE
  solve of the covariance) at the expected order, and that limit matches the data covariance.
- Gaussian mixtures (2-D ring): unbiased MMD^2 against fresh data samples, compared with its
  Monte-Carlo spread between two independent data sets.
- Re-implementations in the test of PLMC and AMS straight from docs/math.md, driven by the same noise.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.integrate import solve_ivp

from hold_mlx.api import sample_full
from hold_mlx.backends import NumpyBackend, get_backend
from hold_mlx.exact import ExactScore, GaussianMixture, median_distance, ring_mixture, sliced_wasserstein
from hold_mlx.metrics import gaussian_kernel, mmd2_unbiased
from hold_mlx.noise import PortableNoise
from hold_mlx.samplers import SAMPLERS, resolve_sampler, run_sampler, time_grid
from hold_mlx.sde import get_sde

@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Tiny LAPACK calls (3 x 3 expm, solves) are ~100x slower with two BLAS threads competing
    for two busy cores; every matrix here is small, so one thread is also the fastest."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):
        yield


CASES = {"vp": ("vp", {}), "cld": ("cld", {}), "hold3": ("hold", {"order": 3}), "hold4": ("hold", {"order": 4})}
# Every sampler and variant, with the options that select it.
VARIANTS = {
    "lie-trotter": ("lie-trotter", {}),
    "strang": ("strang", {}),
    "euler-maruyama": ("euler-maruyama", {}),
    "exp-euler": ("exp-euler", {}),
    "heun": ("ode", {"method": "heun"}),
    "exp-heun": ("ode", {"method": "exp-heun"}),
    "rk45": ("ode", {"method": "rk45"}),
    "pm-bernoulli": ("poisson-midpoint", {"substeps": 4, "variant": "bernoulli"}),
    "pm-one": ("poisson-midpoint", {"substeps": 4, "variant": "one"}),
    "ams": ("ams", {}),
}
AFFINE = ("lie-trotter", "strang", "euler-maruyama", "exp-euler", "heun", "exp-heun")  # affine in the noise


@functools.lru_cache(maxsize=None)
def make_sde(case: str):
    name, kw = CASES[case]
    return get_sde(name, **kw)


def gaussian_score(sde, variances):
    d = len(variances)
    mix = GaussianMixture([1.0], np.zeros((1, d)), np.diag(variances)[None])
    return ExactScore(sde, mix)


# ----------------------------------------------------------------------------- probe noise


class ProbeNoise:
    """Noise whose row r is a unit impulse on the r-th scalar of everything drawn in a run.

    For an affine sampler with zero-mean data, output row r is then column r of the map from all
    Gaussian inputs (prior included) to the sample, so X^T X is the exact output covariance.
    """

    kind = "probe"

    def __init__(self, rows: int, seed: int = 0):
        self.rows, self.offset = rows, 0
        self.shared = np.random.default_rng(seed)

    @property
    def batch(self) -> int:
        return self.rows

    def normal(self, ops, shape):
        size = int(np.prod(shape))
        out = np.zeros((self.rows, size))
        hit = np.arange(self.rows) - self.offset
        ok = (hit >= 0) & (hit < size)
        out[np.nonzero(ok)[0], hit[ok]] = 1.0
        self.offset += size
        return ops.asarray(out.reshape((self.rows, *shape)))


def probe_covariance(sde, variances, sampler, steps, **options):
    """Exact covariance of the sampler's output (d x d) for data N(0, diag(variances))."""
    score = gaussian_score(sde, variances)
    ops = NumpyBackend(np.float64)
    counter = ProbeNoise(1)
    d = len(variances)
    run_sampler(sde, score, (1, d), ops=ops, noise=counter, sampler=sampler, steps=steps, **options)
    rows = counter.offset
    x = run_sampler(sde, score, (rows, d), ops=ops, noise=ProbeNoise(rows), sampler=sampler, steps=steps,
                    **options).x
    return x.T @ x


# ----------------------------------------------------------------------------- independent covariance propagation


class GaussianReference:
    """docs/math.md §4 update rules as n x n covariance maps for one data dimension of variance c.

    Built from F, sigma, B(t) and the time grid formula alone: SciPy gives expm and Sigma_inf.
    """

    def __init__(self, sde, c: float):
        self.sde, self.c = sde, c
        n = sde.order
        self.n, self.F, self.sig2 = n, sde.F, sde.sigma**2
        self.Enn = np.zeros((n, n))
        self.Enn[-1, -1] = 1.0
        self.S = sla.solve_continuous_lyapunov(self.F, -self.sig2 * self.Enn)
        self.Sinv = np.linalg.inv(self.S)
        self.Ft = self.S @ self.F.T @ self.Sinv
        self.S0 = np.diag([c, *sde.aux_var])

    def grid(self, steps, kind):
        k = np.arange(steps + 1) / steps
        tau = k if kind == "uniform" else 1 - (1 - k) ** 2
        return self.sde.T - (self.sde.T - self.sde.eps_sample) * tau

    @functools.lru_cache(maxsize=None)
    def score_row(self, t):  # s = r u for the exact Gaussian score of the last block
        A = sla.expm(self.F * self.sde.B(t))
        cov = self.S + A @ (self.S0 - self.S) @ A.T
        return -np.linalg.inv(cov)[-1]

    def lin(self, cov, t0, t1):  # exact OU flow of the linear part
        E = sla.expm(self.Ft * (self.sde.B(t0) - self.sde.B(t1)))
        return E @ cov @ E.T + self.S - E @ self.S @ E.T

    def kick(self, cov, t_score, t0, t1):  # u_n += dB sigma^2 (s + (S^-1 u)_n)
        K = np.eye(self.n)
        K[-1] += (self.sde.B(t0) - self.sde.B(t1)) * self.sig2 * (self.score_row(t_score) + self.Sinv[-1])
        return K @ cov @ K.T

    def reverse_drift(self, t):  # per unit of B: -F + sigma^2 e_n r_t
        return -self.F + self.sig2 * np.outer(np.eye(self.n)[-1], self.score_row(t))

    def step(self, sampler, cov, t0, t1):
        dB = self.sde.B(t0) - self.sde.B(t1)
        if sampler == "lie-trotter":
            return self.kick(self.lin(cov, t0, t1), t1, t0, t1)
        if sampler == "exp-euler":
            return self.lin(self.kick(cov, t0, t0, t1), t0, t1)
        if sampler == "strang":
            tm = 0.5 * (t0 + t1)
            return self.lin(self.kick(self.lin(cov, t0, tm), tm, t0, t1), tm, t1)
        if sampler == "euler-maruyama":
            M = np.eye(self.n) + dB * self.reverse_drift(t0)
            return M @ cov @ M.T + dB * self.sig2 * self.Enn
        if sampler == "heun":  # forward-time Heun on du/dt = J(t) u
            h = t1 - t0
            J0, J1 = self.ode_jacobian(t0), self.ode_jacobian(t1)
            M = np.eye(self.n) + 0.5 * h * (J0 + J1 @ (np.eye(self.n) + h * J0))
            return M @ cov @ M.T
        if sampler == "exp-heun":  # ETD2RK in reverse time with the linear part -F - G G^T S^-1 / 2
            h = dB
            Lin = -self.F - 0.5 * self.sig2 * self.Enn @ self.Sinv
            Ez, phi = sla.expm(Lin * h), lambda k: _phi(Lin * h, k)
            b0 = self.score_row(t0) + self.Sinv[-1]
            b1 = self.score_row(t1) + self.Sinv[-1]
            N0 = 0.5 * self.sig2 * np.outer(np.eye(self.n)[-1], b0)
            N1 = 0.5 * self.sig2 * np.outer(np.eye(self.n)[-1], b1)
            A = Ez + h * phi(1) @ N0  # a = E u + h phi1 N(u)
            M = A + h * phi(2) @ (N1 @ A - N0)  # u1 = a + h phi2 (N(a) - N(u))
            return M @ cov @ M.T
        raise AssertionError(sampler)

    def ode_jacobian(self, t):  # probability flow: du/dt = beta (F - sigma^2/2 e_n r_t) u
        return self.sde.beta(t) * (self.F - 0.5 * self.sig2 * np.outer(np.eye(self.n)[-1], self.score_row(t)))

    def denoise(self, cov):
        eps = self.sde.eps_sample
        D = np.eye(self.n) + self.sde.B(eps) * self.reverse_drift(eps)
        return D @ cov @ D.T

    def run(self, sampler, steps, grid):
        ts = self.grid(steps, grid)
        cov = self.S.copy()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            cov = self.step(sampler, cov, t0, t1)
        return self.denoise(cov)[0, 0]

    def limit(self, ode: bool):
        """The sampler's steps -> infinity limit: the exact reverse SDE (or probability-flow ODE)
        from N(0, Sigma_inf) at T down to eps_sample, then the denoising step."""
        n = self.n

        def rhs(t, y):
            cov = y.reshape(n, n)
            if ode:
                J = self.ode_jacobian(t)
                d = J @ cov + cov @ J.T
            else:  # d/dt of the reverse-time Lyapunov equation, t decreasing
                A = self.sde.beta(t) * self.reverse_drift(t)
                d = -(A @ cov + cov @ A.T + self.sde.beta(t) * self.sig2 * self.Enn)
            return d.ravel()

        sol = solve_ivp(rhs, (self.sde.T, self.sde.eps_sample), self.S.ravel(), method="LSODA",
                        rtol=1e-10, atol=1e-13)
        return self.denoise(sol.y[:, -1].reshape(n, n))[0, 0]


def _phi(A, k):
    """phi_k(A) = sum_j A^j / (j + k)!, the top-right block of SciPy's expm of
    [[A, I, 0, ...], [0, 0, I, ...], ..., [0, ..., 0]] ((k + 1) x (k + 1) blocks)."""
    n = len(A)
    big = np.zeros(((k + 1) * n, (k + 1) * n))
    big[:n, :n] = A
    for i in range(k):
        big[i * n:(i + 1) * n, (i + 1) * n:(i + 2) * n] = np.eye(n)
    return sla.expm(big)[:n, k * n:]


VARIANCES = (0.05, 0.5)


@functools.lru_cache(maxsize=None)
def exact_limit(case: str, c: float, ode: bool) -> float:
    return GaussianReference(make_sde(case), c).limit(ode)


@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
@pytest.mark.parametrize("sampler", AFFINE)
@pytest.mark.parametrize("case", ["vp", "cld", "hold3", "hold4"])
def test_affine_samplers_match_the_update_rules_exactly(case, sampler, grid):
    """The code's exact output covariance (probe noise) equals the propagation of docs/math.md's rules."""
    sde = make_sde(case)
    name, options = VARIANTS[sampler]
    steps = 7
    cov = probe_covariance(sde, VARIANCES, name, steps, grid=grid, **options)
    expected = [GaussianReference(sde, c).run(sampler, steps, grid) for c in VARIANCES]
    np.testing.assert_allclose(np.diag(cov), expected, rtol=1e-8)
    assert abs(cov[0, 1]) < 1e-10 * np.sqrt(cov[0, 0] * cov[1, 1])  # the dimensions stay independent


@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
@pytest.mark.parametrize("sampler", AFFINE)
@pytest.mark.parametrize("case", ["vp", "cld", "hold3", "hold4"])
def test_affine_samplers_converge_to_the_exact_reverse_process(case, sampler, grid):
    """Error in the output variance -> 0 as steps grow, at order >= 0.8 (Euler-type splittings and
    EM are first order) or >= 1.7 (Heun is second order); the limit is the data variance up to the
    prior mismatch at T and the eps_sample / denoising bias (below 1% here)."""
    c = VARIANCES[0]
    ref = GaussianReference(make_sde(case), c)
    limit = exact_limit(case, c, sampler in ("heun", "exp-heun"))
    assert abs(limit - c) < 0.01 * c
    steps = (100, 400, 1600) if "heun" in sampler else (50, 200, 800)  # Heun: past its pre-asymptotic range
    errors = [abs(ref.run(sampler, n, grid) - limit) / limit for n in steps]
    order = np.log(errors[1] / errors[2]) / np.log(4)
    assert errors[2] < min(errors[:2]), errors  # (at 50 steps Heun's error may still change sign)
    assert order >= (1.7 if "heun" in sampler else 0.8), (errors, order)
    assert errors[2] < 0.05, errors


def test_probe_covariance_agrees_with_monte_carlo():
    """The probe trick is sound: real Gaussian noise gives the same variance within MC error."""
    sde = make_sde("hold3")
    cov = probe_covariance(sde, VARIANCES, "lie-trotter", 10)
    n = 6000
    x = sample_full(sde, gaussian_score(sde, VARIANCES), (n, 2), sampler="lie-trotter", steps=10,
                    backend="numpy", seed=3).x
    # The sample variance of n Gaussian draws has relative standard error sqrt(2 / (n - 1)).
    rel = np.var(np.asarray(x, dtype=np.float64), axis=0, ddof=1) / np.diag(cov) - 1
    assert np.all(np.abs(rel) < 4 * np.sqrt(2 / (n - 1))), rel


# ----------------------------------------------------------------------------- mixtures: MMD against data


N_MIX = 800
MIX_STEPS = {"few": 3, "many": 200}


@functools.lru_cache(maxsize=None)
def ring_setup():
    mix = ring_mixture()
    h = median_distance(mix.sample(2000, np.random.default_rng(100)))
    bandwidths = tuple(h * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1))
    data = mix.sample(N_MIX, np.random.default_rng(101))
    # Null spread: MMD^2 between independent data sets of the same sizes.
    null = [mmd2_unbiased(mix.sample(N_MIX, np.random.default_rng(200 + i)), data, gaussian_kernel,
                          bandwidths=bandwidths) for i in range(24)]
    return mix, bandwidths, data, float(np.std(null)), float(np.mean(null))


def mixture_mmd(case, sampler, steps, **extra):
    mix, bandwidths, data, _, _ = ring_setup()
    sde = make_sde(case)
    name, options = VARIANTS[sampler]
    options = {**options, **extra}
    if sampler == "rk45":  # steps do not apply; the tolerance plays their part
        tol = 0.3 if steps == MIX_STEPS["few"] else 1e-4
        options.update(rtol=tol, atol=tol)
    x = sample_full(sde, ExactScore(sde, mix), (N_MIX, 2), sampler=name, steps=steps, backend="numpy",
                    grid="quadratic", seed=7, noise="native", **options).x
    assert np.all(np.isfinite(x))
    return mmd2_unbiased(x, data, gaussian_kernel, bandwidths=bandwidths)


def check_mixture_convergence(case, sampler):
    _, _, _, null_std, null_mean = ring_setup()
    # In 2-D a per-sample |s| can be ~0 and AMS's step explode (see samplers.ams): use the
    # batch-averaged norms of score_sde and the AMS code here.
    extra = {"norms": "batch"} if sampler == "ams" else {}
    few = mixture_mmd(case, sampler, MIX_STEPS["few"], **extra)
    many = mixture_mmd(case, sampler, MIX_STEPS["many"], **extra)
    # 4 null standard deviations: the null of unbiased MMD^2 is centred at ~0 (checked below).
    assert abs(null_mean) < 2 * null_std
    assert many < 4 * null_std, f"{many / null_std:.1f} null std at {MIX_STEPS['many']} steps"
    assert few > many + 4 * null_std, f"few {few / null_std:.1f}, many {many / null_std:.1f} null std"


@pytest.mark.parametrize("sampler", list(VARIANTS))
def test_every_sampler_converges_on_a_mixture_hold3(sampler):
    check_mixture_convergence("hold3", sampler)


@pytest.mark.parametrize("case", ["vp", "cld", "hold4"])
def test_lie_trotter_converges_on_a_mixture(case):
    check_mixture_convergence(case, "lie-trotter")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [s for s in VARIANTS if s != "lie-trotter"])
@pytest.mark.parametrize("case", ["vp", "cld", "hold4"])
def test_every_sampler_converges_on_a_mixture(case, sampler):
    check_mixture_convergence(case, sampler)


# ----------------------------------------------------------------------------- NFE accounting


class CountingScore:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, u, t):
        self.calls.append((u.shape[0], np.array(t, dtype=np.float64)))
        return self.fn(u, t)


@pytest.mark.parametrize("sampler", list(VARIANTS))
def test_nfe_is_the_number_of_batched_calls(sampler):
    sde = make_sde("hold3")
    name, options = VARIANTS[sampler]
    score = CountingScore(ExactScore(sde, ring_mixture()))
    B, N = 5, 6
    res = sample_full(sde, score, (B, 2), sampler=name, steps=N, backend="numpy", seed=1, **options)
    assert res.nfe == len(score.calls)
    assert res.evals == pytest.approx(sum(rows for rows, _ in score.calls) / B)
    ts = time_grid(sde, N)
    times = [t for _, t in score.calls]
    assert score.calls[-1][0] == B  # the denoising call, at eps (times reach the score in float32)
    np.testing.assert_allclose(times[-1], ts[-1], rtol=1e-6)
    if sampler in ("lie-trotter", "strang", "euler-maruyama", "exp-euler"):
        assert res.nfe == N + 1
        where = {"lie-trotter": ts[1:], "exp-euler": ts[:-1], "euler-maruyama": ts[:-1],
                 "strang": 0.5 * (ts[:-1] + ts[1:])}[sampler]
        np.testing.assert_allclose([t[0] for t in times[:-1]], where, rtol=1e-6)
    elif sampler in ("heun", "exp-heun"):
        assert res.nfe == 2 * N + 1
    elif sampler == "ams":
        assert res.nfe == 2 * N + 1
    elif sampler.startswith("pm"):
        # one call for b0 per step, plus at most one batched call for all picked midpoints
        rows = [r for r, _ in score.calls[:-1]]
        assert N + 1 <= res.nfe <= 2 * N + 1
        assert all(r % B == 0 and r <= 3 * B for r in rows)
        if sampler == "pm-one":
            assert max(rows) == B  # exactly one midpoint at a time
    elif sampler == "rk45":
        assert (res.nfe - 2) % 6 == 0  # first evaluation + 6 per attempt (FSAL) + denoising
    no_denoise = sample_full(sde, CountingScore(score.fn), (B, 2), sampler=name, steps=N, backend="numpy",
                             seed=1, denoise=False, **options)
    assert no_denoise.nfe == res.nfe - 1


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("sampler", list(VARIANTS))
def test_same_seed_same_samples_whatever_the_batch(sampler):
    sde = make_sde("cld")
    name, options = VARIANTS[sampler]
    score = ExactScore(sde, ring_mixture())
    run = functools.partial(sample_full, sde, score, sampler=name, steps=5, backend="numpy", seed=11, **options)
    whole = run((6, 2)).x
    np.testing.assert_array_equal(whole, run((6, 2)).x)
    parts = np.concatenate([run((2, 2)).x, run((4, 2), first_index=2).x])
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)
    other = run((6, 2), seed=12).x
    assert np.abs(other - whole).max() > 1e-2


def mlx_score(score):
    import mlx.core as mx

    return lambda u, t: mx.array(score(np.array(u), np.array(t)))


@pytest.mark.parametrize("sampler", ["lie-trotter", "pm-bernoulli", "ams", "rk45"])
def test_mlx_matches_numpy_and_ignores_the_batch(sampler):
    pytest.importorskip("mlx.core")
    sde = make_sde("hold3")
    name, options = VARIANTS[sampler]
    score = ExactScore(sde, ring_mixture())
    ref = sample_full(sde, score, (6, 2), sampler=name, steps=8, backend="numpy", seed=5, **options).x
    run = functools.partial(sample_full, sde, mlx_score(score), sampler=name, steps=8, backend="mlx", seed=5,
                            **options)
    whole = np.array(run((6, 2)).x)
    parts = np.concatenate([np.array(run((3, 2)).x), np.array(run((3, 2), first_index=3).x)])
    np.testing.assert_allclose(whole, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    sde = make_sde("cld")
    score = ExactScore(sde, ring_mixture())
    ref = sample_full(sde, score, (4, 2), steps=8, backend="numpy", seed=2).x
    torch_score = lambda u, t: torch.as_tensor(score(u.numpy(), t.numpy()))  # noqa: E731
    out = sample_full(sde, torch_score, (4, 2), steps=8, backend="torch", seed=2).x
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- Poisson midpoint and AMS


def float64_run(sde, score, sampler, steps, shape, seed=0, **options):
    noise = PortableNoise(seed, np.arange(shape[0]))
    return run_sampler(sde, score, shape, ops=NumpyBackend(np.float64), noise=noise, sampler=sampler, steps=steps,
                       **options).x


@pytest.mark.parametrize("variant", ["bernoulli", "one"])
@pytest.mark.parametrize("case", ["vp", "hold3"])
def test_poisson_midpoint_with_one_substep_is_the_fine_chain(case, variant):
    sde = make_sde(case)
    score = ExactScore(sde, ring_mixture())
    pm = float64_run(sde, score, "poisson-midpoint", 9, (5, 2), substeps=1, variant=variant, grid="quadratic")
    fine = float64_run(sde, score, "exp-euler", 9, (5, 2), grid="quadratic")
    np.testing.assert_array_equal(pm, fine)


def direct_plmc(sde, score, steps, K, variant, shape, seed):
    """PLMC from docs/math.md §4 over the exponential-integrator chain, written out in float64."""
    B, d = shape
    n = sde.order
    noise = PortableNoise(seed, np.arange(B))
    draw = lambda: np.asarray(noise.normal(NumpyBackend(np.float64), (n * d,)), dtype=np.float64)  # noqa: E731
    prior = draw().reshape(B, n, d)  # blocks side by side on the last axis
    u = np.einsum("ij,bjd->bid", sde.prior_factor, prior)
    prec = sde.stationary_precision_last_row()

    def b(x, t):  # the remainder s + (Sigma_inf^-1 u)_n
        return score(x.reshape(B, n * d), np.full(B, t)) + np.einsum("j,bjd->bd", prec, x)

    def fine_map(x, drift, t0, t1, z):  # x <- a_j x + g_j drift + c_j z
        E, C = sde.reverse_linear_step(t0, t1)
        x = x.copy()
        x[:, -1] += (sde.B(t0) - sde.B(t1)) * sde.sigma**2 * drift
        return np.einsum("ij,bjd->bid", E, x) + np.einsum("ij,bjd->bid", C, z)

    ts = time_grid(sde, steps)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        fine = np.linspace(t0, t1, K + 1)
        b0 = b(u, t0)
        zs = [draw().reshape(B, n, d) for _ in range(K)]
        if variant == "bernoulli":
            H = noise.shared.random(K) < 1.0 / K
        else:
            H = np.zeros(K, dtype=bool)
            H[noise.shared.integers(K)] = True
        xhat = [u]
        for j in range(K - 1):
            xhat.append(fine_map(xhat[-1], b0, fine[j], fine[j + 1], zs[j]))
        y = u
        for j in range(K):
            e = b(xhat[j], fine[j]) - b0 if H[j] else 0.0
            y = fine_map(y, b0 + K * H[j] * e, fine[j], fine[j + 1], zs[j])
        u = y
    return u


@pytest.mark.parametrize("variant", ["bernoulli", "one"])
def test_poisson_midpoint_matches_a_direct_implementation(variant):
    sde = make_sde("hold3")
    score = ExactScore(sde, ring_mixture())
    K, steps, shape = 5, 6, (4, 2)
    u = direct_plmc(sde, score, steps, K, variant, shape, seed=3)
    got = float64_run(sde, score, "poisson-midpoint", steps, shape, seed=3, substeps=K, variant=variant,
                      denoise_final=False)
    np.testing.assert_allclose(got, u[:, 0], rtol=1e-10, atol=1e-12)


def direct_pc_langevin(sde, score, steps, snr, shape, seed, momentum, norms):
    """A Lie-Trotter predictor, then score_sde's Langevin corrector (momentum=False) or the AMS
    corrector of docs/math.md (momentum=True) on the last block, in float64; norms per sample or
    averaged over the batch (score_sde, AMS code)."""
    B, d = shape
    n = sde.order
    noise = PortableNoise(seed, np.arange(B))
    draw = lambda size: np.asarray(noise.normal(NumpyBackend(np.float64), (size,)), dtype=np.float64)  # noqa: E731
    u = np.einsum("ij,bjd->bid", sde.prior_factor, draw(n * d).reshape(B, n, d))
    prec = sde.stationary_precision_last_row()
    if norms == "sample":
        norm = lambda x: np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    else:
        norm = lambda x: np.linalg.norm(x, axis=1, keepdims=True).mean()  # noqa: E731
    s_of = lambda x, t: score(x.reshape(B, n * d), np.full(B, t))  # noqa: E731
    ts = time_grid(sde, steps)
    m = s_prev = delta = atilde_prev = None
    for t0, t1 in zip(ts[:-1], ts[1:]):
        E, C = sde.reverse_linear_step(t0, t1)
        u = np.einsum("ij,bjd->bid", E, u) + np.einsum("ij,bjd->bid", C, draw(n * d).reshape(B, n, d))
        u[:, -1] += (sde.B(t0) - sde.B(t1)) * sde.sigma**2 * (s_of(u, t1) + np.einsum("j,bjd->bd", prec, u))
        s = s_of(u, t1)
        z = draw(d)
        if not momentum or m is None:
            beta, m_new, alpha = 0.0, s, 2 * (snr * norm(z) / norm(s)) ** 2
        else:
            lhat = norm(s - s_prev) / delta
            beta = np.clip(((1 - atilde_prev * lhat) / (1 + atilde_prev * lhat)) ** 2, 0, 1 - 1e-4)
            alpha = 2 * (snr * norm(z) / norm(m)) ** 2
            m_new = beta * m + (1 - beta) * s
        atilde = alpha * (1 + beta) ** 2
        u[:, -1] += atilde * m_new + np.sqrt(2 * alpha) * z
        m, s_prev, delta, atilde_prev = m_new, s, atilde * norm(m_new), atilde
    return u[:, 0]


@pytest.mark.parametrize("norms", ["sample", "batch"])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("case", ["vp", "hold3"])
def test_ams_matches_a_direct_implementation(case, momentum, norms):
    sde = make_sde(case)
    score = ExactScore(sde, ring_mixture())
    expected = direct_pc_langevin(sde, score, 7, 0.2, (4, 2), seed=4, momentum=momentum, norms=norms)
    got = float64_run(sde, score, "ams", 7, (4, 2), seed=4, snr=0.2, momentum=momentum, norms=norms,
                      denoise_final=False)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": -3}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer >= 1"),
    ({"sampler": "leapfrog"}, "unknown sampler 'leapfrog'; choose one of lie-trotter"),
    ({"grid": "cosine"}, "unknown time grid 'cosine'; choose one of uniform, quadratic"),
    ({"sampler": "poisson-midpoint", "variant": "two"}, "unknown Poisson-midpoint variant 'two'"),
    ({"sampler": "poisson-midpoint", "substeps": 0}, "substeps must be >= 1"),
    ({"sampler": "ode", "method": "euler"}, "unknown ODE method 'euler'"),
    ({"sampler": "rk45", "rtol": 0.0}, "rtol and atol must be positive"),
    ({"sampler": "ams", "snr": -1.0}, "snr must be positive"),
    ({"sampler": "ams", "norms": "max"}, "unknown norms 'max'"),
    ({"sampler": "lie-trotter", "substeps": 4}, "sampler 'lie-trotter' has no option 'substeps'"),
    ({"noise": "pink"}, "unknown noise 'pink'"),
])
def test_bad_arguments_raise_value_errors(kwargs, message):
    sde = make_sde("vp")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample_full(sde, ExactScore(sde, ring_mixture()), (2, 2), backend="numpy", **kwargs)


def test_every_alias_resolves_to_a_sampler_and_its_options():
    for name in SAMPLERS:
        assert resolve_sampler(name)[0] == name
    assert resolve_sampler("RK45") == ("ode", SAMPLERS["ode"], {"method": "rk45"})
    assert resolve_sampler("plmc_one")[2] == {"variant": "one"}
    for fn in SAMPLERS.values():  # one plain function over (ctx, u, ts, **options)
        assert list(inspect.signature(fn).parameters)[:3] == ["ctx", "u", "ts"]


def test_callback_sees_every_step():
    sde = make_sde("vp")
    seen = []
    sample_full(sde, ExactScore(sde, ring_mixture()), (3, 2), steps=5, backend="numpy",
                callback=lambda k, t, u: seen.append((k, t, u.shape)))
    assert [k for k, _, _ in seen] == list(range(5))
    np.testing.assert_allclose([t for _, t, _ in seen], time_grid(sde, 5)[1:])
    assert all(shape == (3, 2) for _, _, shape in seen)


# ----------------------------------------------------------------------------- the exact score and the metrics


def dense_mixture_score(sde, mix, u, t):
    """grad log p_t for one state u (n*d,), from the full (n d x n d) covariance of each component."""
    n, d = sde.order, mix.dim
    A = sla.expm(sde.F * sde.B(t))
    # The noise added by time t, W' = F W + W F^T + G G^T from W(0) = 0, solved as an ODE: the
    # closed form S - A S A^T loses the data block's tiny variance to cancellation at small t.
    GG = np.outer(sde.G, sde.G)
    rhs = lambda s, w: (sde.F @ w.reshape(n, n) + w.reshape(n, n) @ sde.F.T + GG).ravel()  # noqa: E731
    W = solve_ivp(rhs, (0.0, sde.B(t)), np.zeros(n * n), method="DOP853", rtol=1e-13, atol=1e-30).y[:, -1]
    Q = A @ sde.initial_cov @ A.T + W.reshape(n, n)
    p = A[:, 0]
    logs, grads = [], []
    for w, mu, C in zip(mix.weights, mix.means, mix.covs):
        cov = np.kron(np.outer(p, p), C) + np.kron(Q, np.eye(d))
        diff = u - np.kron(p, mu)
        sol = np.linalg.solve(cov, diff)
        logs.append(np.log(w) - 0.5 * (diff @ sol + np.linalg.slogdet(cov)[1] + n * d * np.log(2 * np.pi)))
        grads.append(-sol)
    logs = np.array(logs)
    resp = np.exp(logs - logs.max())
    return resp @ np.array(grads) / resp.sum(), logs.max() + np.log(resp.sum())


@pytest.mark.parametrize("case", ["vp", "cld", "hold3", "hold4"])
def test_exact_score_matches_the_dense_formula(case):
    from hold_mlx.exact import checkerboard_like_mixture

    sde = make_sde(case)
    mix = checkerboard_like_mixture(3, k=3, seed=1)
    rng = np.random.default_rng(0)
    times = np.array([1e-3, 0.01, 0.2, 0.5 * sde.T, sde.T])
    u = rng.standard_normal((len(times), sde.order * 3)) * 0.5
    score = ExactScore(sde, mix)
    full, logp = score.full_score(u, times), score.log_prob(u, times)
    for i, t in enumerate(times):
        g, lp = dense_mixture_score(sde, mix, u[i], t)
        np.testing.assert_allclose(full[i], g, rtol=1e-7, atol=1e-9 * np.abs(g).max())
        assert logp[i] == pytest.approx(lp, rel=1e-9)
    np.testing.assert_allclose(score(u, times), full[:, -3:])
    # a row's value does not depend on the other rows' times
    np.testing.assert_allclose(score.full_score(u[2:3], times[2:3]), full[2:3], rtol=1e-12)
    # many distinct times take the rank-one path (one time at a time takes the direct one)
    many = np.concatenate([np.geomspace(1e-3, sde.T, 40), [0.0]])
    v = rng.standard_normal((len(many), sde.order * 3)) * 0.5
    together = score.full_score(v, many)
    alone = np.concatenate([score.full_score(v[i:i + 1], many[i:i + 1]) for i in range(len(many))])
    np.testing.assert_allclose(together, alone, rtol=1e-8, atol=1e-10 * np.abs(alone).max())
    np.testing.assert_allclose(score.log_prob(v, many), [score.log_prob(v[i:i + 1], many[i])[0] for i in range(len(many))],
                               rtol=1e-10)


def test_exact_score_is_the_gradient_of_the_log_density_down_to_t_zero():
    sde = make_sde("hold3")
    score = ExactScore(sde, ring_mixture())
    rng = np.random.default_rng(1)
    for t in (0.0, 1e-6, 1e-3, 1.0):  # t = 0 and 1e-6 take the dense path (Q nearly singular)
        u = np.concatenate([ring_mixture().sample(1, rng)[0], 0.2 * rng.standard_normal(4)])
        g = score.full_score(u[None], t)[0]
        h = 1e-6
        num = [(score.log_prob((u + h * e)[None], t)[0] - score.log_prob((u - h * e)[None], t)[0]) / (2 * h)
               for e in np.eye(6)]
        np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-4 * np.abs(g).max())


def test_sliced_wasserstein_against_direct_formula():
    # (the MMD with the Gaussian kernel is checked against its pair sums in test_metrics.py)
    rng = np.random.default_rng(0)
    # in 1-D the sliced distance is the W2 distance between the sorted samples
    a, b = rng.standard_normal((50, 1)), rng.standard_normal((50, 1)) * 2
    assert sliced_wasserstein(a, b, projections=3) == pytest.approx(
        np.sqrt(np.mean((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2)), rel=1e-12)


def test_non_finite_scores_are_reported():
    """A score function that returns NaN gives NaN samples and a RuntimeWarning, not silence."""
    sde = get_sde("vp")

    def nan_score(u, t):
        return np.full(u.shape, np.nan, np.float32)

    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        x = sample_full(sde, nan_score, (2, 3), steps=2, backend="numpy").x
    assert np.isnan(x).all()

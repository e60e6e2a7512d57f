"""hold_mlx.load(): a Model that knows its SDE, backend and parameterisation, scores and samples;
hold_mlx.sample() refuses a score function whose arrays do not match the backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import hold_mlx
from hold_mlx.backends import BACKENDS, get_backend

POINTS_MODEL = Path(__file__).resolve().parents[1] / "weights" / "8gaussians-hold"


@pytest.fixture(scope="module")
def model():
    return hold_mlx.load(POINTS_MODEL)


def test_score_is_the_network_output_through_the_kernel(model):
    """score = -alpha / ell_t - u_n / Sigma^mix_nn(t), with ell and Sigma^mix from the SDE in float64."""
    from hold_mlx._mlx import mx

    sde, n = model.sde, model.sde.order
    assert model.config["objective"]["mixed_score"] and model.data_shape == (2,)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((4, 2 * n)).astype(np.float32)
    t = np.array([1e-3, 0.1, 0.5, 1.0])
    alpha = np.array(model.alpha(mx.array(u), mx.array(t.astype(np.float32))))
    ell, mixed_var = sde.perturbation(t).ell, sde.mixed_score_var(t)
    expected = -alpha / ell[:, None] - u[:, -2:] / mixed_var[:, None]
    got = np.array(model(mx.array(u), mx.array(t.astype(np.float32))))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(alpha).max() > 0.1  # a trained network, not zeros


def test_sample_is_the_shared_sampler_in_batches(model):
    """model.sample draws what hold_mlx.sample draws for the same SDE and seed, whatever the batching."""
    whole = model.sample(6, steps=5, seed=3, batch_size=6)
    pieces = model.sample(6, steps=5, seed=3, batch_size=4)
    direct = np.array(hold_mlx.sample(model.sde, model, (6, 2), steps=5, seed=3))
    assert whole.x.dtype == np.float32 and whole.x.shape == (6, 2) and whole.nfe == 6
    np.testing.assert_allclose(whole.x, direct, atol=1e-6)
    np.testing.assert_allclose(pieces.x, direct, atol=1e-5)
    scale = np.asarray(model.config["data"]["scale"])
    np.testing.assert_allclose(whole.user_units(), whole.x * scale + model.config["data"]["shift"], rtol=1e-6)


def test_mismatched_arrays_are_a_one_line_error(model):
    with pytest.raises(ValueError, match=r"computes on mlx arrays but backend='numpy' passes numpy") as err:
        hold_mlx.sample(model.sde, model, (2, 2), steps=2, backend="numpy")
    assert "\n" not in str(err.value)

    def numpy_score(u, t):
        return -np.asarray(u)[..., -2:]

    with pytest.raises(ValueError, match=r"computes on numpy arrays but backend='mlx' passes mlx"):
        hold_mlx.sample(model.sde, numpy_score, (2, 2), steps=2, backend="mlx")
    assert np.asarray(hold_mlx.sample(model.sde, numpy_score, (2, 2), steps=2, backend="numpy")).shape == (2, 2)


def test_backends_come_from_one_registry():
    assert set(BACKENDS) == {"mlx", "torch", "onnx", "numpy"}
    assert get_backend("numpy").name == "numpy"
    with pytest.raises(ValueError, match="unknown backend 'jax'; choose one of mlx, torch, onnx, numpy"):
        get_backend("jax")
    with pytest.raises(ValueError, match="likelihood needs autodiff"):
        get_backend("onnx").vjp_probe(lambda u, t: u, 1)

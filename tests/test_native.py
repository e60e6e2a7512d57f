"""The native MLX CPU primitive (hold_mlx/csrc): built here, equal to mx.conv2d wherever MLX can
call it, and a clean fallback when it cannot be built."""

from __future__ import annotations

import shutil
import sys

import pytest

from hold_mlx import native
from hold_mlx._mlx import mx

LINUX_WITH_TOOLS = sys.platform == "linux" and shutil.which("g++") is not None


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native.py with its per-process cache cleared and an empty build directory."""
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("HOLD_MLX_NATIVE_DIR", str(tmp_path))
    monkeypatch.delenv("HOLD_MLX_NATIVE", raising=False)
    return tmp_path


def _module():
    module = native.load()
    if module is None:
        pytest.skip(f"native kernels unavailable: {native.status().detail}")
    return module


@pytest.mark.skipif(not LINUX_WITH_TOOLS, reason="needs Linux and g++")
def test_builds_on_this_machine():
    pytest.importorskip("nanobind")
    status = native.status()
    assert status.available, status.detail


@pytest.mark.parametrize("shape,out_ch", [((3, 28, 28, 32), 32), ((2, 14, 14, 64), 64), ((4, 7, 7, 64), 48),
                                          ((1, 28, 29, 96), 32)])
def test_conv_matches_mlx_compiled_and_on_other_streams(shape, out_ch):
    module = _module()
    mx.random.seed(out_ch)
    x = mx.random.normal((shape[0], shape[3], shape[1], shape[2])).transpose(0, 2, 3, 1)  # not contiguous
    w = 0.2 * mx.random.normal((out_ch, 3, 3, shape[3]))
    b = mx.random.normal((out_ch,))
    want = mx.conv2d(x, w, padding=1) + b
    scale = max(1.0, mx.abs(want).max().item())
    assert mx.abs(module.conv3x3(x, w, b) - want).max().item() < 1e-5 * scale
    fused = mx.compile(lambda x, w, b: mx.maximum(module.conv3x3(x, w, b), 0.0) * 2.0)
    assert mx.abs(fused(x, w, b) - mx.maximum(want, 0.0) * 2.0).max().item() < 2e-5 * scale
    with mx.stream(mx.new_stream(mx.cpu)):
        other = module.conv3x3(x, w, b)
    assert mx.abs(other - want).max().item() < 1e-5 * scale


@pytest.mark.parametrize("shape,out_ch", [((2, 28, 28, 32), 32), ((3, 14, 14, 96), 64), ((2, 7, 9, 3), 16)])
def test_weight_gradient_matches_mlx_autodiff(shape, out_ch):
    module = _module()
    mx.random.seed(shape[-1])
    x = mx.random.normal(shape)
    w = mx.random.normal((out_ch, 3, 3, shape[-1]))
    g = mx.random.normal(shape[:3] + (out_ch,))
    want = mx.grad(lambda w: (mx.conv2d(x, w, padding=1) * g).sum())(w)
    got = module.conv3x3_weight_grad(x, g)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() < 1e-5 * max(1.0, mx.abs(want).max().item())


def test_empty_batch():
    module = _module()
    x = mx.zeros((0, 8, 8, 16))
    assert module.conv3x3(x, mx.zeros((16, 3, 3, 16)), mx.zeros((16,))).shape == (0, 8, 8, 16)
    assert module.group_norm(x, mx.ones((16,)), mx.zeros((16,)), 4, 1e-6, True).shape == (0, 8, 8, 16)
    dw = module.conv3x3_weight_grad(x, x)
    assert dw.shape == (16, 3, 3, 16) and mx.abs(dw).max().item() == 0.0


def test_bad_shapes_and_dtypes_are_refused():
    module = _module()
    x = mx.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="weight"):
        module.conv3x3(x, mx.zeros((16, 3, 3, 5)), mx.zeros((16,)))
    with pytest.raises(ValueError, match="multiple of"):
        module.conv3x3_weight_grad(x, mx.zeros((1, 8, 8, 17)))
    with pytest.raises(ValueError, match="float32"):
        module.conv3x3(x.astype(mx.float16), mx.zeros((16, 3, 3, 4), dtype=mx.float16),
                       mx.zeros((16,), dtype=mx.float16))


def test_failed_build_falls_back_and_is_not_retried(fresh_native, monkeypatch):
    pytest.importorskip("nanobind")
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert native.load() is None
    assert native.status().detail.startswith("build failed")
    assert len(list(fresh_native.glob("*.failed"))) == 1 and not list(fresh_native.glob("*.so"))
    monkeypatch.setattr(native, "_status", None)
    assert native.load() is None and "cached" in native.status().detail

    from hold_mlx import fastops  # the convolution still works, through the GEMM path
    x, w, b = mx.random.normal((1, 9, 9, 3)), mx.random.normal((16, 3, 3, 3)), mx.random.normal((16,))
    assert mx.abs(fastops.conv3x3(x, w, b) - (mx.conv2d(x, w, padding=1) + b)).max().item() < 1e-4


def test_switch_off_and_forced_on(fresh_native, monkeypatch):
    monkeypatch.setenv("HOLD_MLX_NATIVE", "0")
    assert native.load() is None and "HOLD_MLX_NATIVE=0" in native.status().detail
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("HOLD_MLX_NATIVE", "1")
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="HOLD_MLX_NATIVE=1"):
        native.load()

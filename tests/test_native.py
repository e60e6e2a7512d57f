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
    monkeypatch.setattr(native, "_variants", {})
    monkeypatch.setenv("HOLD_MLX_NATIVE_DIR", str(tmp_path))
    monkeypatch.delenv("HOLD_MLX_NATIVE", raising=False)
    monkeypatch.delenv("HOLD_MLX_NATIVE_ISA", raising=False)
    return tmp_path


@pytest.fixture
def rechoose(monkeypatch):
    """native.py choosing its variant again (the variants already built stay loaded)."""
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.delenv("HOLD_MLX_NATIVE", raising=False)
    monkeypatch.delenv("HOLD_MLX_NATIVE_ISA", raising=False)


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


def _conv_inputs(shape, out_ch: int, seed: int):
    """x (shape), a 3x3 weight (out_ch, 3, 3, C) and a bias, drawn from ``seed``."""
    mx.random.seed(seed)
    x = mx.random.normal(shape)
    return x, 0.2 * mx.random.normal((out_ch, 3, 3, shape[3])), mx.random.normal((out_ch,))


@pytest.mark.parametrize("shape,out_ch", [((3, 28, 28, 32), 32), ((2, 14, 14, 64), 64), ((2, 30, 2, 5), 48),
                                          ((1, 4, 34, 16), 17)])
def test_stride2_conv_matches_mlx(shape, out_ch):
    """Stride 2 (the U-Net's down-sampling): output rows of every tile size, channel tails."""
    module = _module()
    x, w, b = _conv_inputs(shape, out_ch, seed=out_ch + 1)
    want = mx.conv2d(x, w, stride=2, padding=1) + b
    got = module.conv3x3(x, w, b, stride=2)
    assert got.shape == want.shape == (shape[0], shape[1] // 2, shape[2] // 2, out_ch)
    assert mx.abs(got - want).max().item() < 1e-5 * max(1.0, mx.abs(want).max().item())


def _upsampled(x):
    return mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)


@pytest.mark.parametrize("shape,out_ch", [((2, 7, 7, 64), 64), ((2, 14, 14, 64), 64), ((3, 5, 9, 16), 48),
                                          ((1, 3, 17, 8), 17)])
def test_upsample_conv_matches_mlx(shape, out_ch):
    """conv3x3 of the 2x nearest upsampling, computed per output parity from the small image."""
    module = _module()
    x, w, b = _conv_inputs(shape, out_ch, seed=out_ch + 2)
    want = mx.conv2d(_upsampled(x), w, padding=1) + b
    got = module.upsample_conv3x3(x, w, b)
    assert got.shape == want.shape == (shape[0], 2 * shape[1], 2 * shape[2], out_ch)
    assert mx.abs(got - want).max().item() < 2e-6 * max(1.0, mx.abs(want).max().item()) * shape[3] ** 0.5


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
    dx, dgamma, dbeta = module.group_norm_backward(x, mx.ones((16,)), mx.zeros((16,)), x, 4, 1e-6, True)
    assert dx.shape == x.shape and mx.abs(dgamma).max().item() == 0.0 and mx.abs(dbeta).max().item() == 0.0


def test_bad_shapes_and_dtypes_are_refused():
    module = _module()
    x = mx.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="weight"):
        module.conv3x3(x, mx.zeros((16, 3, 3, 5)), mx.zeros((16,)))
    with pytest.raises(ValueError, match="multiple of"):
        module.conv3x3_weight_grad(x, mx.zeros((1, 8, 8, 17)))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        module.conv3x3(x, mx.zeros((16, 3, 3, 4)), mx.zeros((16,)), stride=3)
    with pytest.raises(ValueError, match="even height and width"):
        module.conv3x3(mx.zeros((1, 7, 8, 4)), mx.zeros((16, 3, 3, 4)), mx.zeros((16,)), stride=2)
    with pytest.raises(ValueError, match="float32"):
        module.conv3x3(x.astype(mx.float16), mx.zeros((16, 3, 3, 4), dtype=mx.float16),
                       mx.zeros((16,), dtype=mx.float16))
    with pytest.raises(ValueError, match="grad"):
        module.group_norm_backward(x, mx.ones((4,)), mx.zeros((4,)), mx.zeros((1, 8, 8, 5)), 2, 1e-5)
    with pytest.raises(ValueError, match="groups"):
        module.group_norm_backward(x, mx.ones((4,)), mx.zeros((4,)), x, 3, 1e-5)


def test_failed_build_falls_back_and_is_not_retried(fresh_native, monkeypatch):
    pytest.importorskip("nanobind")
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert native.load() is None
    assert native.status().detail.startswith("build failed")
    assert len(list(fresh_native.glob("*.failed"))) == 1 and not list(fresh_native.glob("*.so"))
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_variants", {})
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


# ----------------------------------------------------------------------------- instruction-set variants

AVX2_ONLY = {"sse2", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}  # an AVX2 EPYC's flags (in part)


def _variant(isa):
    if isa not in native.supported_variants():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    pytest.importorskip("nanobind")
    module, status = native.load_variant(isa)
    assert module is not None, status.detail
    return module


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_variant_matches_mlx_forward_and_gradients(isa):
    """Each build this CPU runs agrees with MLX's own ops; shapes with tail tiles of every size."""
    from hold_mlx._mlx import nn

    module = _variant(isa)
    assert module.isa == isa and module.vector_lanes == {"avx512": 16, "avx2": 8, "portable": 4}[isa]
    mx.random.seed(7)
    x = mx.random.normal((2, 9, 13, 24))
    w = 0.2 * mx.random.normal((48, 3, 3, 24))
    b = mx.random.normal((48,))
    want = mx.conv2d(x, w, padding=1) + b
    assert mx.abs(module.conv3x3(x, w, b) - want).max().item() < 1e-5 * mx.abs(want).max().item()
    up = module.upsample_conv3x3(x, w, b)
    want_up = mx.conv2d(_upsampled(x), w, padding=1) + b
    assert mx.abs(up - want_up).max().item() < 1e-5 * mx.abs(want_up).max().item()
    x2 = x[:, :8, :12]  # stride 2 needs even sizes
    want2 = mx.conv2d(x2, w, stride=2, padding=1) + b
    assert mx.abs(module.conv3x3(x2, w, b, stride=2) - want2).max().item() < 1e-5 * mx.abs(want2).max().item()
    g = mx.random.normal(want.shape)
    dw = mx.grad(lambda w: (mx.conv2d(x, w, padding=1) * g).sum())(w)
    assert mx.abs(module.conv3x3_weight_grad(x, g) - dw).max().item() < 1e-5 * mx.abs(dw).max().item()

    gamma, beta = 1 + 0.1 * mx.random.normal((24,)), 0.1 * mx.random.normal((24,))
    for act in (False, True):
        def reference(x, gamma, beta):
            y = nn.GroupNorm(6, 24, pytorch_compatible=True, eps=1e-5).update({"weight": gamma, "bias": beta})(x)
            return nn.silu(y) if act else y

        out = reference(x, gamma, beta)
        assert mx.abs(module.group_norm(x, gamma, beta, 6, 1e-5, act) - out).max().item() < 1e-5
        gz = mx.random.normal(out.shape)
        wants = mx.grad(lambda *a: (reference(*a) * gz).sum(), argnums=(0, 1, 2))(x, gamma, beta)
        gots = module.group_norm_backward(x, gamma, beta, gz, 6, 1e-5, act)
        for name, got, want in zip(("dx", "dgamma", "dbeta"), gots, wants):
            assert got.shape == want.shape, name
            err = mx.abs(got - want).max().item() / max(1.0, mx.abs(want).max().item())
            assert err < 2e-5, f"{isa} {name} act={act}: {err:.3g}"


def test_forced_variant_is_the_one_loaded(rechoose, monkeypatch):
    if "avx2" not in native.supported_variants():
        pytest.skip("this CPU cannot run the AVX2 kernels")
    monkeypatch.setenv("HOLD_MLX_NATIVE_ISA", "avx2")
    module = _module()
    status = native.status()
    assert module.isa == "avx2" and status.isa == "avx2" and "HOLD_MLX_NATIVE_ISA=avx2" in status.why
    x, w, b = mx.random.normal((1, 6, 6, 8)), mx.random.normal((16, 3, 3, 8)), mx.random.normal((16,))
    assert mx.abs(module.conv3x3(x, w, b) - (mx.conv2d(x, w, padding=1) + b)).max().item() < 1e-4


def test_variant_follows_the_cpu_flags(rechoose, monkeypatch):
    if not native._is_x86():
        assert native.VARIANTS == ("portable",) and native.choose_variant()[0] == "portable"
        return
    monkeypatch.setattr(native, "cpu_flags", lambda: set(AVX2_ONLY))
    assert native.supported_variants() == ["avx2", "portable"]
    assert native.choose_variant() == ("avx2", "the CPU has AVX2 and FMA but not AVX-512")
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY | {"avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                                 "avx512vl"})
    assert native.choose_variant()[0] == "avx512"
    monkeypatch.setattr(native, "cpu_flags", lambda: {"sse2"})
    assert native.choose_variant()[0] == "portable"


def test_forced_variant_this_cpu_cannot_run_is_refused(rechoose, monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: set(AVX2_ONLY))
    monkeypatch.setenv("HOLD_MLX_NATIVE_ISA", "avx512" if native._is_x86() else "avx2")
    assert native.load() is None
    assert "HOLD_MLX_NATIVE_ISA=" in native.status().detail
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("HOLD_MLX_NATIVE_ISA", "sse9")
    assert native.load() is None and "not one of" in native.status().detail

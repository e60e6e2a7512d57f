"""The fast CPU ops against the reference computations they replace: values and gradients."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hold_mlx import fastops
from hold_mlx._mlx import mx, nn

F32_EPS = float(np.finfo(np.float32).eps)


def _grid(lo=-60.0, hi=60.0, n=400_001):
    return np.linspace(lo, hi, n).astype(np.float32)


def test_tanh_within_a_few_ulp_of_float64():
    x = _grid(-20, 20)
    got = np.array(fastops.tanh(mx.array(x))).astype(np.float64)
    ref = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    big = np.abs(x) > 1e-3  # below, compare absolutely (tanh(x) ~ x, ulp tiny)
    assert (np.abs(got - ref)[big] / ulp[big]).max() <= 8
    assert np.abs(got - ref)[~big].max() <= 4 * F32_EPS * 1e-3


def test_silu_error_is_float32_rounding_of_its_inputs():
    x = _grid()
    got = np.array(fastops.silu(mx.array(x))).astype(np.float64)
    xd = x.astype(np.float64)
    ref = xd / (1.0 + np.exp(-xd))
    # Error measured in ulps of max(|x|, |silu(x)|): the tail x << 0 is rounded to ~0, which is
    # exact to the precision x itself carries.
    scale = np.spacing(np.maximum(np.abs(xd), np.abs(ref)).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - ref) / scale).max() <= 4
    # and absolutely, where activations live: below 2e-6 (MLX's own exp-based silu: 7.5e-7)
    assert np.abs(got - ref)[np.abs(xd) < 10].max() < 2e-6


def test_silu_compiled_equals_eager_and_sigmoid_matches():
    x = mx.array(_grid(-30, 30, 10_001))
    assert mx.array_equal(mx.compile(fastops.silu)(x), fastops.silu(x)).item()
    sig = np.array(fastops.sigmoid(x)).astype(np.float64)
    ref = 1.0 / (1.0 + np.exp(-np.array(x).astype(np.float64)))
    assert np.abs(sig - ref).max() < 4e-7


def test_silu_gradient_matches_autodiff_of_stock():
    x = mx.array(_grid(-30, 30, 20_001))
    g = mx.grad(lambda v: fastops.silu(v).sum())(x)
    ref = mx.grad(lambda v: nn.silu(v).sum())(x)
    assert mx.abs(g - ref).max().item() < 5e-6


@pytest.mark.parametrize("scale", [1.0, 4.0, 30.0])
def test_softmax_against_float64(scale):
    """Weights above 1e-3 within 1e-5 relative, all as close absolutely as MLX's own softmax
    (6e-7 here), rows summing to 1; logits far apart round the small weights to 0, not NaN."""
    x = (scale * np.random.default_rng(int(scale)).standard_normal((64, 49, 49))).astype(np.float32)
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    got = np.array(fastops.softmax(mx.array(x))).astype(np.float64)
    stock = np.array(mx.softmax(mx.array(x), axis=-1)).astype(np.float64)
    big = ref > 1e-3
    assert (np.abs(got - ref)[big] / ref[big]).max() < 1e-5
    assert np.abs(got - ref).max() <= max(1e-6, 1.5 * np.abs(stock - ref).max())
    assert np.abs(got.sum(-1) - 1).max() < 1e-5
    far = np.array(fastops.softmax(mx.array([[0.0, -50.0, -1e4, 2.0]])))
    assert np.isfinite(far).all() and far[0, 1] == far[0, 2] == 0.0
    np.testing.assert_allclose(far[0, [0, 3]], [1 / (1 + np.e ** 2), 1 / (1 + np.e ** -2)], rtol=1e-5)


def test_softmax_gradient_matches_autodiff_of_stock():
    x = mx.array((3.0 * np.random.default_rng(2).standard_normal((8, 49, 49))).astype(np.float32))
    probe = mx.random.normal(x.shape)
    g = mx.grad(lambda v: (fastops.softmax(v) * probe).sum())(x)
    ref = mx.grad(lambda v: (mx.softmax(v, axis=-1) * probe).sum())(x)
    assert mx.abs(g - ref).max().item() < 1e-5 * max(1.0, mx.abs(ref).max().item())
    assert mx.abs(mx.compile(fastops.softmax)(x) - fastops.softmax(x)).max().item() < 1e-7


def test_custom_gradients_run_on_the_stream_of_their_forward():
    """MLX runs a custom VJP on the default stream; fastops' wrapper moves it to the stream the
    forward ran on (a training step's batch pieces each run on their own stream and core)."""
    seen = []

    def backward(primals, cotangent, output):
        seen.append(repr(mx.default_stream(mx.cpu)))
        return (3.0 * fastops._single(cotangent),)

    triple = fastops._custom_vjp(lambda x: 3.0 * x, backward)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]

    def loss(x):
        total = 0.0
        for stream, piece in zip(streams, (x[:2], x[2:])):
            with mx.stream(stream):
                total = total + triple(piece).sum()
        return total

    grad = mx.grad(loss)(mx.ones((4,)))
    assert mx.array_equal(grad, mx.full((4,), 3.0)).item()
    assert sorted(seen) == sorted(repr(s) for s in streams)
    for op in (fastops.silu, fastops.softmax, fastops._conv3x3, fastops._conv3x3_stride2, fastops._upsample_conv):
        assert hasattr(op, "__wrapped__"), op  # built by _custom_vjp


def _pick_path(path, monkeypatch):
    """'native': the compiled kernels (skipped where they cannot be built); 'mlx': MLX ops only."""
    if path == "native":
        if fastops._native() is None:
            pytest.skip("native kernels unavailable here (test_native.py says why)")
    else:
        monkeypatch.setattr(fastops, "_native", lambda: None)


@pytest.mark.parametrize("path", ["native", "mlx"])
@pytest.mark.parametrize("channels,groups", [(32, 8), (96, 8), (16, 4), (6, 3)])
@pytest.mark.parametrize("act", [False, True])
def test_group_norm_matches_stock_with_gradients(channels, groups, act, path, monkeypatch):
    _pick_path(path, monkeypatch)
    mx.random.seed(channels + groups)
    x = 2.0 * mx.random.normal((4, 14, 14, channels)) + 0.7
    ref_layer = nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)
    ref_layer.weight = mx.random.normal((channels,))
    ref_layer.bias = mx.random.normal((channels,))
    w, b = ref_layer.weight, ref_layer.bias

    def ref(x, w, b):
        ref_layer.weight, ref_layer.bias = w, b
        y = ref_layer(x)
        return nn.silu(y) if act else y

    def fast(x, w, b):
        return fastops.group_norm(x, w, b, groups, 1e-6, act=act)

    got, want = mx.compile(fast)(x, w, b), ref(x, w, b)
    assert mx.abs(got - want).max().item() < 2e-5 * max(1.0, mx.abs(want).max().item())
    probe = mx.random.normal(want.shape)
    g_fast = mx.grad(lambda *a: (fast(*a) * probe).sum(), argnums=(0, 1, 2))(x, w, b)
    g_ref = mx.grad(lambda *a: (ref(*a) * probe).sum(), argnums=(0, 1, 2))(x, w, b)
    for a, r in zip(g_fast, g_ref):
        assert mx.abs(a - r).max().item() < 1e-4 * max(1.0, mx.abs(r).max().item())


def assert_conv_and_gradients_match(fast, conv, shape, out_ch):
    """fast(x, w, b) against conv(x, w) + b on random inputs: outputs to 1e-5 and the gradients in
    x, w and b to 1e-4, relative to the largest value."""
    x = mx.random.normal(shape)
    w = 0.3 * mx.random.normal((out_ch, 3, 3, shape[-1]))
    b = mx.random.normal((out_ch,))

    def stock(x, w, b):
        return conv(x, w) + b

    got, want = fast(x, w, b), stock(x, w, b)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() < 1e-5 * max(1.0, mx.abs(want).max().item())
    probe = mx.random.normal(want.shape)
    g_fast = mx.grad(lambda *a: (fast(*a) * probe).sum(), argnums=(0, 1, 2))(x, w, b)
    g_ref = mx.grad(lambda *a: (stock(*a) * probe).sum(), argnums=(0, 1, 2))(x, w, b)
    for name, a, r in zip(("dx", "dw", "db"), g_fast, g_ref):
        assert a.shape == r.shape, name
        assert mx.abs(a - r).max().item() < 1e-4 * max(1.0, mx.abs(r).max().item()), name


CONV_CASES = [((3, 9, 11, 5), 7), ((2, 8, 8, 16), 16), ((1, 28, 28, 3), 4), ((2, 7, 31, 6), 40),
              ((2, 5, 16, 24), 33), ((1, 4, 4, 8), 64), ((2, 6, 15, 17), 48)]


@pytest.mark.parametrize("path", ["native", "mlx"])
@pytest.mark.parametrize("shape,out_ch", CONV_CASES)
def test_conv3x3_matches_mlx_conv_with_gradients(shape, out_ch, path, monkeypatch):
    _pick_path(path, monkeypatch)
    mx.random.seed(sum(shape))
    assert_conv_and_gradients_match(fastops.conv3x3, lambda x, w: mx.conv2d(x, w, padding=1), shape, out_ch)


@pytest.mark.parametrize("shape,out_ch", [((3, 8, 10, 5), 7), ((2, 28, 28, 16), 16), ((1, 14, 14, 64), 64),
                                          ((2, 7, 9, 4), 8)])
def test_conv3x3_stride2_matches_mlx_conv_with_gradients(shape, out_ch):
    """The written-out gradient of the stride-2 convolution against MLX's autodiff (odd sizes: MLX's own)."""
    mx.random.seed(sum(shape) + 1)
    assert_conv_and_gradients_match(fastops.conv3x3_stride2, lambda x, w: mx.conv2d(x, w, stride=2, padding=1),
                                    shape, out_ch)


@pytest.mark.parametrize("path", ["native", "mlx"])
@pytest.mark.parametrize("shape,out_ch", [((2, 7, 7, 64), 64), ((3, 5, 9, 16), 48), ((2, 4, 6, 8), 4)])
def test_upsample_conv_matches_mlx_with_gradients(shape, out_ch, path, monkeypatch):
    """The U-Net's Upsample (nearest 2x, then conv3x3): values and the three gradients."""
    _pick_path(path, monkeypatch)
    mx.random.seed(sum(shape) + 2)

    def upsample_then_conv(x, w):
        return mx.conv2d(mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2), w, padding=1)
    assert_conv_and_gradients_match(fastops.upsample_conv3x3, upsample_then_conv, shape, out_ch)


def test_switch_follows_environment(monkeypatch):
    monkeypatch.setenv("HOLD_MLX_FASTOPS", "0")
    assert not fastops.enabled()
    monkeypatch.setenv("HOLD_MLX_FASTOPS", "1")
    assert fastops.enabled()
    monkeypatch.setenv("HOLD_MLX_FASTOPS", "auto")
    assert fastops.enabled() == (mx.default_device() == mx.cpu and sys.platform != "darwin")


def test_unet_fast_and_stock_agree(monkeypatch):
    """The same weights through the fast and the stock layers (the torch parity test holds the
    stock side to torch)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from hold_mlx.nets import build_net
    from hold_mlx.netconfig import net_preset

    mx.random.seed(3)
    net = build_net(net_preset("tiny", image_size=16))
    net.update(tree_unflatten([(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(net.parameters())]))
    u, t = mx.random.normal((5, 16, 16, 3)), mx.array(np.linspace(0.1, 1.0, 5), dtype=mx.float32)

    def loss(model):
        return (model(u, t) ** 2).sum()

    out, grads = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HOLD_MLX_FASTOPS", flag)
        out[flag] = net(u, t)
        grads[flag] = dict(tree_flatten(nn.value_and_grad(net, loss)(net)[1]))
    scale = mx.abs(out["0"]).max().item()
    assert scale > 0 and mx.abs(out["1"] - out["0"]).max().item() < 1e-5 * scale
    for k, g in grads["0"].items():
        assert mx.abs(grads["1"][k] - g).max().item() < 1e-4 * max(1e-3, mx.abs(g).max().item()), k

"""Fast MLX building blocks for CPUs: SiLU, GroupNorm (+SiLU) and 3x3 convolution.

MLX's CPU backend runs transcendental functions one element at a time (``mx.exp`` and
``nn.silu`` cost about 12 ns per float32), reduces over several axes slowly and lowers a 3x3
convolution to an im2col copy plus a skinny GEMM. The functions here compute the same results
from operations MLX's CPU backend runs well: multiply-adds that ``mx.compile`` fuses into one
vectorised C++ loop, single-axis sums, and matrix products handed to BLAS. Where hold-mlx's
native kernels are built (hold_mlx/native.py: C++ MLX primitives compiled for this CPU), the
convolution and GroupNorm forward passes run in them instead; the MLX-ops versions remain the
fallback and define the gradients.

``enabled()`` decides whether the networks use them: on by default when MLX computes on the CPU
on Linux, off on a GPU (Metal, CUDA) and on macOS, where MLX's own kernels are fast.
``HOLD_MLX_FASTOPS=1`` / ``0`` forces the choice (the benchmark uses it to show the effect).
Every function is checked against the stock MLX op, values and gradients, in
tests/test_fastops.py.
"""

from __future__ import annotations

import functools
import os
import sys

from ._mlx import mx

__all__ = ["enabled", "tanh", "sigmoid", "silu", "softmax", "group_norm", "conv3x3", "conv3x3_stride2",
           "upsample2", "upsample_conv3x3"]


def enabled() -> bool:
    """Use the fast ops? HOLD_MLX_FASTOPS=1/0 forces; by default only when MLX runs on the CPU."""
    choice = os.environ.get("HOLD_MLX_FASTOPS", "auto").strip().lower()
    if choice in ("1", "true", "on", "yes"):
        return True
    if choice in ("0", "false", "off", "no"):
        return False
    # macOS CPU: MLX uses Accelerate and NEON vectors there, its own ops are the fast ones.
    return mx.default_device() == mx.cpu and sys.platform != "darwin"


def _custom_vjp(forward, backward):
    """``mx.custom_function(forward)`` with the VJP ``backward(primals, cotangent, output)``, run on
    the stream the forward ran on.

    MLX runs a custom VJP on the default stream, wherever its forward ran. A training step splits
    its batch across one MLX stream per core (``_mlx.split_batch``), so every convolution and
    GroupNorm gradient queued on one stream and ran on one core: two streams trained only 1.2x
    faster than one. One custom function per stream keeps each piece's backward on its own stream.
    """
    made = {}

    def call(*args):
        stream = mx.default_stream(mx.default_device())
        key = repr(stream)  # equal streams are distinct Python objects that do not hash alike
        fn = made.get(key)
        if fn is None:
            fn = mx.custom_function(forward)

            def on_stream(primals, cotangent, output, stream=stream):
                with mx.stream(stream):
                    return backward(primals, cotangent, output)
            fn.vjp(on_stream)
            made[key] = fn
        return fn(*args)

    return functools.wraps(forward)(call)


def _single(a):
    """The one array of a cotangent / primals / output that MLX may pass as a 1-tuple."""
    return a[0] if isinstance(a, (list, tuple)) else a


# ----------------------------------------------------------------------------- tanh, sigmoid, SiLU

# tanh(y) ~ y P(y^2) / Q(y^2) on |y| <= 9 (beyond, tanh rounds to +-1 in float32): a rational fit
# (relative-error weighted least squares, tools/ has none: the fit is a few lines of NumPy, see
# tests/test_fastops.py for the accuracy check) good to about 6 float32 ulp.
_TANH_CLIP = 9.0
_TANH_P = (0.9999999857463001, 0.13390435318145955, 0.003506734001159956, 2.079122899888836e-05,
           1.3604431505118856e-08)
_TANH_Q = (1.0, 0.4672375440372149, 0.025919462679109915, 0.000330380927266662, 7.879354268196165e-07)


def _poly4(c, s, s2):
    """c0 + c1 s + ... + c4 s^4 by Estrin's scheme: a shallow graph, so that ``mx.compile``
    (which fuses at most 11 operations deep) keeps the whole SiLU in one loop."""
    return (c[4] * s2 + (c[3] * s + c[2])) * s2 + (c[1] * s + c[0])


def _clip(x, bound: float):
    """x clamped to [-bound, bound], as 2 bound x / (|x| + bound + ||x| - bound|).

    Float arithmetic only: MLX's CPU minimum/maximum test for NaN with a branch and its selects
    mix bool and float vectors, either of which stops the C++ compiler vectorising the fused
    loop. Exact for |x| <= bound up to ~2 ulp of relative rounding.
    """
    a = mx.abs(x)
    return (2.0 * bound) * x / (a + bound + mx.abs(a - bound))


def _fusion_break(x):
    """A free reshape round trip: MLX's compiler does not fuse through reshapes, so the fused
    loop ends here. ``mx.compile`` fuses at most 11 operations deep; a deeper expression is cut
    at an arbitrary point, and the piece after the cut may get strided (unvectorised) inputs.
    Cutting on purpose keeps both pieces contiguous, vectorised loops."""
    return x.reshape(-1).reshape(x.shape)


def _tanh_core(y):
    """tanh(y) for |y| <= _TANH_CLIP: y P(y^2) / Q(y^2)."""
    s = y * y
    s2 = s * s
    return y * _poly4(_TANH_P, s, s2) / _poly4(_TANH_Q, s, s2)


def tanh(x):
    """tanh from multiply-adds and one division (MLX's CPU tanh/exp run one element at a time;
    this runs as two vectorised loops under ``mx.compile``)."""
    return _tanh_core(_fusion_break(_clip(x, _TANH_CLIP)))


def sigmoid(x):
    """1 / (1 + exp(-x)) = (1 + tanh(x/2)) / 2; absolute error below 4e-7 (relative error grows
    for x < -10 where the value is below 5e-5: the tail is rounded towards 0)."""
    return 0.5 + 0.5 * tanh(0.5 * x)


def _silu(x):
    """x * sigmoid(x) = h + h tanh(h), h = x/2: within a few ulp of max(|x|, |silu(x)|)."""
    h = 0.5 * x
    return h * tanh(h) + h  # h * tanh(h) first: lets mx.compile fuse h into the same loop


def _silu_vjp(primals, cotangent, output):
    x = _single(primals)
    s = sigmoid(x)
    return (_single(cotangent) * (s + x * s * (1.0 - s)),)


silu = _custom_vjp(_silu, _silu_vjp)


# ----------------------------------------------------------------------------- softmax


def _softmax(x):
    """Softmax over the last axis with exp from the rational tanh: for r = x - max <= 0,
    exp(r) = q^2 with q = exp(r / 2) = (1 + t) / (1 - t), t = tanh(r / 4). MLX's CPU softmax runs
    its exp one element at a time (about 50 ns per element at the attention's (B, 49, 49); this
    is about 20x faster). Squaring halves the argument at which 1 + t cancels: weights above 1e-3
    are within 1e-5 relative and every weight as close as MLX's own (6e-7 absolute at worst in
    tests/test_fastops.py); r < -36 rounds to 0."""
    r = x - mx.max(x, axis=-1, keepdims=True)
    t = tanh(0.25 * r)
    q = (1.0 + t) / (1.0 - t)
    e = q * q
    return e / mx.sum(e, axis=-1, keepdims=True)


def _softmax_vjp(primals, cotangent, output):
    y, g = _single(output), _single(cotangent)
    return (y * (g - mx.sum(g * y, axis=-1, keepdims=True)),)


softmax = _custom_vjp(_softmax, _softmax_vjp)


# ----------------------------------------------------------------------------- group norm


def group_norm(x, weight, bias, groups: int, eps: float, act: bool = False):
    """torch-compatible GroupNorm over channels-last x (groups of adjacent channels), optionally
    followed by SiLU in the same pass.

    The native kernels (hold_mlx/csrc/group_norm.h) when they are built: one image at a time,
    the passes from cache and SiLU vectorised for this CPU, forward and backward (the backward
    recomputes the statistics instead of keeping them). Where there is no native kernel the
    MLX-ops version below runs, with MLX's autodiff as its gradient; the tests hold the two
    gradients equal.
    """
    if _native() is not None:
        return _native_group_norm(groups, float(eps), bool(act))(x, weight, bias)
    return _group_norm_mlx(x, weight, bias, groups, eps, act)


@functools.lru_cache(maxsize=None)
def _native_group_norm(groups: int, eps: float, act: bool):
    def forward(x, weight, bias):
        return _native().group_norm(x, weight, bias, groups, eps, act)

    def backward(primals, cotangent, output):
        x, weight, bias = primals
        return tuple(_native().group_norm_backward(x, weight, bias, _single(cotangent), groups, eps, act))

    return _custom_vjp(forward, backward)


def _group_norm_mlx(x, weight, bias, groups: int, eps: float, act: bool = False):
    """GroupNorm (+ SiLU) from MLX operations.

    Statistics come from per-channel sums over the pixels (fast single-axis reductions) folded
    into groups; the variance is the mean of squared deviations (two-pass, like torch), and the
    normalisation, affine map and SiLU are one multiply-add per element that ``mx.compile``
    fuses.
    """
    b, c = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    count = (x.size // (b * c)) * (c // groups)  # numbers per group

    def per_group(per_channel):  # (B, C) sums -> (B, C) group means, repeated per channel
        g = per_channel.reshape(b, groups, c // groups).sum(axis=-1, keepdims=True) / count
        return _fusion_break(mx.broadcast_to(g, (b, groups, c // groups)).reshape(b, c))

    # The (B, C) statistics are materialised (_fusion_break) before the full-size loops use them:
    # fused into those loops they would be recomputed per element through broadcast indexing
    # (scalar code), which made the whole norm 2x slower.
    bshape = (b,) + (1,) * len(axes) + (c,)
    mean = per_group(x.sum(axis=axes))
    var = per_group(mx.square(x - mean.reshape(bshape)).sum(axis=axes))
    scale = weight * mx.rsqrt(var + eps)
    shift = _fusion_break(bias - mean * scale).reshape(bshape)
    y = x * _fusion_break(scale).reshape(bshape) + shift
    return silu(y) if act else y


# ----------------------------------------------------------------------------- convolution


def _taps_layout(x):
    """x (B, H, W, C) -> (flat, n, wp): the zero-framed batch flattened to (pixels, C), the
    number n of output rows, and the row pitch wp = W + 1 (see ``conv3x3``)."""
    b, h, w, c = x.shape
    flat = mx.pad(x, ((0, 1), (1, 0), (1, 0), (0, 0))).reshape(-1, c)
    return flat, b * (h + 1) * (w + 1), w + 1


def _conv_taps(x, weight, bias=None):
    """The nine accumulating GEMMs; returns the output on the (B, H+1, W+1) grid."""
    b, h, w, _ = x.shape
    flat, n, wp = _taps_layout(x)
    out = None
    for dy in range(3):
        for dx in range(3):
            tap = flat[dy * wp + dx: dy * wp + dx + n]
            w_tap = weight[:, dy, dx, :].T
            if out is None:
                out = tap @ w_tap if bias is None else mx.addmm(bias, tap, w_tap)
            else:
                out = mx.addmm(out, tap, w_tap)
    return out.reshape(b, h + 1, wp, -1)


def _native():
    """The native CPU kernels (hold_mlx/native.py, built on first use), or None: where they cannot
    be built, or when MLX computes on a GPU (fast ops forced on there)."""
    if mx.default_device() != mx.cpu:
        return None
    from . import native

    return native.load()


# The native convolution works in blocks of vector lanes (16 floats with AVX-512, 8 with AVX2) of
# output channels: fewer channels than a block would be mostly padding, and its weight gradient
# takes whole blocks only.
_NATIVE_CHANNEL_BLOCK = 16


def _tap_shifts(wp: int) -> list[int]:
    """Row offset of tap (dy, dx) in the framed, flattened layout (``_taps_layout``), tap order dy, dx."""
    return [dy * wp + dx for dy in range(3) for dx in range(3)]


def _conv_few_outputs(x, weight, bias):
    """3x3 'same' convolution for fewer output channels than a native channel block (a network's
    last layer has one per data channel): ONE GEMM of all nine taps side by side with the framed
    input, (9 O, C) @ (C, pixels), then the sum of nine shifted (O, pixels) row blocks (contiguous
    rows, so the fused sum vectorises). Nine GEMMs with N = O would read the whole input nine
    times and the native kernel would pad O to a block; here the input is read once."""
    b, h, w, c = x.shape
    o = weight.shape[0]
    flat, n, wp = _taps_layout(x)
    y = weight.transpose(1, 2, 0, 3).reshape(9 * o, c) @ flat.T  # row k o + j: tap k, output channel j
    out = None
    for k, shift in enumerate(_tap_shifts(wp)):
        part = y[k * o: (k + 1) * o, shift: shift + n]
        out = part if out is None else out + part
    return (out.T + bias).reshape(b, h + 1, wp, o)[:, :h, :w, :]


def _conv_same(x, weight, bias):
    """3x3 'same' convolution without gradient bookkeeping: the native kernel when it is built
    and the output has at least one channel block, else the nine shifted GEMMs (one GEMM and a
    shifted sum for fewer outputs than a block)."""
    native = _native()
    if native is not None and weight.shape[0] >= _NATIVE_CHANNEL_BLOCK:
        return native.conv3x3(x, weight, bias)
    if weight.shape[0] < _NATIVE_CHANNEL_BLOCK:
        return _conv_few_outputs(x, weight, bias)
    h, w = x.shape[1], x.shape[2]
    return _conv_taps(x, weight, bias)[:, :h, :w, :]


def _conv3x3_vjp(primals, cotangent, output):
    # Written out: autodiff through the nine slices would scatter nine full-size zero arrays,
    # and the native primitive has no VJP of its own.
    x, weight, _ = primals
    g = _single(cotangent)
    b, h, w, c = x.shape
    o = weight.shape[0]
    # dx: the same convolution of the output gradient with the flipped, transposed kernel.
    flipped = weight[:, ::-1, ::-1, :].transpose(3, 1, 2, 0)  # (C, 3, 3, O)
    dx = _conv_same(g, flipped, mx.zeros((c,), dtype=g.dtype))
    db = g.reshape(-1, o).sum(axis=0)
    native = _native()
    if native is not None and o % _NATIVE_CHANNEL_BLOCK == 0:
        return dx, native.conv3x3_weight_grad(x, g), db
    # dW[:, dy, dx] = the gradient (on the framed grid, zero at the frame) against tap (dy, dx) of
    # the framed input: nine GEMMs, or for few outputs ONE GEMM of the input with the nine
    # shifted copies of the gradient side by side (the input read once).
    g_grid = mx.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0))).reshape(-1, o)
    flat, n, wp = _taps_layout(x)
    if o < _NATIVE_CHANNEL_BLOCK:
        rows = flat.shape[0]
        shifted = mx.concatenate([mx.pad(g_grid, ((s, rows - n - s), (0, 0))) for s in _tap_shifts(wp)], axis=1)
        dw = (shifted.T @ flat).reshape(3, 3, o, c).transpose(2, 0, 1, 3)
        return dx, dw, db
    g_t = g_grid.T
    dw = mx.stack([g_t @ flat[s: s + n] for s in _tap_shifts(wp)], axis=1)
    return dx, dw.reshape(o, 3, 3, c), db


_conv3x3 = _custom_vjp(_conv_same, _conv3x3_vjp)


def conv3x3(x, weight, bias):
    """3x3 convolution, stride 1, zero padding 1, channels last: x (B, H, W, C), weight (O, 3, 3, C),
    bias (O,).

    Three ways, fastest first:

    * the native kernel (hold_mlx/csrc/conv3x3.h), a direct convolution that keeps a tile of
      pixels x output channels in vector registers; built for this CPU on first use;
    * nine accumulating GEMMs. MLX's own CPU convolution copies the input into an im2col matrix
      nine times its size, then runs one skinny GEMM. Here the batch is laid out as one long
      image: each picture gets one zero row above and one zero column on the left (a pixel's
      neighbour past the right edge is the next row's zero), plus one zero picture at the end.
      Flattened to (pixels, C), tap (dy, dx) of the kernel reads the same matrix shifted by
      dy (W+1) + dx rows, a contiguous slice, so the convolution is nine ``mx.addmm`` with no
      im2col copy. Outputs at the frame positions are computed and dropped
      ((H+1)(W+1)/(HW) - 1 extra work: 7% at 28x28, 15% at 14x14, 31% at 7x7);
    * below 8x8 pixels without the native kernel, MLX's own convolution (the frame costs more
      than it saves there).

    The gradient is written out: dx is the same convolution of the output gradient with the
    flipped, transposed kernel; dW comes from the native kernel, else from one GEMM of the
    gradient with each tap (dy, dx).
    """
    if _native() is None and min(x.shape[1:3]) < 8:
        return mx.conv2d(x, weight, padding=1) + bias
    return _conv3x3(x, weight, bias)


# ----------------------------------------------------------------------------- upsampling convolution


def upsample2(x):
    """Nearest-neighbour 2x upsampling of channels-last x (MLX operations only: any device)."""
    b, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _upsample_conv_forward(x, weight, bias):
    return _native().upsample_conv3x3(x, weight, bias)


def _upsample_conv_vjp(primals, cotangent, output):
    # the convolution's gradient on the upsampled image, then each 2x2 block of dx summed back
    x, weight, bias = primals
    b, h, w, c = x.shape
    du, dw, db = _conv3x3_vjp((upsample2(x), weight, bias), cotangent, None)
    return du.reshape(b, h, 2, w, 2, c).sum(axis=(2, 4)), dw, db


_upsample_conv = _custom_vjp(_upsample_conv_forward, _upsample_conv_vjp)


def upsample_conv3x3(x, weight, bias):
    """conv3x3 of the nearest 2x upsampling of x (the U-Net's Upsample layer): (B, H, W, C) ->
    (B, 2H, 2W, O). The native kernel computes it from x directly: each of the four output pixel
    parities is a 2x2 convolution with summed taps, 16 instead of 36 multiply-adds per input pixel
    and output channel, and the 4x image is never written; else the upsampling and conv3x3."""
    if _native() is not None and weight.shape[0] >= _NATIVE_CHANNEL_BLOCK:
        return _upsample_conv(x, weight, bias)
    return conv3x3(upsample2(x), weight, bias)


# ----------------------------------------------------------------------------- stride-2 convolution


def _stride2_taps(x):
    """The im2col matrix of a 3x3, stride-2, padding-1 convolution of an even-sized x (B, H, W, C):
    (B H/2 W/2, 9 C), tap-major (dy, dx, c) like a weight reshaped (O, 9 C)."""
    b, h, w, c = x.shape
    padded = mx.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return mx.concatenate([padded[:, dy: dy + h: 2, dx: dx + w: 2, :] for dy in range(3) for dx in range(3)],
                          axis=-1).reshape(-1, 9 * c)


def _conv3x3_stride2_forward(x, weight, bias):
    # The native kernel with a stride (the same register tiling; 3-6x MLX's own here), else MLX's
    # own forward, which is im2col and one GEMM (written with _stride2_taps it was no faster:
    # MLX copies the strided slices one element at a time).
    native = _native()
    if native is not None and weight.shape[0] >= _NATIVE_CHANNEL_BLOCK:
        return native.conv3x3(x, weight, bias, stride=2)
    return mx.conv2d(x, weight, stride=2, padding=1) + bias


def _conv3x3_stride2_vjp(primals, cotangent, output):
    # MLX's own VJP of a strided convolution runs an input-dilated convolution that its CPU
    # backend computes element by element (50x the forward's time); here it is two GEMMs.
    x, weight, _ = primals
    g = _single(cotangent)
    b, h, w, c = x.shape
    o, ho, wo = weight.shape[0], h // 2, w // 2
    g_flat = g.reshape(-1, o)
    # dW: the output gradient against the nine strided taps of the padded input (im2col, one GEMM).
    dw = (g_flat.T @ _stride2_taps(x)).reshape(o, 3, 3, c)
    # dx: every output pixel (i, j) sends g @ W[:, dy, dx] to padded input pixel (2i + dy, 2j + dx).
    # One GEMM gives all nine products; they land on the four row/column parities of the padded
    # input (dy = 0, 2 on even rows, the dy = 2 ones one row lower; dy = 1 on odd rows).
    t = (g_flat @ weight.reshape(o, 9 * c)).reshape(b, ho, wo, 3, 3, c)

    def rows(dy_even_0, dy_even_2):  # (B, ho + 1, ...): tap 0 at row i, tap 2 at row i + 1
        return mx.pad(dy_even_0, ((0, 0), (0, 1), (0, 0), (0, 0))) + mx.pad(dy_even_2, ((0, 0), (1, 0), (0, 0), (0, 0)))

    def cols(tap0, tap2):
        return mx.pad(tap0, ((0, 0), (0, 0), (0, 1), (0, 0))) + mx.pad(tap2, ((0, 0), (0, 0), (1, 0), (0, 0)))

    def pad_row(a):
        return mx.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0)))

    def pad_col(a):
        return mx.pad(a, ((0, 0), (0, 0), (0, 1), (0, 0)))

    ee = rows(cols(t[:, :, :, 0, 0], t[:, :, :, 0, 2]), cols(t[:, :, :, 2, 0], t[:, :, :, 2, 2]))
    eo = rows(pad_col(t[:, :, :, 0, 1]), pad_col(t[:, :, :, 2, 1]))
    oe = pad_row(cols(t[:, :, :, 1, 0], t[:, :, :, 1, 2]))
    oo = pad_row(pad_col(t[:, :, :, 1, 1]))
    even_rows = mx.stack([ee, eo], axis=3)  # (B, ho + 1, wo + 1, 2 column parities, C)
    odd_rows = mx.stack([oe, oo], axis=3)
    grid = mx.stack([even_rows, odd_rows], axis=2).reshape(b, 2 * ho + 2, 2 * wo + 2, c)
    return grid[:, 1: h + 1, 1: w + 1, :], dw, g_flat.sum(axis=0)


_conv3x3_stride2 = _custom_vjp(_conv3x3_stride2_forward, _conv3x3_stride2_vjp)


def conv3x3_stride2(x, weight, bias):
    """3x3 convolution, stride 2, zero padding 1, channels last, on even-sized images: the native
    kernel (else MLX's forward) with a written-out gradient (see ``_conv3x3_stride2_vjp``); odd
    sizes use MLX's own."""
    if x.shape[1] % 2 or x.shape[2] % 2:
        return mx.conv2d(x, weight, stride=2, padding=1) + bias
    return _conv3x3_stride2(x, weight, bias)

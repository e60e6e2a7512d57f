"""MLX score networks: a DDPM++-style U-Net for images (NHWC) and an MLP for points in R^d.

Both map (u, t) -> alpha (a class-conditional net: (u, t, label) -> alpha), shaped like one
data block; u holds the n blocks of the extended state side by side on the last axis. The
architecture (which layers, their checkpoint names, how they are wired) is ``hold_mlx.netplan``;
this file builds and runs one layer of each kind in MLX, as the torch mirror in export/ does in
torch (only conv weights change layout: MLX O,kH,kW,I vs torch O,I,kH,kW).
"""

from __future__ import annotations

import math

from . import fastops
from ._mlx import mx, nn
from .netconfig import NET_PRESETS, NetConfig, net_preset
from .netplan import Layer, embed, find_layer, module_args, net_labels, net_plan, place_layer, run_body

__all__ = ["NetConfig", "NET_PRESETS", "net_preset", "build_net", "PlannedNet", "UNet", "MLP", "count_params"]


# ----------------------------------------------------------------------------- building blocks


class FourierTime(nn.Module):
    """Gaussian Fourier features of log t (CLD-SGM): [sin(2 pi w log t), cos(2 pi w log t)].

    W is a fixed random buffer (frozen, but saved in the checkpoint so every runtime agrees).
    """

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.W = mx.random.normal((dim // 2,), key=mx.random.key(0)) * scale
        self.freeze(keys=["W"])

    def __call__(self, t):
        proj = mx.log(t)[:, None] * self.W[None, :] * (2.0 * math.pi)
        return mx.concatenate([mx.sin(proj), mx.cos(proj)], axis=-1)


def _zero_init(layer):
    layer.weight = mx.zeros_like(layer.weight)
    if "bias" in layer:
        layer.bias = mx.zeros_like(layer.bias)
    return layer


def silu(x):
    return fastops.silu(x) if fastops.enabled() else nn.silu(x)


def softmax(x):
    """Over the last axis."""
    return fastops.softmax(x) if fastops.enabled() else mx.softmax(x, axis=-1)


class GroupNorm(nn.GroupNorm):
    """torch-compatible GroupNorm that can apply SiLU in the same pass (``act=True``)."""

    def __call__(self, x, act: bool = False):
        if fastops.enabled():
            return fastops.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act=act)
        y = super().__call__(x)
        return nn.silu(y) if act else y


class Conv2d(nn.Conv2d):
    """nn.Conv2d that runs 3x3 convolutions (stride 1 or 2, padding 1) through ``fastops`` on the CPU."""

    def __call__(self, x):
        if (fastops.enabled() and self.weight.shape[1:3] == (3, 3) and tuple(self.stride) in ((1, 1), (2, 2))
                and tuple(self.padding) == (1, 1) and self.dilation in (1, (1, 1)) and "bias" in self):
            if tuple(self.stride) == (2, 2):
                return fastops.conv3x3_stride2(x, self.weight, self.bias)
            return fastops.conv3x3(x, self.weight, self.bias)
        return super().__call__(x)


def _norm(channels: int, groups: int):
    return GroupNorm(min(groups, channels), channels, eps=1e-6, pytorch_compatible=True)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-dropout-conv(zero), skip; output scaled by 1/sqrt 2."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(Conv2d(c_out, c_out, 3, padding=1))
        if c_in != c_out:
            self.skip = Conv2d(c_in, c_out, 1)

    def __call__(self, x, emb):
        h = self.conv1(self.norm1(x, act=True))
        h = h + self.emb(silu(emb))[:, None, None, :]
        h = self.conv2(self.dropout(self.norm2(h, act=True)))
        skip = self.skip(x) if "skip" in self else x
        return (skip + h) * (1.0 / math.sqrt(2.0))


class Attention(nn.Module):
    """Single-head self-attention over the pixels (Linear layers: same layout in MLX and torch)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_init(nn.Linear(channels, channels))

    def __call__(self, x, emb=None):
        b, h, w, c = x.shape
        q, k, v = mx.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        weights = softmax((q @ k.transpose(0, 2, 1)) * (c ** -0.5))
        out = self.proj(weights @ v).reshape(b, h, w, c)
        return (x + out) * (1.0 / math.sqrt(2.0))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x, emb=None):
        if fastops.enabled():  # without the 4x image, where the native kernels run
            return fastops.upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        return self.conv(fastops.upsample2(x))


# ----------------------------------------------------------------------------- networks

#: The MLX module of each ``hold_mlx.netplan`` layer kind, built with ``netplan.module_args``.
MODULES = {"fourier": FourierTime, "linear": nn.Linear, "conv": Conv2d, "norm_silu": _norm, "resblock": ResBlock,
           "attention": Attention, "downsample": Downsample, "upsample": Upsample, "embedding": nn.Embedding}


def _concat_channels(h, skip):
    return mx.concatenate([h, skip], axis=-1)


class PlannedNet(nn.Module):
    """A score network built from and run by its ``hold_mlx.netplan`` plan; (u, t) -> alpha."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.plan = net_plan(cfg)
        for layer in self.plan.layers:
            module = MODULES[layer.kind](*module_args(layer, self.plan))
            place_layer(self, layer, _zero_init(module) if layer.zero_init else module)

    def run_layer(self, layer: Layer, x, emb):
        """One plan layer's forward pass."""
        module = find_layer(self, layer)
        if layer.kind == "resblock":
            return module(x, emb)
        if layer.kind == "norm_silu":
            return module(x, act=True)  # GroupNorm and SiLU in one pass
        return module(silu(x) if layer.act_in else x)

    def __call__(self, u, t, label=None):
        """alpha(u, t); a class-conditional net also takes integer labels (B,) (None: the "no
        label" class for every sample, the unconditional model)."""
        inputs = {"t": t, "label": net_labels(self.cfg, label, t.shape[0], mx.full)}
        return run_body(self.plan, self.run_layer, _concat_channels, u, embed(self.plan, self.run_layer, inputs))


class UNet(PlannedNet):
    """DDPM++-style U-Net, NHWC. Input (B, H, W, n*C), times (B,); output alpha (B, H, W, C).
    Layout: ``hold_mlx.netplan.unet_plan``."""


class MLP(PlannedNet):
    """Score network for points: input (B, n*d) and times (B,), output alpha (B, d).
    Layout: ``hold_mlx.netplan.mlp_plan``."""


def build_net(cfg: NetConfig):
    return UNet(cfg) if cfg.kind == "unet" else MLP(cfg)


def count_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))

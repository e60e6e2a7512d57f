"""MLX score networks: a DDPM++-style U-Net for images (NHWC) and an MLP for points in R^d.

Both map (u, t) -> alpha, shaped like one data block; u holds the n blocks of the extended state
side by side on the last axis. The parameter names here ARE the checkpoint keys, and the torch
mirror in export/ uses the same names (only conv weights change layout: MLX O,kH,kW,I vs torch
O,I,kH,kW). Change a name here and you change the checkpoint format.
"""

from __future__ import annotations

import math

from . import fastops
from ._mlx import mx, nn
from .netconfig import NET_PRESETS, NetConfig, net_preset

__all__ = ["NetConfig", "NET_PRESETS", "net_preset", "build_net", "UNet", "MLP", "count_params"]


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
        weights = mx.softmax((q @ k.transpose(0, 2, 1)) * (c ** -0.5), axis=-1)
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
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


# ----------------------------------------------------------------------------- networks


class UNet(nn.Module):
    """DDPM++-style U-Net, NHWC. Input (B, H, W, n*C), times (B,); output alpha (B, H, W, C).

    Layout (the torch mirror follows it exactly):
      time: FourierTime -> Linear(ch, 4ch) -> SiLU -> Linear(4ch, 4ch)
      conv_in; down[level] = [ResBlock (+Attention)] x num_res_blocks (+ Downsample)
      mid = ResBlock, Attention, ResBlock
      up[level] = [ResBlock on concat skip (+Attention)] x (num_res_blocks + 1) (+ Upsample)
      norm_out -> SiLU -> conv_out (zero-initialised)
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        ch, groups = cfg.channels, cfg.groups
        emb_dim = 4 * ch
        self.time_features = FourierTime(ch, cfg.fourier_scale)
        self.time_in = nn.Linear(ch, emb_dim)
        self.time_out = nn.Linear(emb_dim, emb_dim)
        self.conv_in = Conv2d(cfg.order * cfg.data_channels, ch, 3, padding=1)

        res = cfg.image_size
        skips = [ch]
        c_cur = ch
        self.down = []
        for level, mult in enumerate(cfg.channel_mult):
            layers = []
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c_cur, ch * mult, emb_dim, cfg.dropout, groups))
                c_cur = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(Attention(c_cur, groups))
                skips.append(c_cur)
            if level != len(cfg.channel_mult) - 1:
                layers.append(Downsample(c_cur))
                skips.append(c_cur)
                res //= 2
            self.down.append(layers)

        self.mid = [ResBlock(c_cur, c_cur, emb_dim, cfg.dropout, groups), Attention(c_cur, groups),
                    ResBlock(c_cur, c_cur, emb_dim, cfg.dropout, groups)]

        self.up = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            layers = []
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(c_cur + skips.pop(), ch * mult, emb_dim, cfg.dropout, groups))
                c_cur = ch * mult
                if res in cfg.attn_resolutions:
                    layers.append(Attention(c_cur, groups))
            if level != 0:
                layers.append(Upsample(c_cur))
                res *= 2
            self.up.append(layers)

        self.norm_out = _norm(c_cur, groups)
        self.conv_out = _zero_init(Conv2d(c_cur, cfg.data_channels, 3, padding=1))

    def __call__(self, u, t):
        emb = self.time_out(silu(self.time_in(self.time_features(t))))
        h = self.conv_in(u)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
                if not isinstance(layer, Attention):
                    hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layers in self.up:
            for layer in layers:
                if isinstance(layer, ResBlock):
                    h = mx.concatenate([h, hs.pop()], axis=-1)
                h = layer(h, emb)
        return self.conv_out(self.norm_out(h, act=True))


class MLP(nn.Module):
    """Score network for points: input (B, n*d) and the time features, output alpha (B, d)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden
        self.time_features = FourierTime(width, cfg.fourier_scale)
        self.time_in = nn.Linear(width, width)
        self.inp = nn.Linear(cfg.order * cfg.data_channels, width)
        self.layers = [nn.Linear(width, width) for _ in range(cfg.depth)]
        self.out = _zero_init(nn.Linear(width, cfg.data_channels))

    def __call__(self, u, t):
        emb = self.time_in(self.time_features(t))
        h = self.inp(u) + emb
        for layer in self.layers:
            h = h + layer(silu(h))
        return self.out(silu(h))


def build_net(cfg: NetConfig):
    return UNet(cfg) if cfg.kind == "unet" else MLP(cfg)


def count_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))

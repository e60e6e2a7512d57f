"""The score networks in PyTorch (NCHW), mirroring ``hold_mlx.nets`` layer for layer.

Module and parameter names equal the MLX ones, so a checkpoint key means the same tensor in both
frameworks; only the layout of conv weights differs, and ``layout.py`` converts it explicitly.
Change a name here only together with ``hold_mlx/nets.py``: the parity tests hold them together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hold_mlx.netconfig import NetConfig

__all__ = ["UNet", "MLP", "build_net"]


class FourierTime(nn.Module):
    """Gaussian Fourier features of log t; W comes from the checkpoint (a buffer, not trained)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # placeholder values until a checkpoint loads
        self.register_buffer("W", torch.randn(dim // 2, generator=generator) * scale)

    def forward(self, t):
        proj = torch.log(t.float())[:, None] * self.W[None, :].float() * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def fp32_time_embedding(embed, t):
    """``embed(t)`` in fp32 even under autocast: log t spans decades, the Fourier phases are large
    and the embedding is tiny next to the convolutions. Outside autocast (eager fp32, ONNX export)
    no context manager is entered at all."""
    if torch.is_autocast_enabled(t.device.type):
        with torch.autocast(device_type=t.device.type, enabled=False):
            return embed(t.float())
    return embed(t)


def _zero_init(layer):
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _norm(channels: int, groups: int):
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.skip(x) if self.skip is not None else x
        return (skip + h) * (1.0 / math.sqrt(2.0))


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_init(nn.Linear(channels, channels))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C), the MLX NHWC order
        q, k, v = self.qkv(tokens)[:, None].chunk(3, dim=-1)  # (B, 1 head, HW, C) each
        # softmax(q k^T / sqrt(C)) v with one head, by the fused kernel (flash / memory-efficient on CUDA)
        out = self.proj(F.scaled_dot_product_attention(q, k, v)[:, 0])
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return (x + out) * (1.0 / math.sqrt(2.0))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Input (B, n*C, H, W) and times (B,); output alpha (B, C, H, W). See hold_mlx.nets.UNet."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        ch, groups = cfg.channels, cfg.groups
        emb_dim = 4 * ch
        self.time_features = FourierTime(ch, cfg.fourier_scale)
        self.time_in = nn.Linear(ch, emb_dim)
        self.time_out = nn.Linear(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(cfg.order * cfg.data_channels, ch, 3, padding=1)

        res = cfg.image_size
        skips = [ch]
        c_cur = ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            layers = nn.ModuleList()
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

        self.mid = nn.ModuleList([ResBlock(c_cur, c_cur, emb_dim, cfg.dropout, groups), Attention(c_cur, groups),
                                  ResBlock(c_cur, c_cur, emb_dim, cfg.dropout, groups)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            layers = nn.ModuleList()
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
        self.conv_out = _zero_init(nn.Conv2d(c_cur, cfg.data_channels, 3, padding=1))

    def embed_time(self, t):
        return self.time_out(F.silu(self.time_in(self.time_features(t))))

    def forward(self, u, t):
        emb = fp32_time_embedding(self.embed_time, t)
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
                    h = torch.cat([h, hs.pop()], dim=1)
                h = layer(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):
    """Input (B, n*d) and times (B,); output alpha (B, d). See hold_mlx.nets.MLP."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden
        self.time_features = FourierTime(width, cfg.fourier_scale)
        self.time_in = nn.Linear(width, width)
        self.inp = nn.Linear(cfg.order * cfg.data_channels, width)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(cfg.depth)])
        self.out = _zero_init(nn.Linear(width, cfg.data_channels))

    def embed_time(self, t):
        return self.time_in(self.time_features(t))

    def forward(self, u, t):
        emb = fp32_time_embedding(self.embed_time, t)
        h = self.inp(u) + emb
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))


def build_net(cfg: NetConfig) -> nn.Module:
    return UNet(cfg) if cfg.kind == "unet" else MLP(cfg)

"""The score networks in PyTorch (NCHW), built from the same plan as ``hold_mlx.nets``.

``hold_mlx.netplan`` names every module, so a checkpoint key means the same tensor in both
frameworks; only the layout of conv weights differs, and ``layout.py`` converts it explicitly.
Each layer kind's torch module here must compute what the MLX one does: the parity tests hold
them together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hold_mlx.netconfig import NetConfig
from hold_mlx.netplan import Layer, embed, find_layer, module_args, net_labels, net_plan, place_layer, run_body

__all__ = ["PlannedNet", "UNet", "MLP", "build_net"]


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


#: The torch module of each ``hold_mlx.netplan`` layer kind, built with ``netplan.module_args``.
MODULES = {"fourier": FourierTime, "linear": nn.Linear, "conv": nn.Conv2d, "norm_silu": _norm, "resblock": ResBlock,
           "attention": Attention, "downsample": Downsample, "upsample": Upsample, "embedding": nn.Embedding}


def _concat_channels(h, skip):
    return torch.cat([h, skip], dim=1)


class PlannedNet(nn.Module):
    """A score network built from and run by its ``hold_mlx.netplan`` plan (channels first):
    the same modules under the same names as ``hold_mlx.nets.PlannedNet``."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.plan = net_plan(cfg)
        for layer in self.plan.layers:
            module = MODULES[layer.kind](*module_args(layer, self.plan))
            place_layer(self, layer, _zero_init(module) if layer.zero_init else module, nn.ModuleList)

    def run_layer(self, layer: Layer, x, emb):
        """One plan layer's forward pass."""
        module = find_layer(self, layer)
        if layer.kind == "resblock":
            return module(x, emb)
        if layer.kind == "norm_silu":
            return F.silu(module(x))
        return module(F.silu(x) if layer.act_in else x)

    def embed_time(self, t, label=None):
        """The embedding of times t (and labels, for a class-conditional net)."""
        return embed(self.plan, self.run_layer, {"t": t, "label": label})

    def forward(self, u, t, label=None):
        """alpha(u, t); a class-conditional net also takes int64 labels (B,) (None: the "no label"
        class for every sample, the unconditional model)."""
        label = net_labels(self.cfg, label, t.shape[0],
                           lambda shape, value: torch.full(shape, value, dtype=torch.long, device=t.device))
        return run_body(self.plan, self.run_layer, _concat_channels, u,
                        fp32_time_embedding(lambda t: self.embed_time(t, label), t))


class UNet(PlannedNet):
    """Input (B, n*C, H, W) and times (B,); output alpha (B, C, H, W). Layout: ``hold_mlx.netplan.unet_plan``."""


class MLP(PlannedNet):
    """Input (B, n*d) and times (B,); output alpha (B, d). Layout: ``hold_mlx.netplan.mlp_plan``."""


def build_net(cfg: NetConfig) -> nn.Module:
    return UNet(cfg) if cfg.kind == "unet" else MLP(cfg)

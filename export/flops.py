"""Model FLOPs per image, counted analytically from a NetConfig (no framework needed).

Convention (the usual one for model-FLOPs utilisation): 2 FLOPs per multiply-add of every
convolution, linear layer and attention matmul; normalisations, activations, softmax and
additions are left out (they are a few percent and run on the vector units, not the tensor
cores). A training step costs about 3x the forward pass (the backward pass computes gradients
with respect to both inputs and weights); ``torch.utils.flop_counter`` gives the exact figure,
and ``tools/bench_cuda.py`` and the tests cross-check this count against it.
"""

from __future__ import annotations

from collections import Counter

from hold_mlx.netconfig import NetConfig

__all__ = ["forward_flops", "counted_flops", "TRAIN_FACTOR"]

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients) ~ 3 forward passes


def forward_flops(cfg: NetConfig) -> Counter:
    """Forward FLOPs for ONE image (or point), by kind: "conv", "linear", "attention"."""
    return _unet_flops(cfg) if cfg.kind == "unet" else _mlp_flops(cfg)


def counted_flops(cfg: NetConfig) -> tuple[float, float]:
    """(forward, training step) FLOPs per image measured by torch.utils.flop_counter on the
    torch mirror (CPU, batch 1, math attention so that the attention matmuls are seen)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .torch_nets import build_net

    net = build_net(cfg)
    width = cfg.order * cfg.data_channels
    u = torch.randn(1, width, cfg.image_size, cfg.image_size) if cfg.kind == "unet" else torch.randn(1, width)
    t = torch.full((1,), 0.5)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                net(u, t)
        with FlopCounterMode(display=False) as train:
            net(u, t).square().mean().backward()
    return float(forward.get_total_flops()), float(train.get_total_flops())


def _conv(c_in, c_out, size, k=3):
    return 2 * k * k * c_in * c_out * size * size


def _unet_flops(cfg: NetConfig) -> Counter:
    ch, emb = cfg.channels, 4 * cfg.channels
    f = Counter()
    f["linear"] += 2 * ch * emb + 2 * emb * emb  # time_in, time_out

    def res_block(c_in, c_out, size):
        f["conv"] += _conv(c_in, c_out, size) + _conv(c_out, c_out, size)
        f["linear"] += 2 * emb * c_out  # the time embedding's projection
        if c_in != c_out:
            f["conv"] += _conv(c_in, c_out, size, k=1)

    def attention(c, size):
        tokens = size * size
        f["linear"] += tokens * (2 * c * 3 * c + 2 * c * c)  # qkv, proj
        f["attention"] += 2 * (2 * tokens * tokens * c)  # q k^T and weights @ v

    size = cfg.image_size
    f["conv"] += _conv(cfg.order * cfg.data_channels, ch, size)  # conv_in
    skips, c = [ch], ch
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            res_block(c, ch * mult, size)
            c = ch * mult
            if size in cfg.attn_resolutions:
                attention(c, size)
            skips.append(c)
        if level != len(cfg.channel_mult) - 1:
            size //= 2  # NetConfig guarantees even sizes here
            f["conv"] += _conv(c, c, size)  # the stride-2 conv, counted at its output size
            skips.append(c)
    res_block(c, c, size)
    attention(c, size)
    res_block(c, c, size)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for _ in range(cfg.num_res_blocks + 1):
            res_block(c + skips.pop(), ch * mult, size)
            c = ch * mult
            if size in cfg.attn_resolutions:
                attention(c, size)
        if level != 0:
            size *= 2
            f["conv"] += _conv(c, c, size)
    f["conv"] += _conv(c, cfg.data_channels, size)  # conv_out
    return f


def _mlp_flops(cfg: NetConfig) -> Counter:
    w = cfg.hidden
    f = Counter()
    f["linear"] += 2 * w * w  # time_in
    f["linear"] += 2 * cfg.order * cfg.data_channels * w + cfg.depth * 2 * w * w + 2 * w * cfg.data_channels
    return f

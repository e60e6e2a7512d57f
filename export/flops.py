"""Model FLOPs per image, counted analytically from the network plan (no framework needed).

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
from hold_mlx.netplan import Layer, NetPlan, net_plan

__all__ = ["forward_flops", "layer_flops", "counted_flops", "LAYER_FLOPS", "TRAIN_FACTOR"]

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients) ~ 3 forward passes


def forward_flops(cfg: NetConfig) -> Counter:
    """Forward FLOPs for ONE image (or point), by kind: "conv", "linear", "attention"."""
    total = Counter()
    for counts in layer_flops(cfg).values():
        total.update(counts)
    return total


def layer_flops(cfg: NetConfig) -> dict[str, Counter]:
    """Forward FLOPs for one image of each layer of the network plan, by the layer's name."""
    plan = net_plan(cfg)
    return {layer.name: LAYER_FLOPS[layer.kind](layer, plan) for layer in plan.layers}


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


def _linear(c_in, c_out, rows=1):
    return 2 * c_in * c_out * rows


def _resblock(layer: Layer, plan: NetPlan) -> Counter:
    c_in, c_out, size = layer.c_in, layer.c_out, layer.size
    conv = _conv(c_in, c_out, size) + _conv(c_out, c_out, size)
    if c_in != c_out:
        conv += _conv(c_in, c_out, size, k=1)  # the 1x1 skip
    return Counter(conv=conv, linear=_linear(plan.emb_dim, c_out))  # + the time embedding's projection


def _attention(layer: Layer, plan: NetPlan) -> Counter:
    c, tokens = layer.c_in, layer.size * layer.size
    return Counter(linear=_linear(c, 3 * c, tokens) + _linear(c, c, tokens),  # qkv, proj
                   attention=2 * (2 * tokens * tokens * c))  # q k^T and weights @ v


#: Forward FLOPs of one layer of each ``hold_mlx.netplan`` kind, for one image (or point).
LAYER_FLOPS = {
    "fourier": lambda layer, plan: Counter(),
    "linear": lambda layer, plan: Counter(linear=_linear(layer.c_in, layer.c_out, max(layer.size, 1) ** 2)),
    "conv": lambda layer, plan: Counter(conv=_conv(layer.c_in, layer.c_out, layer.size)),
    "norm_silu": lambda layer, plan: Counter(),
    "resblock": _resblock,
    "attention": _attention,
    # the resampling convs are 3x3, counted at their output size (stride 2 / after the 2x upsampling)
    "downsample": lambda layer, plan: Counter(conv=_conv(layer.c_in, layer.c_out, layer.size_out)),
    "upsample": lambda layer, plan: Counter(conv=_conv(layer.c_in, layer.c_out, layer.size_out)),
    "embedding": lambda layer, plan: Counter(),  # a row lookup
}

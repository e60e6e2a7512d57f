"""MLX <-> torch parity checks, shared by the tests and ``tools/bench_cuda.py``.

A parity check needs weights that exercise every layer: trained-from-scratch networks start with
zero-initialised output convolutions (the output would be 0 on both sides), so
:func:`random_checkpoint_tensors` draws every tensor at random, in the checkpoint layout. It
needs torch only; :func:`network_parity` also needs MLX.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from hold_mlx.checkpoint import make_config
from hold_mlx.netconfig import NetConfig

from .torch_model import apply_channels_last, checkpoint_tensors, load_weights
from .torch_nets import build_net

__all__ = ["one_torch_thread", "random_checkpoint_tensors", "random_checkpoint_config", "network_inputs",
           "network_labels", "torch_alpha",
           "mlx_alpha", "network_parity", "weight_gap_in_steps", "differing_tensors"]


@contextlib.contextmanager
def one_torch_thread():
    """torch on one CPU thread inside the block: tiny test models run fastest so, and on a busy
    machine OpenMP's spin-waiting threads slow them down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def random_checkpoint_tensors(cfg: NetConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a ``cfg`` network drawn at random (checkpoint layout, float32).

    Weights ~ N(0, 1/fan_in) so activations stay O(1) through the depth; norm scales 1 + N(0, 0.1²);
    biases N(0, 0.1²); the Fourier frequencies keep their N(0, scale²) law."""
    rng = np.random.default_rng(seed)
    net = build_net(cfg)
    norm_scales = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    torch_layout = {}
    for key, value in net.state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("time_features.W"):
            w = rng.standard_normal(shape) * cfg.fourier_scale
        elif key.endswith("label_emb.weight"):  # a lookup table: rows of the time embedding's size
            w = rng.standard_normal(shape)
        elif len(shape) >= 2:
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif key in norm_scales:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.1 * rng.standard_normal(shape)
        torch_layout[key] = torch.from_numpy(w.astype(np.float32))
    net.load_state_dict(torch_layout)
    return checkpoint_tensors(net)


def random_checkpoint_config(cfg: NetConfig, sde, *, mixed_score: bool = True) -> dict:
    """A checkpoint config for random weights: image data in [-1, 1] or points in their units."""
    if cfg.kind == "unet":
        data = {"name": "random", "kind": "image", "shape": [cfg.image_size, cfg.image_size, cfg.data_channels],
                "shift": 0.5, "scale": 0.5}
    else:
        data = {"name": "random", "kind": "points", "shape": [cfg.data_channels], "shift": 0.0, "scale": 1.0}
    return make_config(sde, cfg, data, mixed_score=mixed_score)


def network_inputs(cfg: NetConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(u, t): a channels-last extended state and forward times spread over [1e-3, 5]."""
    rng = np.random.default_rng(seed)
    width = cfg.order * cfg.data_channels
    shape = (batch, cfg.image_size, cfg.image_size, width) if cfg.kind == "unet" else (batch, width)
    t = np.exp(rng.uniform(np.log(1e-3), np.log(5.0), batch))
    return rng.standard_normal(shape).astype(np.float32), t.astype(np.float32)


def network_labels(cfg: NetConfig, batch: int, seed: int = 0) -> np.ndarray | None:
    """Labels for a class-conditional ``cfg`` (every class and "no label" drawn), None otherwise."""
    if not cfg.num_classes:
        return None
    return np.random.default_rng([seed, 17]).integers(0, cfg.num_classes + 1, batch).astype(np.int64)


def torch_alpha(cfg: NetConfig, tensors: dict[str, np.ndarray], u: np.ndarray, t: np.ndarray,
                device="cpu", labels: np.ndarray | None = None) -> np.ndarray:
    net = build_net(cfg)
    load_weights(net, tensors)
    net = net.to(device).eval()
    with torch.no_grad():
        out = apply_channels_last(net, torch.from_numpy(u).to(device), torch.from_numpy(t).to(device),
                                  labels=None if labels is None else torch.from_numpy(labels).to(device))
    return out.float().cpu().numpy()


def mlx_alpha(cfg: NetConfig, tensors: dict[str, np.ndarray], u: np.ndarray, t: np.ndarray,
              labels: np.ndarray | None = None) -> np.ndarray:
    from hold_mlx._mlx import mx
    from hold_mlx.model import set_flat_params
    from hold_mlx.nets import build_net as build_mlx_net

    net = build_mlx_net(cfg)
    set_flat_params(net, tensors)
    net.eval()
    extra = () if labels is None else (mx.array(labels.astype(np.int32)),)
    return np.array(net(mx.array(u), mx.array(t), *extra))


def network_parity(cfg: NetConfig, batch_sizes=(1, 3, 8), seed: int = 0, device="cpu") -> dict[int, float]:
    """{batch: max |alpha_mlx - alpha_torch| / max |alpha_mlx|} for one set of random weights."""
    tensors = random_checkpoint_tensors(cfg, seed)
    out = {}
    for b in batch_sizes:
        u, t = network_inputs(cfg, b, seed + b)
        labels = network_labels(cfg, b, seed + b)
        ref = mlx_alpha(cfg, tensors, u, t, labels)
        out[b] = float(np.abs(ref - torch_alpha(cfg, tensors, u, t, device, labels)).max() / np.abs(ref).max())
    return out


def weight_gap_in_steps(a: dict[str, np.ndarray], b: dict[str, np.ndarray], lr: float,
                        prefixes=("raw/", "ema/")) -> tuple[float, float]:
    """(99th percentile, max) of |a - b| over the weights, in units of one Adam step (lr).

    Two runs that differ only by float rounding drift apart by a tiny fraction of a step, except
    where a gradient is at Adam's eps (~1e-8): there m / sqrt(v) turns rounding into a visible
    fraction of a step. The percentile is the sharp test; the max only bounds those elements."""
    gaps = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a if k.startswith(prefixes)]) / lr
    return float(np.percentile(gaps, 99)), float(gaps.max())


def differing_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Keys present on one side only or whose tensors are not bitwise equal (sorted)."""
    return sorted(set(a) ^ set(b) | {k for k in set(a) & set(b) if not np.array_equal(a[k], b[k])})

"""Checkpoints in torch: load weights into the mirrored networks and score for the shared samplers.

The samplers keep the extended state channels-last (blocks on the last axis) on every backend;
``TorchScoreModel`` views it as NCHW for the network (free when the network runs channels_last).
"""

from __future__ import annotations

import numpy as np
import torch

from hold_mlx.checkpoint import (check_tensors, default_checkpoint, net_config_from, read_tensors,
                                 resolve_model_file, sde_from_config)
from hold_mlx.netconfig import NetConfig
from hold_mlx.objective import score_scale
from hold_mlx.sde import LinearSDE

from .layout import checkpoint_to_torch, conv_weight_keys, torch_to_checkpoint
from .torch_nets import build_net

__all__ = ["TorchScoreModel", "load_torch_model", "load_weights", "checkpoint_tensors", "resolve_device",
           "apply_channels_last"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, with a clear error when CUDA is asked for but absent."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device ({err}); use cpu or cuda") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise RuntimeError(f"--device cuda: no usable CUDA device (torch {torch.__version__}, {build}); "
                               "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def load_weights(net: torch.nn.Module, tensors: dict[str, np.ndarray], source="checkpoint") -> None:
    """Load checkpoint-layout tensors into ``net`` strictly (every key, every shape)."""
    converted = checkpoint_to_torch(tensors, conv_weight_keys(net))
    check_tensors(net.state_dict(), converted, source, note=" after the layout map")
    net.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in converted.items()})


def checkpoint_tensors(net: torch.nn.Module) -> dict[str, np.ndarray]:
    """The network's weights as checkpoint-layout NumPy tensors (float32)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    return torch_to_checkpoint(state, conv_weight_keys(net))


def apply_channels_last(net: torch.nn.Module, u, t, *, memory_format=torch.channels_last):
    """``net`` on channels-last data: u (B, H, W, n*C) -> alpha (B, H, W, C); points pass through.

    The NCHW view of an NHWC tensor is exactly torch's channels_last memory format, so images go
    in without a copy; ``memory_format=torch.contiguous_format`` copies them to plain NCHW first
    (for a network whose weights are not channels_last)."""
    if u.ndim != 4:
        return net(u, t)
    return net(u.permute(0, 3, 1, 2).contiguous(memory_format=memory_format), t).permute(0, 2, 3, 1)


class TorchScoreModel:
    """score(u, t) for u (B, ..., n*C) channels-last torch tensors and t (B,); see hold_mlx.model."""

    def __init__(self, net: torch.nn.Module, sde: LinearSDE, config: dict, *, amp_dtype=None):
        self.net, self.sde, self.config = net, sde, config
        self.mixed_score = bool(config["objective"].get("mixed_score", True))
        self.data_channels = int(config["net"]["data_channels"])
        # e.g. torch.bfloat16 on CUDA: the network autocast, its time embedding, the score and the
        # sampler in fp32 (None: fp32 throughout, the setting the parity tests hold to MLX)
        self.amp_dtype = amp_dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def alpha(self, u, t):
        """The network output, channels-last like u, in u's dtype."""
        with torch.autocast(device_type=u.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            return apply_channels_last(self.net, u, t).to(u.dtype)

    @torch.no_grad()
    def __call__(self, u, t):
        return self.score(u, t)

    def score(self, u, t):
        """The score with autograd left on (the likelihood differentiates it; __call__ does not)."""
        a, b = score_scale(self.sde, t.detach().cpu().numpy(), mixed_score=self.mixed_score)
        shape = (-1,) + (1,) * (u.ndim - 1)
        a = torch.as_tensor(a, dtype=u.dtype, device=u.device).reshape(shape)
        score = a * self.alpha(u, t.to(u.dtype))
        if self.mixed_score:
            b = torch.as_tensor(b, dtype=u.dtype, device=u.device).reshape(shape)
            score = score + b * u[..., -self.data_channels:]
        return score


def load_torch_model(path=None, device="cpu") -> tuple[TorchScoreModel, LinearSDE, dict]:
    """(model, sde, config) from a run folder or .safetensors file (default: the shipped model)."""
    path = resolve_model_file(path if path is not None else default_checkpoint())
    tensors, config = read_tensors(path)
    sde = sde_from_config(config, path)
    net_cfg: NetConfig = net_config_from(config, path)
    net = build_net(net_cfg)
    load_weights(net, tensors, source=str(path))
    net = net.to(resolve_device(device)).eval()
    return TorchScoreModel(net, sde, config), sde, config

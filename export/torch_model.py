"""Checkpoints in torch: load weights into the mirrored networks and score for the shared samplers.

The samplers keep the extended state channels-last (blocks on the last axis) on every backend;
``TorchScoreModel`` views it as NCHW for the network (free when the network runs channels_last).
"""

from __future__ import annotations

import numpy as np
import torch

from hold_mlx.checkpoint import (CheckpointError, default_checkpoint, net_config_from, read_tensors,
                                 resolve_model_file, sde_from_config)
from hold_mlx.netconfig import NetConfig
from hold_mlx.objective import score_scale
from hold_mlx.sde import LinearSDE

from .layout import checkpoint_to_torch, conv_weight_keys, torch_to_checkpoint
from .torch_nets import build_net

__all__ = ["TorchScoreModel", "load_torch_model", "load_weights", "checkpoint_tensors", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, with a clear error when CUDA is asked for but absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: this torch has no usable CUDA device "
                           f"(torch {torch.__version__}); use --device cpu")
    return device


def load_weights(net: torch.nn.Module, tensors: dict[str, np.ndarray], source="checkpoint") -> None:
    """Load checkpoint-layout tensors into ``net`` strictly (every key, every shape)."""
    converted = checkpoint_to_torch(tensors, conv_weight_keys(net))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the network config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(converted[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(converted[k].shape)} after the layout "
                                  f"map, the network expects {tuple(v.shape)}")
    net.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in converted.items()})


def checkpoint_tensors(net: torch.nn.Module) -> dict[str, np.ndarray]:
    """The network's weights as checkpoint-layout NumPy tensors (float32)."""
    state = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    return torch_to_checkpoint(state, conv_weight_keys(net))


class TorchScoreModel:
    """score(u, t) for u (B, ..., n*C) channels-last torch tensors and t (B,); see hold_mlx.model."""

    def __init__(self, net: torch.nn.Module, sde: LinearSDE, config: dict):
        self.net, self.sde, self.config = net, sde, config
        self.mixed_score = bool(config["objective"].get("mixed_score", True))
        self.data_channels = int(config["net"]["data_channels"])
        self.image = config["net"]["kind"] == "unet"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def alpha(self, u, t):
        """The network output, channels-last like u."""
        if self.image:
            return self.net(u.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1)
        return self.net(u, t)

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

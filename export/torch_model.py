"""Checkpoints in torch: weights into and out of the mirrored networks, and the channels-last view.

The samplers keep the extended state channels-last (blocks on the last axis) on every backend;
``apply_channels_last`` views it as NCHW for the network (free when the network runs
channels_last). ``hold_mlx.load(path, backend="torch")`` gives the score model
(``hold_mlx.backends.TorchBackend``).
"""

from __future__ import annotations

import numpy as np
import torch

from hold_mlx.checkpoint import check_tensors

from .layout import checkpoint_to_torch, conv_weight_keys, torch_to_checkpoint

__all__ = ["load_weights", "checkpoint_tensors", "resolve_device", "apply_channels_last"]


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


def apply_channels_last(net: torch.nn.Module, u, t, *, labels=None, memory_format=torch.channels_last):
    """``net`` on channels-last data: u (B, H, W, n*C) -> alpha (B, H, W, C); points pass through.

    The NCHW view of an NHWC tensor is exactly torch's channels_last memory format, so images go
    in without a copy; ``memory_format=torch.contiguous_format`` copies them to plain NCHW first
    (for a network whose weights are not channels_last). ``labels``: a class-conditional net's
    int64 labels (B,), passed on only when given."""
    extra = () if labels is None else (labels,)
    if u.ndim != 4:
        return net(u, t, *extra)
    return net(u.permute(0, 3, 1, 2).contiguous(memory_format=memory_format), t, *extra).permute(0, 2, 3, 1)

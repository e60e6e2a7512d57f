"""The one explicit map between checkpoint tensors (MLX layout) and torch tensors.

Keys are identical in both frameworks (the module trees mirror each other). Layouts differ only
for 2-D convolution weights: MLX stores (O, kH, kW, I), torch (O, I, kH, kW). Which keys are conv
weights is read from the torch module tree, never guessed from a tensor's shape (a 3x3 conv with 3
input channels has the same shape in both layouts, and a 1x1 conv's weight looks like a matrix),
and the checkpoint's ``layout`` tag says which side a file is on (``hold_mlx.checkpoint.LAYOUT``).
The map applies to every tensor family keyed like the weights (raw, EMA, Adam moments).
"""

from __future__ import annotations

import numpy as np
from torch import nn

__all__ = ["TO_TORCH", "TO_CHECKPOINT", "conv_weight_keys", "checkpoint_to_torch", "torch_to_checkpoint"]

TO_TORCH = (0, 3, 1, 2)  # conv weight (O, kH, kW, I) -> (O, I, kH, kW)
TO_CHECKPOINT = (0, 2, 3, 1)  # and back; TO_CHECKPOINT undoes TO_TORCH exactly


def conv_weight_keys(net: nn.Module) -> frozenset[str]:
    """Names of the 2-D convolution weights in ``net`` (the tensors whose layout differs).

    Any other convolution kind has no agreed MLX layout here, so it is refused rather than passed
    through unconverted."""
    keys = set()
    for name, module in net.named_modules():
        if type(module) is nn.Conv2d:
            keys.add(f"{name}.weight" if name else "weight")
        elif isinstance(module, nn.modules.conv._ConvNd):
            raise TypeError(f"{name}: {type(module).__name__} has no MLX layout in hold_export.layout; "
                            "add its permutation there (and a test) before using it")
    return frozenset(keys)


def _permute(tensors: dict[str, np.ndarray], conv_keys, axes) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        if k in conv_keys:
            if v.ndim != 4:
                raise ValueError(f"{k}: a conv weight must have 4 axes, got shape {tuple(v.shape)}")
            v = np.ascontiguousarray(np.transpose(v, axes))
        out[k] = v
    return out


def checkpoint_to_torch(tensors: dict[str, np.ndarray], conv_keys) -> dict[str, np.ndarray]:
    """MLX-layout tensors -> torch layout (conv O,kH,kW,I -> O,I,kH,kW); other tensors unchanged."""
    return _permute(tensors, conv_keys, TO_TORCH)


def torch_to_checkpoint(tensors: dict[str, np.ndarray], conv_keys) -> dict[str, np.ndarray]:
    """torch-layout tensors -> MLX layout (conv O,I,kH,kW -> O,kH,kW,I); other tensors unchanged."""
    return _permute(tensors, conv_keys, TO_CHECKPOINT)

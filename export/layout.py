"""The one explicit map between checkpoint tensors (MLX layout) and torch tensors.

Keys are identical in both frameworks (the module trees mirror each other). Layouts differ only
for convolution weights: MLX stores (O, kH, kW, I), torch (O, I, kH, kW). Which keys are conv
weights is read from the torch module tree, never guessed from a tensor's shape, and the
checkpoint's ``layout`` tag says which side a file is on (``hold_mlx.checkpoint.LAYOUT``).
"""

from __future__ import annotations

import numpy as np
from torch import nn

__all__ = ["conv_weight_keys", "checkpoint_to_torch", "torch_to_checkpoint"]


def conv_weight_keys(net: nn.Module) -> frozenset[str]:
    """Names of the 2-D convolution weights in ``net`` (the tensors whose layout differs)."""
    return frozenset(f"{name}.weight" for name, module in net.named_modules() if isinstance(module, nn.Conv2d))


def checkpoint_to_torch(tensors: dict[str, np.ndarray], conv_keys) -> dict[str, np.ndarray]:
    """MLX-layout tensors -> torch layout (conv O,kH,kW,I -> O,I,kH,kW); other tensors unchanged."""
    return {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)) if k in conv_keys else v for k, v in tensors.items()}


def torch_to_checkpoint(tensors: dict[str, np.ndarray], conv_keys) -> dict[str, np.ndarray]:
    """torch-layout tensors -> MLX layout (conv O,I,kH,kW -> O,kH,kW,I); other tensors unchanged."""
    return {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) if k in conv_keys else v for k, v in tensors.items()}

"""hold-mlx: high-order Langevin diffusion models (HOLD, CLD, VP) on MLX.

Attributes load lazily (PEP 562), so ``import hold_mlx.sde`` or the onnxruntime path never pulls
in MLX or torch; importing changes no global state of MLX or BLAS until a backend is configured
(``hold_mlx.load`` does it).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "get_sde": ("hold_mlx.sde", "get_sde"),
    "LinearSDE": ("hold_mlx.sde", "LinearSDE"),
    "sample": ("hold_mlx.api", "sample"),
    "load": ("hold_mlx.model", "load"),
    "save": ("hold_mlx.model", "save_model"),
    "Model": ("hold_mlx.model", "Model"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hold_mlx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""Tiny array adapters: the one sampler implementation drives NumPy, MLX and torch arrays.

The samplers only need +, -, * with Python floats (which all three frameworks share) and the
handful of operations below. NumPy is the reference (and the onnxruntime path); MLX and torch
are imported only when their adapter is asked for.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Ops", "NumpyOps", "MLXOps", "TorchOps", "get_ops", "ops_for"]


class Ops:
    """The operations a sampler needs beyond arithmetic. Arrays have the batch on axis 0."""

    name = "abstract"

    def asarray(self, x: np.ndarray):  # numpy -> backend float32
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def concat(self, xs: list):  # along the last axis
        raise NotImplementedError

    def sqrt(self, x):
        raise NotImplementedError

    def where(self, cond, a, b):
        raise NotImplementedError

    def abs(self, x):
        return abs(x)

    def maximum(self, a, b):
        raise NotImplementedError

    def concat_batch(self, xs: list):  # along axis 0
        raise NotImplementedError

    def per_sample_mask(self, mask: np.ndarray, ndim: int):
        """(B,) bool NumPy mask -> backend bool array (B, 1, ..., 1) for ``where``."""
        return np.asarray(mask, dtype=bool).reshape((-1,) + (1,) * (ndim - 1))

    def eval(self, *xs) -> None:
        """Force computation (MLX is lazy); keeps the graph small between sampler steps."""

    def per_sample(self, values: np.ndarray, ndim: int):
        """(B,) float64 NumPy values -> backend array shaped (B, 1, ..., 1) to scale a batch."""
        return self.asarray(np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1)))

    def sum_squares(self, x) -> np.ndarray:
        """Per-sample sum of squares, as float64 NumPy (B,)."""
        flat = x.reshape(x.shape[0], -1)
        return self.to_numpy((flat * flat).sum(axis=1)).astype(np.float64)

    def all_finite(self, x) -> bool:
        return bool(np.isfinite(self.to_numpy(x)).all())


class NumpyOps(Ops):
    name = "numpy"

    def __init__(self, dtype=np.float32):
        self.dtype = dtype

    def asarray(self, x):
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def concat(self, xs):
        return np.concatenate(xs, axis=-1)

    def sqrt(self, x):
        return np.sqrt(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def concat_batch(self, xs):
        return np.concatenate(xs, axis=0)


class MLXOps(Ops):
    name = "mlx"

    def __init__(self):
        from hold_mlx._mlx import mx

        self.mx = mx

    def asarray(self, x):
        return self.mx.array(np.asarray(x, dtype=np.float32))

    def to_numpy(self, x):
        return np.array(x)

    def concat(self, xs):
        return self.mx.concatenate(xs, axis=-1)

    def sqrt(self, x):
        return self.mx.sqrt(x)

    def where(self, cond, a, b):
        return self.mx.where(cond if not isinstance(cond, np.ndarray) else self.mx.array(cond), a, b)

    def maximum(self, a, b):
        return self.mx.maximum(a, b)

    def concat_batch(self, xs):
        return self.mx.concatenate(xs, axis=0)

    def eval(self, *xs):
        self.mx.eval(*xs)

    def sum_squares(self, x):
        flat = x.reshape(x.shape[0], -1)
        return np.array((flat * flat).sum(axis=1)).astype(np.float64)


class TorchOps(Ops):
    name = "torch"

    def __init__(self, device="cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def asarray(self, x):
        return self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def concat(self, xs):
        return self.torch.cat(xs, dim=-1)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def where(self, cond, a, b):
        if isinstance(cond, np.ndarray):
            cond = self.torch.as_tensor(cond, device=self.device)
        return self.torch.where(cond, a, b)

    def maximum(self, a, b):
        return self.torch.maximum(a, b)

    def concat_batch(self, xs):
        return self.torch.cat(xs, dim=0)

    def sum_squares(self, x):
        flat = x.reshape(x.shape[0], -1)
        return (flat * flat).sum(dim=1).double().cpu().numpy()


def get_ops(backend: str, **kwargs) -> Ops:
    """Adapter by name: "numpy" (also used for onnxruntime), "mlx" or "torch" (device=...)."""
    if backend in ("numpy", "onnx"):
        return NumpyOps()
    if backend == "mlx":
        return MLXOps()
    if backend == "torch":
        return TorchOps(**kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose mlx, torch or numpy")


def ops_for(x) -> Ops:
    """The adapter matching an array's framework."""
    if isinstance(x, np.ndarray):
        return NumpyOps(x.dtype.type)
    module = type(x).__module__
    if module.startswith("mlx"):
        return MLXOps()
    if module.startswith("torch"):
        return TorchOps(device=x.device)
    raise TypeError(f"no array adapter for {type(x).__name__}")

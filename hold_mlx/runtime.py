"""One score model, three runtimes: MLX, torch and onnxruntime behind one small interface.

``load_runtime(checkpoint, backend)`` returns the score callable, the SDE, the checkpoint config
and the array adapter the shared samplers need. Only the chosen backend's framework is imported,
so ``--backend onnx`` runs without MLX and torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backends import Ops
from .sde import LinearSDE

__all__ = ["Runtime", "load_runtime", "BACKENDS", "draw_samples"]

BACKENDS = ("mlx", "torch", "onnx")


@dataclass
class Runtime:
    score_fn: Callable
    sde: LinearSDE
    config: dict
    ops: Ops
    backend: str

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.config["data"]["shape"])

    @property
    def data_kind(self) -> str:
        return self.config["data"]["kind"]


def load_runtime(checkpoint=None, backend: str = "mlx", *, device: str = "cpu", threads: int | None = None) -> Runtime:
    """The model in ``checkpoint`` (run folder, .safetensors or, for onnx, .onnx; None: the
    shipped model) on ``backend``."""
    if backend != "onnx" and checkpoint is not None and str(checkpoint).lower().endswith(".onnx"):
        raise ValueError(f"{checkpoint}: an ONNX model runs with --backend onnx (MLX and torch read the "
                         ".safetensors checkpoint it was exported from)")
    if backend == "mlx":
        from .backends import MLXOps
        from .model import load_model

        model, sde, config = load_model(checkpoint)
        return Runtime(model, sde, config, MLXOps(), "mlx")
    if backend == "torch":
        try:
            import torch
        except ImportError as err:
            raise RuntimeError("--backend torch needs PyTorch: pip install 'hold-mlx[torch]' "
                               "(on Linux: pip install torch==2.13.0 first)") from err
        from hold_export.torch_model import load_torch_model

        from .backends import TorchOps

        if threads:
            torch.set_num_threads(int(threads))
        model, sde, config = load_torch_model(checkpoint, device=device)
        return Runtime(model, sde, config, TorchOps(model.device), "torch")
    if backend == "onnx":
        try:
            from hold_export.onnx_runtime import load_onnx_model
        except ImportError as err:
            raise RuntimeError(f"--backend onnx needs onnxruntime: pip install 'hold-mlx[onnx]' ({err})") from err
        from .backends import NumpyOps

        model, sde, config = load_onnx_model(checkpoint, threads=threads)
        return Runtime(model, sde, config, NumpyOps(), "onnx")
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def draw_samples(runtime: Runtime, n: int, *, batch_size: int = 64, seed: int = 0, progress=None,
                 **sample_options) -> tuple[np.ndarray, int]:
    """n samples in model space as float32 NumPy (N, *data_shape), drawn in batches.

    With portable noise (the default) sample i depends only on (seed, i), not on batch_size.
    ``progress(k)`` is called after every sampler step of every batch. Returns (samples, NFE per
    batch).
    """
    from .api import sample_full

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    out, nfe = [], 0
    callback = (lambda step, t, u: progress(1)) if progress is not None else None
    for lo in range(0, n, batch_size):
        b = min(batch_size, n - lo)
        result = sample_full(runtime.sde, runtime.score_fn, (b, *runtime.data_shape), ops=runtime.ops, seed=seed,
                             first_index=lo, callback=callback, **sample_options)
        out.append(runtime.ops.to_numpy(result.x).astype(np.float32))
        nfe = result.nfe
    return np.concatenate(out), nfe

"""Import MLX with a fast BLAS on Linux.

The ``mlx[cpu]`` Linux wheel links a reference (netlib) BLAS: matmuls and convolutions run
20-80x slower than with an optimised one. Loading the system's OpenBLAS into the global symbol
scope *before* ``mlx.core`` is imported makes MLX's BLAS calls resolve to it. Set
``HOLD_MLX_BLAS`` to a library path to choose another one, or to ``none`` to keep the bundled BLAS.

Every module of hold_mlx that needs MLX imports it from here.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: Which BLAS MLX uses: a library path, "bundled" (nothing preloaded) or "accelerate" (macOS).
BLAS = "bundled"
#: Why the choice was made (for ``hold-mlx doctor``).
BLAS_NOTE = ""


def _preload_blas() -> None:
    global BLAS, BLAS_NOTE
    if sys.platform == "darwin":
        BLAS, BLAS_NOTE = "accelerate", "macOS: MLX uses Accelerate and Metal"
        return
    if "mlx.core" in sys.modules:
        BLAS_NOTE = "mlx.core was imported before hold_mlx; import hold_mlx first to get OpenBLAS"
        return
    choice = os.environ.get("HOLD_MLX_BLAS", "").strip()
    if choice.lower() == "none":
        BLAS_NOTE = "HOLD_MLX_BLAS=none: keeping the BLAS bundled with mlx (slow on Linux)"
        return
    for path in [choice] if choice else _CANDIDATES:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            BLAS_NOTE = f"could not load {path}: {err}"
            continue
        BLAS, BLAS_NOTE = path, "preloaded into the global symbol scope before mlx.core"
        return
    if choice:
        BLAS_NOTE = f"HOLD_MLX_BLAS={choice} does not exist; using the bundled BLAS (slow)"
    else:
        BLAS_NOTE = "no OpenBLAS found (apt-get install libopenblas0-pthread); using the bundled BLAS (slow)"


_preload_blas()

try:
    import mlx.core as mx  # noqa: E402
    import mlx.nn as nn  # noqa: E402
    import mlx.optimizers as optim  # noqa: E402
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"MLX is not usable ({err}). On Linux install the CPU backend: pip install 'mlx[cpu]'"
    ) from err

__all__ = ["mx", "nn", "optim", "BLAS", "BLAS_NOTE"]

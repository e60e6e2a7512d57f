"""Import MLX with a fast BLAS on Linux.

The ``mlx[cpu]`` Linux wheel links a reference (netlib) BLAS: matmuls and convolutions run
20-80x slower than with an optimised one. Loading the system's OpenBLAS into the global symbol
scope *before* ``mlx.core`` is imported makes MLX's BLAS calls resolve to it. Set
``HOLD_MLX_BLAS`` to a library path to choose another one, or to ``none`` to keep the bundled BLAS.

Importing this module changes no other global state. The CPU settings are made by
``configure_cpu()`` (the MLX backend's ``configure``, called by ``hold_mlx.load``, training and
the CLI; Linux, MLX on the CPU; macOS/GPU are left alone):

* MLX's buffer cache. MLX keeps at most 32 MiB of freed buffers on the CPU; a U-Net step at
  batch 64 churns through hundreds of MiB, so every large allocation came fresh from the
  kernel and was zero-filled page by page (~2 us per 4 KiB page on these VMs: 0.1-0.3 s per
  network call). ``HOLD_MLX_CACHE_MB`` (default: a quarter of RAM, at most 4096) raises it.
* Threads. MLX runs element-wise work on one thread per stream; BLAS has its own threads.
  ``cpu_streams()`` gives one MLX CPU stream per core (``threads=`` or ``HOLD_MLX_THREADS``
  overrides) and the network splits its batch across them (``split_batch``); BLAS then runs one
  thread per call (``HOLD_MLX_BLAS_THREADS`` overrides), so the cores are not oversubscribed.

Every module of hold_mlx that needs MLX imports it from here.
"""

from __future__ import annotations

import ctypes
import os
import sys

from .machine import cpu_count, max_threads  # no MLX import: safe before the BLAS preload

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
    if BLAS_NOTE:  # a library was there but would not load
        BLAS_NOTE += "; using the bundled BLAS (slow)"
    elif choice:
        BLAS_NOTE = f"HOLD_MLX_BLAS={choice} does not exist; using the bundled BLAS (slow)"
    else:
        BLAS_NOTE = "no OpenBLAS found (apt-get install libopenblas0-pthread); using the bundled BLAS (slow)"


# The one thing done at import: the BLAS must be in the global symbol scope before mlx.core is
# loaded (MLX's BLAS symbols are bound when its library loads), and mlx.core is imported just below.
_preload_blas()

try:
    import mlx.core as mx  # noqa: E402
    import mlx.nn as nn  # noqa: E402
    import mlx.optimizers as optim  # noqa: E402
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"MLX is not usable ({err}). On Linux install the CPU backend: pip install 'mlx[cpu]'"
    ) from err



def _on_cpu() -> bool:
    return sys.platform != "darwin" and mx.default_device() == mx.cpu


def _env_int(name: str, default: int, high: int = 1 << 20) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value[:40]!r} is not an integer; unset it or give a number") from None
    if not 0 <= number <= high:
        raise ValueError(f"{name}={number} is out of range: give 0 to {high} (or unset it)")
    return number


#: Threads per BLAS call as set by hold_mlx (None: left at the library's default).
BLAS_THREADS = None


def set_blas_threads(n: int) -> bool:
    """Threads per BLAS call, if the preloaded BLAS is OpenBLAS; False if it cannot be set."""
    global BLAS_THREADS
    if BLAS in ("bundled", "accelerate"):
        return False
    try:
        lib = ctypes.CDLL(BLAS)
        lib.openblas_set_num_threads(int(n))
    except (OSError, AttributeError):
        return False
    BLAS_THREADS = int(n)
    return True


_STREAMS: list = []
#: The settings the last ``configure_cpu`` call applied (None: never configured).
_CONFIGURED: tuple | None = None


def cpu_streams() -> list:
    """The MLX CPU streams a batch is split across (``configure_cpu`` creates them).

    Empty before ``configure_cpu``, when MLX computes on a GPU, or when one thread is wanted.
    """
    if _CONFIGURED is None or _CONFIGURED[0] <= 1 or not _on_cpu():
        return []
    return _STREAMS[:_CONFIGURED[0]]


#: Smallest piece of a batch worth its own stream.
MIN_ROWS_PER_STREAM = 4


def split_batch(fn, *arrays, streams=None) -> list:
    """[fn(*pieces)] with the batch (axis 0 of every array) cut into one piece per MLX CPU stream.

    MLX runs element-wise work on one thread per stream, so on a CPU a batch split across
    streams keeps every core busy (BLAS then runs one thread per call). Returns the list of
    per-piece results, in batch order; one piece when there is no stream to use.
    """
    import numpy as np

    streams = cpu_streams() if streams is None else streams
    rows = int(arrays[0].shape[0])
    k = min(len(streams), rows // MIN_ROWS_PER_STREAM)
    if k <= 1:
        return [fn(*arrays)]
    bounds = np.linspace(0, rows, k + 1).astype(int)
    out = []
    for stream, lo, hi in zip(streams, bounds[:-1], bounds[1:]):
        with mx.stream(stream):
            out.append(fn(*(a[lo:hi] for a in arrays)))
    return out


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)  # the setter is the only getter MLX has
    mx.set_cache_limit(limit)
    return limit


def describe_cpu_tuning() -> str:
    """One line for ``hold-mlx doctor``: streams, BLAS threads, buffer cache, fast ops."""
    if not _on_cpu():
        return f"none (MLX computes on {mx.default_device()})"
    from .fastops import enabled

    return (f"{max(1, len(cpu_streams()))} CPU stream(s), BLAS threads {BLAS_THREADS or 'default'}, "
            f"buffer cache {_cache_limit() // 2**20} MiB, "
            f"fast CPU ops {'on' if enabled() else 'off'}")


def configure_cpu(threads: int | None = None) -> None:
    """MLX's CPU settings: buffer cache, one stream per thread, BLAS threads (see the module doc).

    ``threads``: MLX CPU streams (None: ``HOLD_MLX_THREADS``, else one per core). Idempotent:
    calling again with the same settings changes nothing.
    """
    global _CONFIGURED
    if not _on_cpu():
        return
    streams = int(threads) if threads else _env_int("HOLD_MLX_THREADS", cpu_count(), high=max_threads())
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    cache_mb = _env_int("HOLD_MLX_CACHE_MB", min(4096, total_mb // 4), high=total_mb)
    blas_threads = _env_int("HOLD_MLX_BLAS_THREADS", 1 if streams > 1 else cpu_count(), high=max_threads())
    settings = (streams, cache_mb, blas_threads)
    if settings == _CONFIGURED:
        return
    if cache_mb > 0:
        mx.set_cache_limit(cache_mb * 2**20)
    if streams > 1:
        mx.default_stream(mx.cpu)  # make sure the default stream exists first (it takes index 0)
        while len(_STREAMS) < streams:
            _STREAMS.append(mx.new_stream(mx.cpu))
    set_blas_threads(blas_threads)
    _CONFIGURED = settings


__all__ = ["mx", "nn", "optim", "BLAS", "BLAS_NOTE", "BLAS_THREADS", "cpu_count", "cpu_streams", "configure_cpu",
           "split_batch", "set_blas_threads", "describe_cpu_tuning"]

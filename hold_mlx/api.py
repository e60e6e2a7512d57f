"""The public sampling entry point: ``hold_mlx.sample``."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .backends import Backend, array_framework, get_backend
from .noise import make_noise
from .samplers import SampleResult, run_sampler
from .sde import LinearSDE

__all__ = ["sample", "sample_full"]


def sample_full(sde: LinearSDE, score_fn: Callable, shape, *, sampler: str = "lie-trotter",
                steps: int = 100, seed: int = 0, backend: str = "mlx", noise: str = "portable",
                first_index: int = 0, grid: str | None = None, denoise: bool = True,
                callback: Callable | None = None, ops=None, **options) -> SampleResult:
    """Like :func:`sample` but returns a :class:`SampleResult` (data block, full state, NFE).

    ``first_index`` numbers the samples of this batch within a larger draw: with portable noise
    sample i of seed s is the same whichever batch it is drawn in.
    """
    _check_shape(score_fn, shape)
    ops = ops or get_backend(backend)
    ids = np.arange(first_index, first_index + int(shape[0]))
    return run_sampler(sde, _matching(score_fn, ops), tuple(shape), ops=ops, noise=make_noise(noise, seed, ids, ops),
                       sampler=sampler, steps=steps, grid=grid, denoise_final=denoise,
                       callback=callback, **options)


def _mismatch(framework: str, ops: Backend) -> ValueError:
    return ValueError(f"the score function computes on {framework} arrays but backend={ops.name!r} passes "
                      f"{ops.array_module} arrays; pass backend={framework!r} (a loaded model: use model.sample)")


def _matching(score_fn: Callable, ops: Backend) -> Callable:
    """score_fn, checked to compute on the arrays of ``ops``: before the first call when it says
    which backend it runs on (a loaded ``Model``), else on the array its first call returns."""
    owner = getattr(score_fn, "backend", None)
    if isinstance(owner, Backend):
        if owner.array_module != ops.array_module:
            raise _mismatch(owner.array_module, ops)
        return score_fn
    checked = False

    def score(u, t):
        nonlocal checked
        s = score_fn(u, t)
        if not checked:
            framework = array_framework(s)
            if framework in ("numpy", "mlx", "torch") and framework != ops.array_module:
                raise _mismatch(framework, ops)
            checked = True
        return s

    return score


def _check_shape(score_fn, shape) -> None:
    """Wrong shapes are named here, not by an error deep inside MLX or torch."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple (N, *data_shape), got {shape!r}") from None
    if len(shape) < 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
                                 for s in shape):
        raise ValueError(f"shape must be (N, *data_shape) with integers >= 1, got {shape!r}")
    expected = getattr(score_fn, "data_shape", None)
    if expected is not None and tuple(shape[1:]) != tuple(expected):
        raise ValueError(f"shape {tuple(shape)}: this model makes samples of shape {tuple(expected)}; "
                         f"pass (N, {', '.join(map(str, expected))})")


def sample(sde: LinearSDE, score_fn: Callable, shape, *, sampler: str = "lie-trotter",
           steps: int = 100, seed: int = 0, **kwargs):
    """Draw ``shape[0]`` samples of data shape ``shape`` (channels last) from the reverse SDE.

    ``score_fn(u, t)`` gets the extended state (the n blocks concatenated on the last axis) and
    forward times t of shape (B,), and returns the last block's score shaped like the data.
    Returns the data block as an array of ``backend`` ("mlx", the default: ``mx.array``; "torch";
    "numpy"), which must be the framework ``score_fn`` computes on. For a loaded model
    ``hold_mlx.load(...).sample(n, ...)`` picks the SDE and backend itself. Options: ``grid``
    ("uniform" | "quadratic" | "log-sigma" | "edm"; None: the sampler's default), ``denoise``
    (final noise-free step, default on), ``noise`` ("portable" | "native"), ``callback(step, t, u)``,
    and sampler options (``substeps``,
    ``variant`` for poisson-midpoint; ``snr``, ``momentum`` for ams; ``method``, ``rtol``, ``atol``
    for ode; ``order``, ``eta`` for gddim).
    """
    return sample_full(sde, score_fn, shape, sampler=sampler, steps=steps, seed=seed, **kwargs).x

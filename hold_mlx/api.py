"""The public sampling entry point: ``hold_mlx.sample``."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .backends import get_ops
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
    ops = ops or get_ops(backend)
    ids = np.arange(first_index, first_index + int(shape[0]))
    return run_sampler(sde, score_fn, tuple(shape), ops=ops, noise=make_noise(noise, seed, ids, ops),
                       sampler=sampler, steps=steps, grid=grid, denoise_final=denoise,
                       callback=callback, **options)


def sample(sde: LinearSDE, score_fn: Callable, shape, *, sampler: str = "lie-trotter",
           steps: int = 100, seed: int = 0, **kwargs):
    """Draw ``shape[0]`` samples of data shape ``shape`` (channels last) from the reverse SDE.

    ``score_fn(u, t)`` gets the extended state (the n blocks concatenated on the last axis) and
    forward times t of shape (B,), and returns the last block's score shaped like the data.
    Returns the data block as an ``mx.array`` (backend="mlx", the default). Options: ``grid``
    ("uniform" | "quadratic" | "log-sigma" | "edm"; None: the sampler's default), ``denoise``
    (final noise-free step, default on), ``noise`` ("portable" | "native"), ``callback(step, t, u)``, and sampler options (``substeps``,
    ``variant`` for poisson-midpoint; ``snr``, ``momentum`` for ams; ``method``, ``rtol``, ``atol``
    for ode; ``order``, ``eta`` for gddim).
    """
    return sample_full(sde, score_fn, shape, sampler=sampler, steps=steps, seed=seed, **kwargs).x

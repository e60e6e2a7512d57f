"""Noise sources for the samplers.

``PortableNoise`` keys a NumPy Philox stream by (seed, sample index): sample i of seed s sees the
same numbers on MLX, torch and onnxruntime, and whatever batch it is drawn in. ``NativeNoise``
draws from the backend's own generator (faster for huge batches, not reproducible across
backends). Both carry ``shared``, a NumPy generator for randomness common to the whole batch
(the Poisson-midpoint coin flips), which depends on the seed alone.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PortableNoise", "NativeNoise", "make_noise"]

_SHARED_STREAM = 2**64 - 1  # sample index reserved for batch-wide randomness


def _philox(seed: int, stream: int) -> np.random.Generator:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return np.random.Generator(np.random.Philox(key=(int(seed) << 64) | int(stream)))


class PortableNoise:
    """Standard normal draws that depend only on (seed, sample index, draw order)."""

    kind = "portable"

    def __init__(self, seed: int, sample_ids):
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self._streams = [_philox(seed, int(i)) for i in self.sample_ids]
        self.shared = _philox(seed, _SHARED_STREAM)

    @property
    def batch(self) -> int:
        return len(self._streams)

    def normal(self, ops, shape: tuple[int, ...]):
        """A (B, *shape) backend array of N(0, 1) numbers, one stream per sample."""
        draws = np.stack([g.standard_normal(shape, dtype=np.float32) for g in self._streams])
        return ops.asarray(draws)


class NativeNoise:
    """The backend's own generator (``Backend.native_normal``), seeded once."""

    kind = "native"

    def __init__(self, seed: int, batch: int, ops):
        self._batch = batch
        self.shared = _philox(seed, _SHARED_STREAM)
        self._draw = ops.native_normal(seed)

    @property
    def batch(self) -> int:
        return self._batch

    def normal(self, ops, shape: tuple[int, ...]):
        return self._draw((self._batch,) + tuple(shape))


def make_noise(kind: str, seed: int, sample_ids, ops):
    if kind == "portable":
        return PortableNoise(seed, sample_ids)
    if kind == "native":
        return NativeNoise(seed, len(sample_ids), ops)
    raise ValueError(f"unknown noise {kind!r}; choose portable or native")

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
    """The backend's own generator (NumPy, MLX or torch), seeded once."""

    kind = "native"

    def __init__(self, seed: int, batch: int, ops):
        self._batch = batch
        self.shared = _philox(seed, _SHARED_STREAM)
        if ops.name == "mlx":
            self._key = ops.mx.random.key(seed)
        elif ops.name == "torch":
            self._gen = ops.torch.Generator(device=ops.device).manual_seed(seed)
        else:
            self._rng = np.random.default_rng(seed)

    @property
    def batch(self) -> int:
        return self._batch

    def normal(self, ops, shape: tuple[int, ...]):
        full = (self._batch,) + tuple(shape)
        if ops.name == "mlx":
            self._key, sub = ops.mx.random.split(self._key)
            return ops.mx.random.normal(full, key=sub)
        if ops.name == "torch":
            return ops.torch.randn(full, generator=self._gen, device=ops.device)
        return self._rng.standard_normal(full).astype(ops.dtype if hasattr(ops, "dtype") else np.float32)


def make_noise(kind: str, seed: int, sample_ids, ops):
    if kind == "portable":
        return PortableNoise(seed, sample_ids)
    if kind == "native":
        return NativeNoise(seed, len(sample_ids), ops)
    raise ValueError(f"unknown noise {kind!r}; choose portable or native")

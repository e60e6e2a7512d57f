"""A trained model on one backend: ``hold_mlx.load(...)`` returns a :class:`Model`.

The model knows its SDE, its checkpoint config, its backend and its score parameterisation, so it
scores and samples without the caller matching an ``sde`` and a ``backend=`` by hand. The network
runs on the backend (MLX, torch or onnxruntime); the score is assembled by
``ScoreParameterisation`` the same way on all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backends import Backend, get_backend
from .parameterisation import ScoreParameterisation
from .sde import LinearSDE

__all__ = ["Model", "Samples", "load", "save_model", "flat_params", "set_flat_params"]


@dataclass
class Samples:
    """What :meth:`Model.sample` returns: samples in model space, and how they were drawn."""

    x: np.ndarray  # float32 (N, *data_shape), model space
    nfe: int  # batched network calls per batch
    data_config: dict

    def user_units(self) -> np.ndarray:
        """The samples in the data's own units (images in [0, 1])."""
        from .data import to_user_units

        return to_user_units(self.x, self.data_config)


class Model:
    """score(u, t) = the parameterisation applied to the backend's network; ``sample`` draws."""

    def __init__(self, backend: Backend, network_fn: Callable, sde: LinearSDE, config: dict, *, net=None):
        self.backend, self.sde, self.config = backend, sde, config
        self.net = net  # the framework's network object (onnxruntime: the graph's wrapper)
        self._network = network_fn
        self.parameterisation = ScoreParameterisation.from_config(sde, config)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.config["data"]["shape"])

    @property
    def data_kind(self) -> str:
        return self.config["data"]["kind"]

    def alpha(self, u, t):
        """The network output for backend arrays u (B, ..., n*C) channels-last and t (B,)."""
        return self._network(u, t)

    def score(self, u, t, labels=None):
        """The score of the last block, with gradients left on (the likelihood differentiates it)."""
        return self.parameterisation.score(self._network, self.backend, u, t, labels)

    def __call__(self, u, t, labels=None):
        """The samplers' ``score_fn``: :meth:`score` without gradients."""
        with self.backend.inference():
            return self.score(u, t, labels)

    def sample(self, n: int, *, sampler: str = "lie-trotter", steps: int = 100, seed: int = 0,
               batch_size: int = 64, callback: Callable | None = None, **options) -> Samples:
        """n samples, drawn in batches; NumPy float32 in model space (``.user_units()`` converts).

        With portable noise (the default) sample i depends only on (seed, i), not on batch_size.
        ``callback(step, t, u)`` runs after every sampler step of every batch. ``options`` are
        :func:`hold_mlx.sample`'s (grid, denoise, noise, sampler options).
        """
        from .api import sample_full

        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        out, nfe = [], 0
        for lo in range(0, n, batch_size):
            rows = min(batch_size, n - lo)
            result = sample_full(self.sde, self, (rows, *self.data_shape), ops=self.backend, sampler=sampler,
                                 steps=steps, seed=seed, first_index=lo, callback=callback, **options)
            out.append(self.backend.to_numpy(result.x).astype(np.float32))
            nfe = result.nfe
        return Samples(np.concatenate(out), nfe, self.config["data"])


def load(path=None, backend: str = "mlx", device: str = "cpu", threads: int | None = None, **options) -> Model:
    """The model in ``path`` (run folder, .safetensors or, for onnx, .onnx; None: the shipped
    model) on ``backend`` ("mlx", "torch" on ``device``, or "onnx"), with the backend's CPU
    settings applied (``threads``: MLX streams, torch or onnxruntime threads; ``options``: the
    backend's other ``configure`` settings, e.g. onnxruntime's ``optimization``)."""
    from .checkpoint import sde_from_config

    engine = get_backend(backend, device=device).configure(threads=threads, **options)
    net, network_fn, config = engine.load_network(path)
    sde = sde_from_config(config, path)
    return Model(engine, network_fn, sde, config, net=net)


def save_model(path, model, config: dict) -> None:
    """Write an MLX network (or an MLX :class:`Model`'s) as a checkpoint with ``config``."""
    from .checkpoint import write_tensors

    net = model.net if isinstance(model, Model) else model
    write_tensors(path, flat_params(net.parameters()), config)


def flat_params(tree) -> dict[str, np.ndarray]:
    """An MLX parameter tree as flat NumPy tensors (the checkpoint layout)."""
    from . import _mlx  # noqa: F401  (first: it preloads the BLAS before mlx.core loads)
    from mlx.utils import tree_flatten  # noqa: I001

    return {k: np.array(v) for k, v in tree_flatten(tree)}


def set_flat_params(net, tensors: dict[str, np.ndarray], source="checkpoint") -> None:
    """Load flat tensors into an MLX ``net`` strictly: every key present, every shape equal."""
    from ._mlx import mx  # first: it preloads the BLAS before mlx.core loads
    from mlx.utils import tree_flatten, tree_unflatten  # noqa: I001

    from .checkpoint import check_tensors

    expected = dict(tree_flatten(net.parameters()))
    check_tensors(expected, tensors, source)
    net.update(tree_unflatten([(k, mx.array(tensors[k])) for k in expected]))

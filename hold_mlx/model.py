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

__all__ = ["Model", "Samples", "load", "save_model", "flat_params", "set_flat_params", "DEFAULT_GUIDANCE"]

#: Classifier-free guidance weight w used when labels are given and no guidance is. Chosen by the
#: sweep of docs/results.md on the shipped model: the lowest FD among the weights whose samples the
#: classifier assigns to the requested class >= 90% of the time (w = 0 falls short of 90%).
DEFAULT_GUIDANCE = 0.5


@dataclass
class Samples:
    """What :meth:`Model.sample` returns: samples in model space, and how they were drawn."""

    x: np.ndarray  # float32 (N, *data_shape), model space
    nfe: int  # batched network calls per batch
    data_config: dict
    labels: np.ndarray | None = None  # (N,) the class of each sample (None: unconditional)
    guidance: float = 0.0

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

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 for an unconditional one."""
        return int(self.config["net"].get("num_classes", 0))

    @property
    def class_names(self) -> list[str]:
        """The class names (the checkpoint's data section; "0", "1", ... if it has none)."""
        names = self.config["data"].get("classes")
        return [str(c) for c in names] if names else [str(i) for i in range(self.num_classes)]

    def class_index(self, label) -> int:
        """A class given by name or index -> its index; a one-line error lists the valid names."""
        if not self.num_classes:
            raise ValueError("this model is unconditional (trained without --conditional): it has no classes; "
                             "sample without --class / labels")
        names = self.class_names
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.strip().isdigit()
                                                    and label.strip() not in names):
            index = int(label)
            if not 0 <= index < self.num_classes:
                raise ValueError(f"class {index} is out of range: choose 0 to {self.num_classes - 1} or a name: "
                                 f"{', '.join(names)}")
            return index
        if label in names:
            return names.index(label)
        folded = [n.casefold() for n in names]
        if str(label).casefold() in folded:
            return folded.index(str(label).casefold())
        raise ValueError(f"unknown class {label!r}; valid classes: {', '.join(repr(n) for n in names)}")

    def sample_labels(self, n: int, labels) -> np.ndarray:
        """Per-sample labels (n,) from one class (name or index) or a sequence of n of them."""
        if isinstance(labels, (str, int, np.integer)):
            return np.full(n, self.class_index(labels), dtype=np.int64)
        labels = list(np.asarray(labels).reshape(-1)) if isinstance(labels, np.ndarray) else list(labels)
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} samples; pass one label or one per sample")
        return np.array([self.class_index(label if isinstance(label, str) else int(label)) for label in labels],
                        dtype=np.int64)

    def alpha(self, u, t, labels=None):
        """The network output for backend arrays u (B, ..., n*C) channels-last and t (B,) (and a
        class-conditional model's integer labels (B,))."""
        return self._network(u, t) if labels is None else self._network(u, t, labels)

    def score(self, u, t, labels=None, guidance: float = 0.0):
        """The score of the last block, with gradients left on (the likelihood differentiates it).
        ``labels`` / ``guidance``: see ``ScoreParameterisation.score`` (class-conditional models)."""
        return self.parameterisation.score(self._network, self.backend, u, t, labels, guidance)

    def __call__(self, u, t, labels=None, guidance: float = 0.0):
        """The samplers' ``score_fn``: :meth:`score` without gradients."""
        with self.backend.inference():
            return self.score(u, t, labels, guidance)

    def conditioned(self, labels, guidance: float = 0.0) -> "ConditionedScore":
        """The samplers' ``score_fn`` for a batch with these per-sample labels (NumPy ints)."""
        return ConditionedScore(self, labels, guidance)

    def sample(self, n: int, *, sampler: str = "lie-trotter", steps: int = 100, seed: int = 0,
               batch_size: int = 64, callback: Callable | None = None, labels=None, guidance: float | None = None,
               **options) -> Samples:
        """n samples, drawn in batches; NumPy float32 in model space (``.user_units()`` converts).

        With portable noise (the default) sample i depends only on (seed, i), not on batch_size.
        ``callback(step, t, u)`` runs after every sampler step of every batch. ``options`` are
        :func:`hold_mlx.sample`'s (grid, denoise, noise, sampler options).

        A class-conditional model takes ``labels``: one class (name or index) for every sample or
        a sequence of n (sample i gets labels[i], whatever the batch size), and ``guidance`` w,
        the classifier-free guidance weight (None: ``DEFAULT_GUIDANCE``; 0: the plain conditional
        model). A guided step is one batched network call (one NFE) on twice the batch. Without
        labels a conditional model samples unconditionally (its "no label" class).
        """
        from .api import sample_full

        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        if labels is None:
            if guidance:
                raise ValueError("guidance needs class labels (labels=...)")
            per_sample, guidance = None, 0.0
        else:
            per_sample = self.sample_labels(n, labels)
            guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
            if not np.isfinite(guidance):
                raise ValueError(f"guidance must be a finite number, got {guidance}")
        out, nfe = [], 0
        for lo in range(0, n, batch_size):
            rows = min(batch_size, n - lo)
            score_fn = self if per_sample is None else self.conditioned(per_sample[lo:lo + rows], guidance)
            result = sample_full(self.sde, score_fn, (rows, *self.data_shape), ops=self.backend, sampler=sampler,
                                 steps=steps, seed=seed, first_index=lo, callback=callback, **options)
            out.append(self.backend.to_numpy(result.x).astype(np.float32))
            nfe = result.nfe
        return Samples(np.concatenate(out), nfe, self.config["data"], per_sample, guidance)


class ConditionedScore:
    """score_fn(u, t) of a model with per-sample labels and a guidance weight bound (the samplers
    call it like any score function); ``backend`` says which arrays it computes on."""

    def __init__(self, model: Model, labels: np.ndarray, guidance: float = 0.0):
        model.parameterisation.check_labels(np.asarray(labels))
        self.model, self.guidance = model, float(guidance)
        self.backend = model.backend
        self.labels = model.backend.asindex(np.asarray(labels))

    def score(self, u, t):
        return self.model.score(u, t, self.labels, self.guidance)

    def __call__(self, u, t):
        with self.backend.inference():
            return self.score(u, t)


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

"""An MLX score model: network + SDE + config, callable as the sampler's ``score_fn``."""

from __future__ import annotations

import numpy as np

from ._mlx import cpu_streams, mx
from .checkpoint import (check_tensors, default_checkpoint, net_config_from, read_tensors,
                         resolve_model_file, sde_from_config, write_tensors)
from .nets import build_net
from .objective import score_scale
from .sde import LinearSDE

__all__ = ["ScoreModel", "load_model", "save_model", "flat_params", "set_flat_params", "split_batch"]

#: Smallest piece of a batch worth its own stream.
MIN_ROWS_PER_STREAM = 4


def split_batch(fn, *arrays, streams=None) -> list:
    """[fn(*pieces)] with the batch (axis 0 of every array) cut into one piece per MLX CPU stream.

    MLX runs element-wise work on one thread per stream, so on a CPU a batch split across
    streams keeps every core busy (BLAS then runs one thread per call: see ``_mlx``). Returns
    the list of per-piece results, in batch order; one piece when there is no stream to use.
    """
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


def flat_params(tree) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(tree)}


def set_flat_params(net, tensors: dict[str, np.ndarray], source="checkpoint") -> None:
    """Load flat tensors into ``net`` strictly: every key present, every shape equal."""
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(net.parameters()))
    check_tensors(expected, tensors, source)
    net.update(tree_unflatten([(k, mx.array(tensors[k])) for k in expected]))


class ScoreModel:
    """score(u, t) = a(t) alpha(u, t) + b(t) u_n with a = -1/ell_t, b = -1/Sigma^mix_nn (0 if the
    model was trained without the mixed score); see ``objective.score_scale``."""

    def __init__(self, net, sde: LinearSDE, config: dict, *, compile: bool = True, parallel: bool = True):
        self.net, self.sde, self.config = net, sde, config
        self.mixed_score = bool(config["objective"].get("mixed_score", True))
        self.data_channels = int(config["net"]["data_channels"])
        # Compiled: element-wise chains fuse into single loops (the fast CPU ops rely on it).
        # The network's arrays are declared inputs, so updated weights are seen.
        self._alpha = mx.compile(self.net.__call__, inputs=[self.net]) if compile else self.net.__call__
        self.parallel = parallel

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.config["data"]["shape"])

    def __call__(self, u, t):
        a, b = score_scale(self.sde, np.array(t), mixed_score=self.mixed_score)
        shape = (-1,) + (1,) * (u.ndim - 1)
        pieces = split_batch(self._alpha, u, t) if self.parallel else [self._alpha(u, t)]
        alpha = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)
        score = mx.array(a.astype(np.float32)).reshape(shape) * alpha
        if self.mixed_score:
            score = score + mx.array(b.astype(np.float32)).reshape(shape) * u[..., -self.data_channels:]
        return score


def load_model(path=None) -> tuple[ScoreModel, LinearSDE, dict]:
    """(model, sde, config) from a run folder or .safetensors file (default: the shipped model)."""
    path = resolve_model_file(path if path is not None else default_checkpoint())
    tensors, config = read_tensors(path)
    sde = sde_from_config(config, path)
    net = build_net(net_config_from(config, path))
    set_flat_params(net, tensors, source=str(path))
    net.eval()
    return ScoreModel(net, sde, config), sde, config


def save_model(path, model, config: dict) -> None:
    net = model.net if isinstance(model, ScoreModel) else model
    write_tensors(path, flat_params(net.parameters()), config)

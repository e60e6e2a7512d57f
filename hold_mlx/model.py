"""An MLX score model: network + SDE + config, callable as the sampler's ``score_fn``."""

from __future__ import annotations

import numpy as np

from ._mlx import mx
from .checkpoint import (FORMAT_VERSION, LAYOUT, CheckpointError, default_checkpoint, read_tensors,
                         resolve_model_file, write_tensors)
from .nets import NetConfig, build_net
from .objective import score_scale
from .sde import LinearSDE, get_sde

__all__ = ["ScoreModel", "make_config", "sde_from_config", "load_model", "save_model",
           "flat_params", "set_flat_params"]


def make_config(sde: LinearSDE, net: NetConfig, data: dict, *, mixed_score: bool = True,
                weighting: str = "eps", extra: dict | None = None) -> dict:
    """The JSON config every checkpoint carries (DESIGN.md principle 3)."""
    return {
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "sde": sde.to_config(),
        "net": net.to_dict(),
        "data": dict(data),
        "objective": {"output": "alpha", "mixed_score": bool(mixed_score), "weighting": weighting},
        **(extra or {}),
    }


def sde_from_config(config: dict) -> LinearSDE:
    sde_cfg = config["sde"]
    try:
        return get_sde(sde_cfg["name"], **sde_cfg.get("params", {}))
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint has an invalid SDE config: {err}") from err


def flat_params(tree) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(tree)}


def set_flat_params(net, tensors: dict[str, np.ndarray], source="checkpoint") -> None:
    """Load flat tensors into ``net`` strictly: every key present, every shape equal."""
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(net.parameters()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the network config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, "
                                  f"the network expects {tuple(v.shape)}")
    net.update(tree_unflatten([(k, mx.array(tensors[k])) for k in expected]))


class ScoreModel:
    """score(u, t) = -alpha(u, t) / ell_t - u_n / Sigma^mix_nn(t) (the mixed term if enabled)."""

    def __init__(self, net, sde: LinearSDE, config: dict):
        self.net, self.sde, self.config = net, sde, config
        self.mixed_score = bool(config["objective"].get("mixed_score", True))
        self.data_channels = int(config["net"]["data_channels"])

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.config["data"]["shape"])

    def alpha(self, u, t):
        return self.net(u, t)

    def __call__(self, u, t):
        a, b = score_scale(self.sde, np.array(t), mixed_score=self.mixed_score)
        shape = (-1,) + (1,) * (u.ndim - 1)
        alpha = self.net(u, t)
        score = mx.array(a.astype(np.float32)).reshape(shape) * alpha
        if self.mixed_score:
            u_last = u[..., -self.data_channels:]
            score = score + mx.array(b.astype(np.float32)).reshape(shape) * u_last
        return score


def load_model(path=None) -> tuple[ScoreModel, LinearSDE, dict]:
    path = resolve_model_file(path if path is not None else default_checkpoint())
    tensors, config = read_tensors(path)
    sde = sde_from_config(config)
    try:
        net_cfg = NetConfig.from_dict(config["net"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid network config: {err}") from err
    net = build_net(net_cfg)
    set_flat_params(net, tensors, source=str(path))
    net.eval()
    return ScoreModel(net, sde, config), sde, config


def save_model(path, model, config: dict) -> None:
    net = model.net if isinstance(model, ScoreModel) else model
    write_tensors(path, flat_params(net.parameters()), config)

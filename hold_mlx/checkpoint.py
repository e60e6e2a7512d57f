"""One checkpoint format for every runtime: safetensors tensors + a JSON config in the metadata.

A run folder holds
  model.safetensors        EMA weights + config: what sampling, export and evaluation read
  train_state.safetensors  raw and EMA weights, optimizer state, step, RNG: what resuming reads
Both are written atomically (temporary file, fsync, rename), so a kill or a full disk never leaves
a half-written checkpoint behind; train_state is written first, so model.safetensors never runs
ahead of the state a resume starts from.

Tensors are stored in MLX's canonical layout (conv weights O, kH, kW, I), tagged
``"layout": "mlx"``; the torch mirror converts with its explicit key map (export/). This module
needs NumPy only: MLX and torch are imported by the callers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION", "LAYOUT", "MODEL_FILE", "STATE_FILE", "CheckpointError", "atomic_write",
    "write_tensors", "read_tensors", "read_config", "resolve_model_file", "validate_config",
    "default_checkpoint", "make_config", "sde_from_config", "check_tensors",
]

FORMAT_VERSION = 1
LAYOUT = "mlx"  # conv weights (O, kH, kW, I), activations NHWC
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
_META_KEY = "hold_mlx"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write {path}: {err.strerror or err}; "
                                  "free disk space or choose another --out") from err
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tensors(path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, save(arrays, metadata={_META_KEY: json.dumps(config, sort_keys=True)}))


def read_tensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as NumPy, config) from one .safetensors file, with clear errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    data = path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); "
                              "it may be truncated: restore it or retrain") from err
    return tensors, _config_from_header(path, data)


def _config_from_header(path: Path, data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without a hold-mlx config; "
                              "was it written by hold-mlx?")
    return validate_config(json.loads(meta[_META_KEY]), path)


def read_config(path) -> dict:
    """Only the config of a checkpoint (reads the header, not the tensors)."""
    path = resolve_model_file(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file too short to be a checkpoint")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise CheckpointError(f"{path}: corrupted safetensors header")
        rest = f.read(n)
    try:
        return _config_from_header(path, head + rest)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupted safetensors header ({err})") from err


def validate_config(config: dict, path="checkpoint") -> dict:
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this hold-mlx reads "
                              f"{FORMAT_VERSION}; upgrade hold-mlx or re-export")
    for key in ("sde", "net", "data", "objective", "layout"):
        if key not in config:
            raise CheckpointError(f"{path}: config has no {key!r} section")
    if config["layout"] != LAYOUT:
        raise CheckpointError(f"{path}: tensor layout {config['layout']!r}, expected {LAYOUT!r}")
    return config


def check_tensors(expected: dict, tensors: dict, source="checkpoint", note: str = "") -> None:
    """Raise a CheckpointError unless ``tensors`` has exactly the keys and shapes of ``expected``
    (name -> anything with a .shape): a network loads its weights strictly, never partially."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the network config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(tensors[k].shape)}{note}, "
                                  f"the network expects {tuple(v.shape)}")


def make_config(sde, net, data: dict, *, mixed_score: bool = True, weighting: str = "eps",
                extra: dict | None = None) -> dict:
    """The JSON config every checkpoint carries: format, layout, SDE, network, data, objective."""
    return {
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "sde": sde.to_config(),
        "net": net.to_dict(),
        "data": dict(data),
        "objective": {"output": "alpha", "mixed_score": bool(mixed_score), "weighting": weighting},
        **(extra or {}),
    }


def sde_from_config(config: dict, path="checkpoint"):
    """The SDE a checkpoint was trained with."""
    from .sde import get_sde

    sde_cfg = dict(config["sde"])
    try:
        return get_sde(sde_cfg.pop("name"), **sde_cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid SDE config in the checkpoint ({err})") from err


def net_config_from(config: dict, path="checkpoint"):
    """The NetConfig a checkpoint was trained with."""
    from .netconfig import NetConfig

    try:
        return NetConfig.from_dict(config["net"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid network config in the checkpoint ({err})") from err


def resolve_model_file(path) -> Path:
    """A run folder or a .safetensors file -> the model file."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path.parent}: run folder has no {MODEL_FILE} yet "
                                  "(train longer, or pass the .safetensors file)")
    elif not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (pass a run folder or a .safetensors file)")
    return path


def shipped_file(relative: str, env: str) -> Path | None:
    """A file shipped in weights/ (next to the package in a checkout, or installed data), or the
    path in the environment variable ``env``; None if neither exists."""
    if os.environ.get(env):
        return Path(os.environ[env])
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "weights" / relative, here / "weights" / relative):
        if candidate.is_file():
            return candidate
    return None


def default_checkpoint() -> Path:
    """The model shipped in weights/ (next to the package in a checkout, or installed data)."""
    path = shipped_file(f"fashion-mnist-hold/{MODEL_FILE}", "HOLD_MLX_WEIGHTS")
    if path is not None:
        return path
    raise CheckpointError("no shipped weights found (weights/fashion-mnist-hold/model.safetensors); "
                          "pass --checkpoint PATH or set HOLD_MLX_WEIGHTS")

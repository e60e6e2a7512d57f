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

import errno
import hashlib
import json
import math
import os
import socket
import tempfile
from pathlib import Path

import numpy as np

from .netconfig import MAX_ORDER, NET_FIELD_RULES, is_finite_number, is_int, net_field_problems

__all__ = [
    "FORMAT_VERSION", "LAYOUT", "MODEL_FILE", "STATE_FILE", "CheckpointError", "atomic_write",
    "write_tensors", "read_tensors", "read_config", "resolve_model_file", "validate_config",
    "default_checkpoint", "make_config", "sde_from_config", "check_tensors",
    "tensor_checksum", "validate_net_params", "validate_sde_params", "lock_run_folder", "append_line",
    "RunLocked", "MAX_ORDER",
]

FORMAT_VERSION = 1
LAYOUT = "mlx"  # conv weights (O, kH, kW, I), activations NHWC
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
_META_KEY = "hold_mlx"
_SUM_KEY = "hold_mlx_sha256"  # sha256 of the tensors (tensor_checksum); absent in older checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _write_error(path: Path, err: OSError) -> "CheckpointError":
    """An OSError while writing ``path`` -> a one-line error that names the path and the way out."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full: free disk space or choose another --out"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the folder is not writable: fix its permissions or choose another --out"
    elif code == errno.EISDIR:
        advice = "that path is a directory: choose a file name"
    elif code == errno.ELOOP:
        advice = "it is a symbolic link, which hold-mlx does not write through: remove the link"
    else:
        advice = "choose another --out"
    return CheckpointError(f"could not write {path}: {err.strerror or err}; {advice}")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one. A
    symbolic link at ``path`` is replaced, never written through."""
    path = Path(path)
    if path.is_dir():
        raise _write_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
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
            raise _write_error(path, err) from err
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log file durably: either the whole line is there after the call, or
    the file keeps its old content (a failed write is cut off again). Links are not followed."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise _write_error(path, err) from err
    finally:
        os.close(fd)


class RunLocked(CheckpointError):
    """Another process trains in this run folder."""


_HELD_LOCKS: dict[str, list] = {}  # real path -> [fd, count]: one flock per folder and process


class _RunLock:
    def __init__(self, key: str):
        self.key, self.released = key, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _HELD_LOCKS.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD_LOCKS[self.key]
            os.close(entry[0])  # closing the file releases the flock

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the kernel drops the lock anyway
            pass


def lock_run_folder(folder) -> _RunLock:
    """An exclusive lock on a run folder (``flock`` on ``folder/.lock``) for as long as the
    returned object lives. The kernel drops the lock when its process dies, so a killed run
    never blocks the next one. Creates the folder; raises :class:`RunLocked` naming the holder,
    or a :class:`CheckpointError` if the folder is not writable."""
    import fcntl

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(folder, err) from err
    key = os.path.realpath(folder)
    if key in _HELD_LOCKS:  # this process holds it already (a second trainer object)
        _HELD_LOCKS[key][1] += 1
        return _RunLock(key)
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise CheckpointError(f"cannot lock {path}: {err.strerror or err}; put the run folder on a file "
                                  "system that supports locks (a local disk)") from err
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise RunLocked(f"{folder} is in use by another training run ({holder}); wait for it to finish "
                        "or use another --out") from None
    try:
        me = f"pid {os.getpid()} on host {socket.gethostname()}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
    except OSError as err:
        os.close(fd)
        raise _write_error(path, err) from err
    _HELD_LOCKS[key] = [fd, 1]
    return _RunLock(key)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tensor_checksum(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_tensors(path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {_META_KEY: json.dumps(config, sort_keys=True, allow_nan=False), _SUM_KEY: tensor_checksum(arrays)}
    atomic_write(path, save(arrays, metadata=metadata))


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
    config = _config_from_header(path, data)
    stored = _header(path, data).get("__metadata__", {}).get(_SUM_KEY)
    if stored is not None and stored != tensor_checksum(tensors):
        raise CheckpointError(f"{path}: the tensors do not match the checksum stored with them (the file is "
                              "corrupted): restore it from a copy or retrain")
    for key, value in tensors.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf (the run diverged); use an earlier "
                                  "checkpoint or retrain with a lower --lr")
    return tensors, config


def _header(path: Path, data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupted safetensors header ({err}); restore the file or retrain") from err
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: corrupted safetensors header; restore the file or retrain")
    return header


def _config_from_header(path: Path, data: bytes) -> dict:
    meta = _header(path, data).get("__metadata__") or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without a hold-mlx config; "
                              "was it written by hold-mlx?")
    try:
        config = json.loads(meta[_META_KEY])
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path}: the hold-mlx config in the file is not valid JSON ({err}); "
                              "restore the file or retrain") from err
    return validate_config(config, path)


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
    return _config_from_header(path, head + rest)


def validate_sde_params(params: dict, where: str = "--sde-param") -> dict:
    """SDE parameters are finite numbers (or lists of them); order an integer in [1, MAX_ORDER].
    ``where`` names the source in the message (an option or a file)."""
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: the SDE parameters must be a mapping, got {type(params).__name__}")
    for key, value in params.items():
        if key == "name":
            if not isinstance(value, str):
                raise CheckpointError(f"{where}: SDE name must be a string, got {value!r}")
        elif key == "order":
            if not is_int(value) or not 1 <= value <= MAX_ORDER:
                raise CheckpointError(f"{where}: order must be an integer from 1 to {MAX_ORDER} (the state has "
                                      f"order x the data's size), got {value!r}")
        elif isinstance(value, list):
            if not all(is_finite_number(v) for v in value):
                raise CheckpointError(f"{where}: {key} must be a list of finite numbers, got {value!r}")
        elif value is not None and not is_finite_number(value):
            raise CheckpointError(f"{where}: {key} must be a finite number, got {value!r}")
        if key in ("T", "beta", "beta_min", "beta_max") and is_finite_number(value) and value <= 0:
            raise CheckpointError(f"{where}: {key} must be > 0, got {value!r}")
    return params


def validate_net_params(params: dict, where: str = "--net-param") -> dict:
    """Network settings (all of a NetConfig, or some overrides) have known names and sane types."""
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: the network config must be a mapping, got {type(params).__name__}")
    problems = net_field_problems(params)
    if problems:
        raise CheckpointError(f"{where}: {problems[0]}")
    return params


def _check_data_section(data: dict, where) -> None:
    if not isinstance(data.get("name"), str):
        raise CheckpointError(f"{where}: data.name must be a string")
    if data.get("kind") not in ("image", "points"):
        raise CheckpointError(f"{where}: data.kind must be \"image\" or \"points\", got {data.get('kind')!r}")
    shape = data.get("shape")
    rank = 3 if data["kind"] == "image" else 1
    if not (isinstance(shape, list) and len(shape) == rank and all(is_int(v) and v >= 1 for v in shape)):
        raise CheckpointError(f"{where}: data.shape must be a list of {rank} integers >= 1 for {data['kind']} "
                              f"data, got {shape!r}")
    for key in ("shift", "scale"):
        value = data.get(key)
        values = value if isinstance(value, list) else [value]
        if not values or not all(is_finite_number(v) for v in values):
            raise CheckpointError(f"{where}: data.{key} must be a finite number or a list of them, got {value!r}")
        if key == "scale" and not all(v > 0 for v in values):
            raise CheckpointError(f"{where}: data.scale must be > 0, got {value!r}")


def validate_config(config: dict, path="checkpoint") -> dict:
    """The one schema of a checkpoint config, checked on every load (MLX, torch, onnx): sections
    and their keys, types and ranges, and that network, SDE and data fit each other."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the checkpoint config is not a JSON object; restore the file or retrain")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this hold-mlx reads "
                              f"{FORMAT_VERSION}; upgrade hold-mlx or re-export")
    for key in ("sde", "net", "data", "objective", "layout"):
        if key not in config:
            raise CheckpointError(f"{path}: config has no {key!r} section")
    if config["layout"] != LAYOUT:
        raise CheckpointError(f"{path}: tensor layout {config['layout']!r}, expected {LAYOUT!r}")
    for key in ("sde", "net", "data", "objective"):
        if not isinstance(config[key], dict):
            raise CheckpointError(f"{path}: config section {key!r} must be a JSON object, got "
                                  f"{type(config[key]).__name__}")
    if "train" in config and not isinstance(config["train"], dict):
        raise CheckpointError(f"{path}: config section 'train' must be a JSON object")
    if "step" in config and not (is_int(config["step"]) and config["step"] >= 0):
        raise CheckpointError(f"{path}: config step must be an integer >= 0, got {config['step']!r}")
    where = f"{path}: config"
    if "name" not in config["sde"]:
        raise CheckpointError(f"{where}: the sde section has no 'name'")
    validate_sde_params(config["sde"], f"{path}: invalid SDE config")
    net = config["net"]
    validate_net_params(net, f"{path}: invalid network config")
    missing = sorted(set(NET_FIELD_RULES) - set(net) - {"hidden", "depth", "dropout", "fourier_scale", "groups",
                                                     "num_classes"})
    if missing:
        raise CheckpointError(f"{where}: the net section lacks {missing}")
    data = config["data"]
    _check_data_section(data, where)
    objective = config["objective"]
    if not isinstance(objective.get("mixed_score", True), bool):
        raise CheckpointError(f"{where}: objective.mixed_score must be true or false")
    if objective.get("weighting", "eps") not in ("eps", "likelihood"):
        raise CheckpointError(f"{where}: objective.weighting must be \"eps\" or \"likelihood\"")
    # The pieces must fit each other (checked here, not by a shape error inside MLX or torch).
    if (net["kind"] == "mlp") != (data["kind"] == "points"):
        raise CheckpointError(f"{where}: a {net['kind']} network cannot model {data['kind']} data")
    if net["data_channels"] != data["shape"][-1]:
        raise CheckpointError(f"{where}: net.data_channels {net['data_channels']} != the data's last axis "
                              f"{data['shape'][-1]}")
    if net["kind"] == "unet" and not (net["image_size"] == data["shape"][0] == data["shape"][1]):
        raise CheckpointError(f"{where}: net.image_size {net['image_size']} does not fit images of shape "
                              f"{data['shape']}")
    sde_order = {"vp": 1, "cld": 2}.get(str(config["sde"]["name"]).lower(), config["sde"].get("order", 3))
    if net["order"] != sde_order:
        raise CheckpointError(f"{where}: net.order {net['order']} != the SDE's order {sde_order}")
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

    sde_cfg = dict(validate_sde_params(config["sde"], f"{path}: invalid SDE config"))
    try:
        return get_sde(sde_cfg.pop("name"), **sde_cfg)
    except (KeyError, TypeError, ValueError, ArithmeticError, np.linalg.LinAlgError) as err:
        raise CheckpointError(f"{path}: invalid SDE config in the checkpoint ({err})") from err


def net_config_from(config: dict, path="checkpoint"):
    """The NetConfig a checkpoint was trained with."""
    from .netconfig import NetConfig

    try:
        return NetConfig.from_dict(validate_net_params(config["net"], f"{path}: invalid network config"))
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


def weights_digest(path) -> str:
    """The first 16 hex digits of the sha256 of a checkpoint's file (a run folder: its
    model.safetensors): what result caches key on, so a retrained model at the same path is not
    mistaken for the one they measured."""
    digest = hashlib.sha256()
    with open(resolve_model_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def shipped_file(relative: str, env: str) -> Path | None:
    """A file shipped in weights/ (next to the package in a checkout, or installed data), or the
    path in the environment variable ``env``; None if neither exists."""
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise CheckpointError(f"{env}={path}: no such file; unset {env} or point it to the file")
        return path
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

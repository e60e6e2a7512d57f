"""Datasets, read from disk or generated; never downloaded.

``load_dataset(spec)`` returns a :class:`Dataset` whose ``data`` is float32 in model space:
images NHWC scaled to [-1, 1], points standardised. ``shift`` and ``scale`` map back to the
user's units: x = model * scale + shift (images: [0, 1]).

Specs: "fashion-mnist", "mnist" (IDX files; --data-dir, default the Debian package folder),
"digits" (scikit-learn's bundled 8x8 digits), "cifar10" (needs --data-dir: the binary
``cifar-10-batches-bin`` or python ``cifar-10-batches-py`` folder; python batches are read with an
unpickler that only admits NumPy arrays), "checkerboard", "swiss-roll", "8gaussians", "rings"
(2-D toys), a folder of images, or a ``.npy`` file of points (N, d).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DatasetError", "load_dataset", "DATASETS", "TOYS", "FASHION_MNIST_DIR",
           "FASHION_MNIST_CLASSES"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
TOYS = ("checkerboard", "swiss-roll", "8gaussians", "rings")
DATASETS = ("fashion-mnist", "mnist", "digits", "cifar10", *TOYS)
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that is missing or malformed; the message says what to install or pass."""


@dataclass
class Dataset:
    name: str
    data: np.ndarray  # float32, model space
    kind: str  # "image" | "points"
    shift: float | np.ndarray = 0.0
    scale: float | np.ndarray = 1.0
    labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def config(self) -> dict:
        """The "data" section of a checkpoint config."""
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "shift": np.asarray(self.shift, dtype=np.float64).tolist(),
                "scale": np.asarray(self.scale, dtype=np.float64).tolist()}

    def batch(self, step: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1,
              hflip: bool = False) -> np.ndarray:
        """The batch of a training step: a function of (seed, step) only, so resuming at step k
        sees exactly the batches an uninterrupted run would. Epochs are seeded permutations; with
        ``world`` ranks, rank r takes its slice of the global batch."""
        n = len(self.data)
        per_epoch = max(n // batch_size, 1)
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch, 7]).permutation(n)
        idx = np.resize(perm, (pos + 1) * batch_size)[pos * batch_size:(pos + 1) * batch_size]
        flip = np.random.default_rng([seed, step, 11]).random(batch_size) < 0.5  # drawn for the global batch
        mine = np.array_split(np.arange(batch_size), world)[rank]
        x = self.data[idx[mine]]
        if hflip and self.kind == "image":
            x = np.where(flip[mine, None, None, None], x[:, :, ::-1, :], x)
        return np.ascontiguousarray(x)

    def to_user(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, dtype=np.float32) * np.asarray(self.scale, np.float32) + np.asarray(self.shift, np.float32)
        return np.clip(out, 0.0, 1.0) if self.kind == "image" else out


def to_user_units(x: np.ndarray, data_cfg: dict) -> np.ndarray:
    """Model space -> user units from a checkpoint's data config (images clipped to [0, 1])."""
    out = np.asarray(x, np.float32) * np.asarray(data_cfg["scale"], np.float32) + np.asarray(data_cfg["shift"], np.float32)
    return np.clip(out, 0.0, 1.0) if data_cfg["kind"] == "image" else out


def _images(name: str, uint8_nhwc: np.ndarray, labels=None) -> Dataset:
    x = uint8_nhwc.astype(np.float32) / 127.5 - 1.0
    return Dataset(name, x, "image", 0.5, 0.5, labels)


# ----------------------------------------------------------------------------- IDX (MNIST family)


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: cannot read IDX file ({err}); reinstall the dataset") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: IDX file is truncated ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist_like(name: str, folder, split: str = "train") -> Dataset:
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    images = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None:
        hint = ("apt-get install dataset-fashion-mnist" if name == "fashion-mnist"
                else "put the IDX files there")
        raise DatasetError(f"{name}: no {prefix}-images-idx3-ubyte[.gz] in {folder}; {hint} "
                           "or pass --data-dir")
    x = read_idx(images)
    y = read_idx(labels).astype(np.int64) if labels is not None else None
    if x.ndim != 3:
        raise DatasetError(f"{images}: expected (N, H, W) images, got shape {x.shape}")
    return _images(name, x[..., None], y)


# ----------------------------------------------------------------------------- small built-ins


def load_digits_dataset(split: str = "train") -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetError("digits needs scikit-learn: pip install scikit-learn") from err
    d = load_digits()
    x = (d.images / 16.0 * 255.0).round().astype(np.uint8)[..., None]  # 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.9 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    return _images("digits", x[idx], d.target[idx])


def make_toy(name: str, n: int = 50_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
        x2 = x2 + (np.floor(x1) % 2)
        pts = np.stack([x1, x2], 1) * 2
    elif name == "swiss-roll":
        theta = 1.5 * np.pi * (1 + 2 * rng.random(n))
        pts = np.stack([theta * np.cos(theta), theta * np.sin(theta)], 1) / 5 + 0.1 * rng.standard_normal((n, 2))
    elif name == "8gaussians":
        angles = 2 * np.pi * rng.integers(0, 8, n) / 8
        pts = 2 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.1 * rng.standard_normal((n, 2))
    elif name == "rings":
        radius = rng.integers(1, 3, n).astype(float)
        angle = 2 * np.pi * rng.random(n)
        pts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.05 * rng.standard_normal((n, 2))
    else:
        raise DatasetError(f"unknown toy {name!r}; choose one of {', '.join(TOYS)}")
    return pts.astype(np.float32)


def _points(name: str, pts: np.ndarray) -> Dataset:
    pts = np.asarray(pts, dtype=np.float64)
    if pts.ndim != 2 or len(pts) < 2:
        raise DatasetError(f"{name}: points must be an (N, d) array with N >= 2, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise DatasetError(f"{name}: points contain NaN or Inf")
    mean, std = pts.mean(0), pts.std(0) + 1e-8
    return Dataset(name, ((pts - mean) / std).astype(np.float32), "points", mean, std)


# ----------------------------------------------------------------------------- CIFAR-10 and folders


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches contain: dicts, lists, bytes and NumPy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def load_cifar10(folder, split: str = "train") -> Dataset:
    folder = Path(folder)
    for sub in ("", "cifar-10-batches-bin", "cifar-10-batches-py"):
        base = folder / sub
        names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
        if all((base / f"{n}.bin").is_file() for n in names):
            raw = b"".join((base / f"{n}.bin").read_bytes() for n in names)
            if len(raw) % 3073:
                raise DatasetError(f"{base}: CIFAR-10 binary batches have a wrong size (truncated?)")
            rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
            x = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return _images("cifar10", x, rec[:, 0].astype(np.int64))
        if all((base / n).is_file() for n in names):
            xs, ys = [], []
            for n in names:
                with open(base / n, "rb") as f:
                    try:
                        batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
                    except Exception as err:  # noqa: BLE001 - any failure means a bad file
                        raise DatasetError(f"{base / n}: not a CIFAR-10 python batch ({err})") from err
                xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(batch[b"labels"], np.int64))
            return _images("cifar10", np.concatenate(xs), np.concatenate(ys))
    raise DatasetError(f"cifar10: no CIFAR-10 batches under {folder}; pass --data-dir pointing to "
                       "cifar-10-batches-bin (or -py), downloaded by you from the CIFAR-10 site")


def load_image_folder(folder, image_size: int | None = None) -> Dataset:
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(_IMAGE_EXT))}) found")
    size = image_size or 64
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)  # centre crop to a square, then resize
                im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
                out.append(np.asarray(im.resize((size, size), Image.BICUBIC), np.uint8))
        except OSError as err:
            raise DatasetError(f"{p}: unreadable image ({err})") from err
    return _images(folder.name or "images", np.stack(out))


# ----------------------------------------------------------------------------- entry point


def load_dataset(spec: str, *, data_dir: str | None = None, split: str = "train",
                 image_size: int | None = None, toy_size: int = 50_000, seed: int = 0) -> Dataset:
    """A dataset by name or path (see the module docstring)."""
    key = str(spec).lower()
    if key in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_mnist_like("fashion-mnist", data_dir or FASHION_MNIST_DIR, split)
    if key == "mnist":
        if not data_dir:
            raise DatasetError("mnist: pass --data-dir with the MNIST IDX files (train-images-idx3-ubyte[.gz])")
        return load_mnist_like("mnist", data_dir, split)
    if key == "digits":
        return load_digits_dataset(split)
    if key == "cifar10":
        if not data_dir:
            raise DatasetError("cifar10: pass --data-dir with the CIFAR-10 batches (nothing is downloaded)")
        return load_cifar10(data_dir, split)
    if key in TOYS:
        return _points(key, make_toy(key, toy_size, seed if split == "train" else seed + 1))
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".npy":
        if not path.is_file():
            raise DatasetError(f"{path}: no such .npy file")
        try:
            pts = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DatasetError(f"{path}: not a readable .npy array ({err})") from err
        return _points(path.stem, pts)
    if path.is_dir():
        return load_image_folder(path, image_size)
    raise DatasetError(f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, "
                       "an image folder or a .npy file of points")

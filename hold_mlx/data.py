"""Datasets, read from disk or generated; never downloaded.

``load_dataset(spec)`` returns a :class:`Dataset` whose ``data`` is float32 in model space:
images NHWC scaled to [-1, 1], points standardised. ``shift`` and ``scale`` map back to the
user's units: x = model * scale + shift (images: [0, 1]).

Specs: "fashion-mnist", "mnist" (IDX files; --data-dir, default the Debian package folder),
"digits" (scikit-learn's bundled 8x8 digits), "cifar10" (needs --data-dir: the binary
``cifar-10-batches-bin`` or python ``cifar-10-batches-py`` folder; python batches are read with an
unpickler that only admits NumPy arrays), "checkerboard", "swiss-roll", "8gaussians", "rings"
(2-D toys), a folder of images, or a ``.npy`` file of points (N, d).

Class labels (``Dataset.labels``, ``Dataset.classes``): fashion-mnist, mnist, digits and cifar10
carry theirs; an image folder whose images all lie in sub-folders is labelled by them (the
torchvision ImageFolder convention: the classes are the sorted sub-folder names); points take
theirs from a second .npy file of integers (``labels=``).
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
           "FASHION_MNIST_CLASSES", "DIGIT_CLASSES", "CIFAR10_CLASSES", "load_labels"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))  # mnist and digits
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TOYS = ("checkerboard", "swiss-roll", "8gaussians", "rings")
DATASETS = ("fashion-mnist", "mnist", "digits", "cifar10", *TOYS)
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
#: Largest image (pixels) read from a folder: 8192 x 8192. Bigger files are refused before they are
#: decoded (a small compressed file can expand to gigabytes: a "decompression bomb").
MAX_IMAGE_PIXELS = 8192 * 8192
#: Largest dataset held in memory (float32 model-space values).
MAX_DATA_BYTES = 16 * 2**30


class DatasetError(ValueError):
    """A dataset that is missing or malformed; the message says what to install or pass."""


@dataclass
class Dataset:
    name: str
    data: np.ndarray  # float32, model space
    kind: str  # "image" | "points"
    shift: float | np.ndarray = 0.0
    scale: float | np.ndarray = 1.0
    labels: np.ndarray | None = None  # int64 (N,) class of each example, 0 .. len(classes) - 1
    classes: tuple[str, ...] | None = None  # the class names, when labelled
    source: str | None = None  # the file or folder it was read from (not a known dataset name)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names ("0", "1", ... when the data has labels but no names); () unlabelled."""
        if self.labels is None:
            return ()
        if self.classes:
            return tuple(self.classes)
        return tuple(str(i) for i in range(int(self.labels.max()) + 1 if len(self.labels) else 0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)

    def config(self) -> dict:
        """The "data" section of a checkpoint config."""
        out = {"name": self.name, "kind": self.kind, "shape": list(self.shape),
               "shift": np.asarray(self.shift, dtype=np.float64).tolist(),
               "scale": np.asarray(self.scale, dtype=np.float64).tolist()}
        if self.source is not None:  # recorded for the user's information: eval never reads it by itself
            out["source"] = self.source
        return out

    def batch(self, step: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1,
              hflip: bool = False) -> np.ndarray:
        """The batch of a training step: a function of (seed, step) only, so resuming at step k
        sees exactly the batches an uninterrupted run would. Epochs are seeded permutations; with
        ``world`` ranks, rank r takes its slice of the global batch."""
        idx = self.batch_indices(step, batch_size, seed)
        flip = np.random.default_rng([seed, step, 11]).random(batch_size) < 0.5  # drawn for the global batch
        mine = np.array_split(np.arange(batch_size), world)[rank]
        x = self.data[idx[mine]]
        if hflip and self.kind == "image":
            x = np.where(flip[mine, None, None, None], x[:, :, ::-1, :], x)
        return np.ascontiguousarray(x)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The examples of a step's global batch (the seeded permutation of its epoch)."""
        n = len(self.data)
        per_epoch = max(n // batch_size, 1)
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch, 7]).permutation(n)
        return np.resize(perm, (pos + 1) * batch_size)[pos * batch_size:(pos + 1) * batch_size]

    def batch_labels(self, step: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1) -> np.ndarray:
        """The labels of the examples :meth:`batch` returns for the same arguments."""
        if self.labels is None:
            raise DatasetError(f"{self.name}: the data has no class labels")
        mine = np.array_split(np.arange(batch_size), world)[rank]
        return np.ascontiguousarray(self.labels[self.batch_indices(step, batch_size, seed)[mine]], dtype=np.int64)

    def to_user(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, dtype=np.float32) * np.asarray(self.scale, np.float32) + np.asarray(self.shift, np.float32)
        return np.clip(out, 0.0, 1.0) if self.kind == "image" else out


def to_user_units(x: np.ndarray, data_cfg: dict) -> np.ndarray:
    """Model space -> user units from a checkpoint's data config (images clipped to [0, 1])."""
    out = np.asarray(x, np.float32) * np.asarray(data_cfg["scale"], np.float32) + np.asarray(data_cfg["shift"], np.float32)
    return np.clip(out, 0.0, 1.0) if data_cfg["kind"] == "image" else out


def _images(name: str, uint8_nhwc: np.ndarray, labels=None, classes=None) -> Dataset:
    x = uint8_nhwc.astype(np.float32) / 127.5 - 1.0
    return Dataset(name, x, "image", 0.5, 0.5, labels, None if classes is None else tuple(classes))


# ----------------------------------------------------------------------------- IDX (MNIST family)


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: cannot read IDX file ({err}); reinstall the dataset") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes; reinstall the dataset")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: malformed IDX header ({ndim} dimensions); reinstall the dataset")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = 1
    for d in dims:  # Python ints: no overflow
        expected *= d
    if body.size != expected:
        raise DatasetError(f"{path}: IDX file has {body.size} data bytes, its header promises {expected} "
                           "(truncated or corrupted); reinstall the dataset")
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
    if x.ndim != 3 or min(x.shape) < 1:
        raise DatasetError(f"{images}: expected (N, H, W) images, got shape {x.shape}")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DatasetError(f"{labels}: {y.shape} labels for {len(x)} images; reinstall the dataset")
    return _images(name, x[..., None], y, FASHION_MNIST_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES)


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
    return _images("digits", x[idx], d.target[idx].astype(np.int64), DIGIT_CLASSES)


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


def toy_labels(name: str, n: int = 50_000, seed: int = 0):
    """(labels, class names) of ``make_toy(name, n, seed)``'s points: the mode of 8gaussians (0 at
    angle 0, counter-clockwise), the ring of rings; (None, None) for the other toys. Re-drawn from
    the same generator, whose first draw picks the mode."""
    rng = np.random.default_rng(seed)
    if name == "8gaussians":
        return rng.integers(0, 8, n).astype(np.int64), tuple(f"mode {i}" for i in range(8))
    if name == "rings":
        return rng.integers(1, 3, n).astype(np.int64) - 1, ("inner", "outer")
    return None, None


def _points(name: str, pts: np.ndarray, source: str | None = None) -> Dataset:
    pts = np.asarray(pts)
    if pts.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: points must be real numbers, got dtype {pts.dtype}")
    if pts.ndim != 2 or len(pts) < 2 or pts.shape[1] < 1:
        raise DatasetError(f"{name}: points must be an (N, d) array with N >= 2, got shape {pts.shape}")
    if pts.size * 4 > MAX_DATA_BYTES:
        raise DatasetError(f"{name}: {pts.size} values are more than the {MAX_DATA_BYTES // 2**30} GiB a dataset "
                           "may take in memory; use a subset")
    pts = pts.astype(np.float64)
    if not np.isfinite(pts).all():
        raise DatasetError(f"{name}: points contain NaN or Inf")
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = pts.mean(0), pts.std(0) + 1e-8
        standard = (pts - mean) / std
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and np.isfinite(standard).all()) \
            or np.abs(mean).max() > 1e30 or std.max() > 1e30:
        raise DatasetError(f"{name}: values too large to standardise (|x| up to {np.abs(pts).max():.3g}); "
                           "rescale the points (e.g. to |x| < 1e6)")
    return Dataset(name, standard.astype(np.float32), "points", mean, std, source=source)


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
            if not raw:
                raise DatasetError(f"{base}: CIFAR-10 binary batches are empty")
            rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
            if rec[:, 0].max() > 9:
                raise DatasetError(f"{base}: not CIFAR-10 binary batches (labels above 9)")
            x = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return _images("cifar10", x, rec[:, 0].astype(np.int64), CIFAR10_CLASSES)
        if all((base / n).is_file() for n in names):
            xs, ys = [], []
            for n in names:
                with open(base / n, "rb") as f:
                    try:
                        batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
                    except Exception as err:  # noqa: BLE001 - any failure means a bad file
                        raise DatasetError(f"{base / n}: not a CIFAR-10 python batch ({err})") from err
                try:
                    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int64)
                    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
                        raise ValueError(f"data {data.dtype} {data.shape}, labels {labels.shape}")
                except (TypeError, KeyError, IndexError, ValueError) as err:
                    raise DatasetError(f"{base / n}: not a CIFAR-10 python batch ({err!r}); download the batches "
                                       "again") from err
                xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(labels)
            return _images("cifar10", np.concatenate(xs), np.concatenate(ys), CIFAR10_CLASSES)
    raise DatasetError(f"cifar10: no CIFAR-10 batches under {folder}; pass --data-dir pointing to "
                       "cifar-10-batches-bin (or -py), downloaded by you from the CIFAR-10 site")


def load_image_folder(folder, image_size: int | None = None) -> Dataset:
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(sorted(_IMAGE_EXT))}) found")
    size = image_size or 64
    if len(files) * size * size * 3 * 4 > MAX_DATA_BYTES:
        raise DatasetError(f"{folder}: {len(files)} images of {size}x{size} are more than the "
                           f"{MAX_DATA_BYTES // 2**30} GiB a dataset may take in memory; use fewer or a smaller --image-size")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DatasetError(f"{p}: {w}x{h} pixels is more than the {MAX_IMAGE_PIXELS} this reader decodes "
                                       "(a possible decompression bomb); shrink or remove the file")
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)  # centre crop to a square, then resize
                im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
                out.append(np.asarray(im.resize((size, size), Image.BICUBIC), np.uint8))
        except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as err:
            if isinstance(err, DatasetError):
                raise
            raise DatasetError(f"{p}: unreadable image ({err}); fix or remove the file") from err
    labels, classes = _folder_labels(folder, files)
    dataset = _images(folder.name or "images", np.stack(out), labels, classes)
    dataset.source = str(folder.resolve())
    return dataset


def _folder_labels(folder: Path, files: list[Path]):
    """(labels, class names) when every image lies in a sub-folder of ``folder`` (ImageFolder:
    class = the first sub-folder on its path, names sorted); (None, None) otherwise."""
    tops = [p.relative_to(folder).parts for p in files]
    if any(len(parts) < 2 for parts in tops):
        return None, None
    classes = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[parts[0]] for parts in tops], dtype=np.int64), classes


def load_labels(path, n: int) -> np.ndarray:
    """Integer class labels (n,) from a .npy file (for a .npy file of points)."""
    path = Path(os.path.expanduser(str(path)))
    if path.suffix != ".npy" or not path.is_file():
        raise DatasetError(f"{path}: no such .npy file of labels")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DatasetError(f"{path}: not a readable .npy array ({err})") from err
    if labels.shape != (n,):
        raise DatasetError(f"{path}: labels of shape {labels.shape}, expected ({n},): one per point")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
                and np.all(labels == np.round(labels))):
            raise DatasetError(f"{path}: labels must be integers 0, 1, ..., got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DatasetError(f"{path}: labels must be >= 0, found {int(labels.min())}")
    return labels


# ----------------------------------------------------------------------------- entry point


def load_dataset(spec: str, *, data_dir: str | None = None, split: str = "train",
                 image_size: int | None = None, toy_size: int = 50_000, seed: int = 0,
                 labels: str | None = None) -> Dataset:
    """A dataset by name or path (see the module docstring); ``labels``: a .npy file of integer
    class labels for a .npy file of points."""
    if labels is not None:
        data = load_dataset(spec, data_dir=data_dir, split=split, image_size=image_size, toy_size=toy_size, seed=seed)
        if data.kind != "points" or not str(spec).lower().endswith(".npy"):
            raise DatasetError(f"--labels FILE.npy labels a .npy file of points; {spec!r} has labels of its own "
                               "or none")
        data.labels = load_labels(labels, len(data))
        return data
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
        toy_seed = seed if split == "train" else seed + 1
        data = _points(key, make_toy(key, toy_size, toy_seed))
        data.labels, data.classes = toy_labels(key, toy_size, toy_seed)
        return data
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".npy":
        if not path.is_file():
            raise DatasetError(f"{path}: no such .npy file")
        try:
            pts = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DatasetError(f"{path}: not a readable .npy array ({err})") from err
        return _points(path.stem, pts, source=str(path.resolve()))
    if path.is_dir():
        return load_image_folder(path, image_size)
    raise DatasetError(f"unknown dataset {spec!r}: use one of {', '.join(DATASETS)}, "
                       "an image folder or a .npy file of points")

"""A small Fashion-MNIST CNN in MLX: the feature space of the offline sample-quality metrics.

Its penultimate layer (``features``) feeds the Fréchet and kernel distances in ``quality.py``,
reported as "FD-FMNIST-classifier" and "KD-FMNIST-classifier": a distance in THIS network's
feature space, not FID (which needs Inception-v3, see ``fid_inception.py``). The network is
small on purpose (MLX convolutions are slow on Linux CPUs) and ships in weights/fmnist-classifier/
(trained by tools/train_classifier.py; its README has the test accuracy).

Input: images NHWC (N, 28, 28, 1) in [0, 1] (user units, as ``hold-mlx sample --out x.npz`` writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._mlx import mx, nn
from .checkpoint import CheckpointError, atomic_write, shipped_file

__all__ = ["FashionMNISTClassifier", "load_classifier", "save_classifier", "default_classifier",
           "classifier_features", "classifier_logits", "CLASSIFIER_FILE", "IMAGE_SHAPE"]

CLASSIFIER_FILE = "classifier.safetensors"
IMAGE_SHAPE = (28, 28, 1)
_META_KEY = "hold_mlx_classifier"


class FashionMNISTClassifier(nn.Module):
    """conv3x3(c1)-ReLU-maxpool, conv3x3(c2)-ReLU-maxpool, Linear(hidden)-ReLU [features], Linear(10)."""

    def __init__(self, channels=(16, 32), hidden: int = 128, classes: int = 10, dropout: float = 0.3):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.config = {"channels": [c1, c2], "hidden": int(hidden), "classes": int(classes),
                       "dropout": float(dropout)}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)

    def features(self, x):
        """Penultimate activations (N, hidden) for images (N, 28, 28, 1) in [0, 1]."""
        h = self.pool(nn.relu(self.conv1(2.0 * x - 1.0)))
        h = self.pool(nn.relu(self.conv2(h)))
        return nn.relu(self.fc1(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.fc2(self.drop(self.features(x)))


def default_classifier() -> Path:
    """weights/fmnist-classifier/classifier.safetensors (checkout or installed data), or
    $HOLD_MLX_CLASSIFIER."""
    path = shipped_file(f"fmnist-classifier/{CLASSIFIER_FILE}", "HOLD_MLX_CLASSIFIER")
    if path is not None:
        return path
    raise CheckpointError("no Fashion-MNIST classifier found (weights/fmnist-classifier/classifier.safetensors); "
                          "pass --classifier PATH or train one with tools/train_classifier.py")


def save_classifier(path, net: FashionMNISTClassifier, meta: dict | None = None) -> None:
    from mlx.utils import tree_flatten
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(np.array(v)) for k, v in tree_flatten(net.parameters())}
    header = {"config": net.config, **(meta or {})}
    atomic_write(path, save(tensors, metadata={_META_KEY: json.dumps(header, sort_keys=True)}))


def load_classifier(path=None) -> tuple[FashionMNISTClassifier, dict]:
    """(network in eval mode, metadata) from a .safetensors file or its folder."""
    from mlx.utils import tree_flatten, tree_unflatten
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else default_classifier()
    if path.is_dir():
        path = path / CLASSIFIER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such classifier file (see weights/fmnist-classifier/README.md)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable classifier file ({err})") from err
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without a hold-mlx classifier config")
    net = FashionMNISTClassifier(**meta["config"])
    expected = dict(tree_flatten(net.parameters()))
    if set(expected) != set(tensors) or any(tensors[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(f"{path}: classifier weights do not match its config")
    net.update(tree_unflatten([(k, mx.array(tensors[k])) for k in expected]))
    net.eval()
    return net, meta


def _check_images(images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"the Fashion-MNIST classifier takes 28x28 grey images (N, 28, 28, 1), "
                         f"got shape {images.shape}")
    return images


def _batched(fn, images, batch_size: int) -> np.ndarray:
    images = _check_images(images)
    out = []
    for lo in range(0, len(images), batch_size):
        y = fn(mx.array(images[lo:lo + batch_size]))
        mx.eval(y)
        out.append(np.array(y))
    return np.concatenate(out).astype(np.float64)


def classifier_features(net: FashionMNISTClassifier, images, batch_size: int = 1000) -> np.ndarray:
    """Penultimate features (N, hidden) float64 of images in [0, 1]."""
    return _batched(net.features, images, batch_size)


def classifier_logits(net: FashionMNISTClassifier, images, batch_size: int = 1000) -> np.ndarray:
    return _batched(net, images, batch_size)

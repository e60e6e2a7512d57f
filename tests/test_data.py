"""Datasets: every source reads what was written, bad sources give one clear error."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from hold_mlx.data import (FASHION_MNIST_DIR, TOYS, DatasetError, load_dataset, read_idx, to_user_units)


def write_idx(path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def test_idx_round_trip_and_mnist_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.shape == (28, 28, 1) and ds.kind == "image" and len(ds) == 5
    np.testing.assert_allclose(to_user_units(ds.data, ds.config()), images[..., None] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ds.labels, labels)


def test_truncated_idx_and_missing_folder(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb").write(raw[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet-9000")


@pytest.mark.skipif(not (FASHION_MNIST_DIR and __import__("os").path.isdir(FASHION_MNIST_DIR)),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
    assert train.data.shape == (60000, 28, 28, 1) and test.data.shape == (10000, 28, 28, 1)
    assert train.data.min() == -1.0 and train.data.max() == 1.0
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_cifar10_binary_and_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 6, dtype=np.uint8)
    binary = tmp_path / "cifar-10-batches-bin"
    binary.mkdir()
    for i in range(1, 6):
        records = np.concatenate([labels[:, None], pixels.reshape(6, -1)], 1)
        (binary / f"data_batch_{i}.bin").write_bytes(records.tobytes())
    ds = load_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.shape == (32, 32, 3) and len(ds) == 30
    np.testing.assert_allclose(to_user_units(ds.data[:6], ds.config()), pixels.transpose(0, 2, 3, 1) / 255.0,
                               atol=1e-6)

    py = tmp_path / "py" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    for i in range(1, 6):
        with open(py / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": pixels.reshape(6, -1), b"labels": labels.tolist()}, f)
    ds_py = load_dataset("cifar10", data_dir=str(tmp_path / "py"))
    np.testing.assert_array_equal(ds_py.data, ds.data)


def test_cifar10_python_batch_refuses_foreign_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    for i in range(1, 6):
        with open(py / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_image_folder_is_cropped_and_resized(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "sub.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path), image_size=8)
    assert ds.shape == (8, 8, 3) and len(ds) == 2
    users = to_user_units(ds.data, ds.config())
    reds = [np.allclose(im[..., 0], 1.0, atol=0.02) and np.allclose(im[..., 2], 0.0, atol=0.02) for im in users]
    assert sorted(reds) == [False, True]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(str(tmp_path), image_size=8)


def test_npy_points_are_standardised(tmp_path):
    pts = np.random.default_rng(2).normal([3.0, -1.0, 0.5], [2.0, 0.5, 1.0], (500, 3))
    np.save(tmp_path / "pts.npy", pts)
    ds = load_dataset(str(tmp_path / "pts.npy"))
    assert ds.kind == "points" and ds.shape == (3,)
    np.testing.assert_allclose(ds.data.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(to_user_units(ds.data, ds.config()), pts, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "bad.npy", np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(DatasetError, match="NaN"):
        load_dataset(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "flat.npy", np.arange(5.0))
    with pytest.raises(DatasetError, match=r"\(N, d\)"):
        load_dataset(str(tmp_path / "flat.npy"))
    with pytest.raises(DatasetError, match="no such"):
        load_dataset(str(tmp_path / "missing.npy"))


@pytest.mark.parametrize("name", TOYS)
def test_toys(name):
    ds = load_dataset(name, toy_size=2000)
    assert ds.data.shape == (2000, 2) and np.isfinite(ds.data).all()
    np.testing.assert_allclose(ds.data.std(0), 1.0, atol=1e-3)


def test_batches_are_a_function_of_seed_and_step_and_split_across_ranks():
    ds = load_dataset("digits")
    a = ds.batch(7, 16, seed=3, hflip=True)
    np.testing.assert_array_equal(a, ds.batch(7, 16, seed=3, hflip=True))
    assert not np.array_equal(a, ds.batch(8, 16, seed=3, hflip=True))
    halves = [ds.batch(7, 16, seed=3, rank=r, world=2, hflip=True) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), a)
    # one epoch draws every example at most once
    from hold_mlx.data import Dataset

    ids = Dataset("ids", np.arange(100, dtype=np.float32)[:, None], "points")
    seen = np.concatenate([ids.batch(s, 16, seed=0) for s in range(100 // 16)]).ravel()
    assert len(np.unique(seen)) == len(seen) == 96

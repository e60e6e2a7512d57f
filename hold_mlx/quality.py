"""Sample quality: samples and reference images -> features -> Fréchet and kernel distances.

Every metric is named for its feature space: "FD-FMNIST-classifier" / "KD-FMNIST-classifier" for
the shipped MLX classifier (offline, no torch), "FID" / "KID" only for the Inception-v3 network
loaded from the user's pt_inception-2015-12-05-6726825d.pth (``fid_inception.py``), and
"FD-points" / "KD-points" for low-dimensional data (the coordinates themselves).

Images are quantised to 8 bits first (what a PNG stores), so a metric does not depend on whether
samples went through a file.
"""

from __future__ import annotations

import numpy as np

from .metrics import fd_from_features, kernel_distance

__all__ = ["quantize_images", "distances", "feature_floor", "reference_images", "sample_quality", "CLASSIFIER_METRIC",
           "KD_SUBSETS", "KD_SUBSET_SIZE"]

CLASSIFIER_METRIC = "FMNIST-classifier"
KD_SUBSETS, KD_SUBSET_SIZE = 100, 1000  # torch-fidelity's KID defaults


def quantize_images(images) -> np.ndarray:
    """Images in [0, 1] -> the nearest of the 256 levels k/255 (float32)."""
    return (np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def distances(features, reference, name: str, *, seed: int = 0, subsets: int = KD_SUBSETS,
              subset_size: int = KD_SUBSET_SIZE) -> dict:
    """{"FD-name": float, "KD-name": {"mean", "std", "subsets", "subset_size"}} (FID/KID for Inception)."""
    fd_name, kd_name = ("FID", "KID") if name == "inception" else (f"FD-{name}", f"KD-{name}")
    kd_mean, kd_std = kernel_distance(features, reference, subsets=subsets, subset_size=subset_size, seed=seed)
    size = min(subset_size, len(features), len(reference))
    return {fd_name: fd_from_features(features, reference),
            kd_name: {"mean": kd_mean, "std": kd_std, "subsets": subsets, "subset_size": size}}


def feature_floor(net, train_images, test_images, *, n_test: int, n_ref: int, seed: int = 0) -> dict:
    """The classifier metrics of n_test test images against n_ref training images: what a perfect
    generator would score at that sample size."""
    from .classifier import classifier_features

    rng = np.random.default_rng(seed)
    test = quantize_images(test_images[rng.choice(len(test_images), min(n_test, len(test_images)), replace=False)])
    ref = quantize_images(train_images[rng.choice(len(train_images), min(n_ref, len(train_images)), replace=False)])
    d = distances(classifier_features(net, test), classifier_features(net, ref), CLASSIFIER_METRIC, seed=seed)
    kd = d[f"KD-{CLASSIFIER_METRIC}"]
    return {"n_test": len(test), "n_ref": len(ref), "fd": d[f"FD-{CLASSIFIER_METRIC}"], "kd_mean": kd["mean"],
            "kd_std": kd["std"]}


def reference_images(data_cfg: dict, n_ref: int, *, dataset: str | None = None, data_dir: str | None = None,
                     seed: int = 0, split: str = "train") -> tuple[np.ndarray, str]:
    """n_ref images (user units, [0, 1]) or points of the model's training data, and its name.

    A fixed random subset (seeded), so every model is scored against the same reference set.
    """
    from .data import load_dataset

    name = dataset or data_cfg.get("name")
    if not name:
        raise ValueError("the checkpoint does not name its dataset; pass --dataset")
    ds = load_dataset(name, data_dir=data_dir, split=split)
    if list(ds.shape) != list(data_cfg["shape"]):
        raise ValueError(f"dataset {name!r} has shape {ds.shape}, the model makes {tuple(data_cfg['shape'])}; "
                         "pass the model's --dataset")
    idx = np.random.default_rng(seed).permutation(len(ds))[:min(n_ref, len(ds))]
    return ds.to_user(ds.data[np.sort(idx)]), f"{ds.name} {split} ({len(idx)})"


def sample_quality(samples_user, reference_user, data_cfg: dict, *, classifier=None, fid_net=None,
                   seed: int = 0) -> dict:
    """All applicable distances between samples and reference data (both in user units).

    28x28 grey images: FD/KD in the classifier's feature space (``classifier``: a loaded
    FashionMNISTClassifier; None loads the shipped one). Points: FD/KD of the coordinates.
    ``fid_net`` (from hold_export.fid_inception.load_fid_inception) adds FID and KID.
    """
    samples_user, reference_user = np.asarray(samples_user), np.asarray(reference_user)
    out: dict = {}
    if data_cfg["kind"] == "points":
        out.update(distances(samples_user, reference_user, "points", seed=seed))
    elif tuple(data_cfg["shape"]) == (28, 28, 1):
        from .classifier import classifier_features, load_classifier

        net = classifier if classifier is not None else load_classifier()[0]
        samples, reference = quantize_images(samples_user), quantize_images(reference_user)
        out.update(distances(classifier_features(net, samples), classifier_features(net, reference),
                             CLASSIFIER_METRIC, seed=seed))
    elif fid_net is None:
        raise ValueError(f"the offline metrics use a Fashion-MNIST classifier (28x28x1 images) and this model "
                         f"makes {tuple(data_cfg['shape'])}; pass --fid-weights for FID/KID")
    if fid_net is not None:
        if data_cfg["kind"] != "image":
            raise ValueError("FID/KID are for images; this model makes points")
        from hold_export.fid_inception import inception_features

        out.update(distances(inception_features(fid_net, samples_user), inception_features(fid_net, reference_user),
                             "inception", seed=seed))
    return out

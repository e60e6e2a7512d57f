"""Measuring a model, as ``hold-mlx eval`` and tools/eval_compare.py report it: the likelihood of
test data and the quality of samples, each as a JSON-ready dict.

Never prints: progress goes to callbacks, and the caller owns bars, tables and files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np


def non_finite_rows(samples: np.ndarray) -> int:
    """How many samples hold a NaN or Inf anywhere."""
    return int((~np.isfinite(samples.reshape(len(samples), -1))).any(axis=1).sum())


def held_out_data(data_cfg: dict, n: int, *, dataset: str | None = None, data_dir: str | None = None
                  ) -> tuple[np.ndarray, str]:
    """The first n test examples of the model's dataset (or ``dataset``), in user units, and their name."""
    from .data import load_dataset

    name = dataset or data_cfg.get("name")
    ds = load_dataset(name, data_dir=data_dir, split="test")
    if list(ds.shape) != list(data_cfg["shape"]):
        raise ValueError(f"dataset {name!r} has shape {ds.shape}, the model takes {tuple(data_cfg['shape'])}; "
                         "pass the model's --dataset")
    n = min(n, len(ds))
    return ds.to_user(ds.data[:n]), f"{ds.name} test (first {n})"


def likelihood_report(model, n_images: int, *, dataset: str | None = None, data_dir: str | None = None,
                      seed: int = 0, batch_size: int = 64, estimator: str = "hutchinson", rtol: float = 1e-5,
                      atol: float = 1e-5, progress: Callable | None = None) -> dict:
    """Likelihood of the first ``n_images`` test examples under a loaded model (:func:`hold_mlx.load`):
    bits/dim for images, nats per point otherwise. ``progress(done, mean_t)`` runs after every RK45
    step (as :func:`hold_mlx.likelihood.evaluate_likelihood` calls it)."""
    from .likelihood import evaluate_likelihood

    data_cfg = model.config["data"]
    data, source = held_out_data(data_cfg, n_images, dataset=dataset, data_dir=data_dir)
    start = time.time()
    res = evaluate_likelihood(model.sde, model, model.backend, data, data_cfg, seed=seed, batch_size=batch_size,
                              estimator=estimator, rtol=rtol, atol=atol, progress=progress)
    return {"unit": res.unit, "mean": res.mean, "stderr": res.stderr, "n": len(res.values), "data": source,
            "estimator": estimator, "rtol": rtol, "atol": atol, "t0": model.sde.eps_loss, "nfe_per_batch": res.nfe,
            "seed": seed, "wall_s": time.time() - start}


def quality_classifier(data_cfg: dict, classifier=None, *, fid_net=None):
    """The feature network of the offline image metrics (the Fashion-MNIST classifier, loaded from
    ``classifier``: a path, None for the shipped one), or None where it does not apply (points).
    Images of another shape are refused unless ``fid_net`` scores them. Call it before any long
    computation: it fails fast."""
    if data_cfg["kind"] != "image":
        return None
    if tuple(data_cfg["shape"]) == (28, 28, 1):
        from .classifier import load_classifier

        return load_classifier(classifier)[0]
    if fid_net is None:
        raise ValueError(f"the offline metrics use a Fashion-MNIST classifier (28x28x1 images) and this model "
                         f"makes {tuple(data_cfg['shape'])}; pass --fid-weights for FID/KID")
    return None


def read_samples(path, data_cfg: dict) -> np.ndarray:
    """Samples (user units) from an .npz with a 'samples' array, as ``hold-mlx sample --out`` writes it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "samples" not in f:
                raise ValueError(f"{path}: no 'samples' array (write it with hold-mlx sample --out x.npz)")
            samples = np.asarray(f["samples"], np.float32)
    except (ValueError, OSError, EOFError, AttributeError, TypeError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: not a readable .npz of samples ({str(err)[:120]}); write it "
                         "with hold-mlx sample --out x.npz") from err
    if not np.isfinite(samples).all():
        raise ValueError(f"{path}: the samples contain NaN or Inf; draw them again")
    if samples.shape[1:] != tuple(data_cfg["shape"]):
        raise ValueError(f"{path}: samples of shape {samples.shape[1:]}, the model makes {tuple(data_cfg['shape'])}")
    return samples


def quality_report(model, *, n_samples: int = 1000, sampler: str = "lie-trotter", steps: int = 100,
                   grid: str | None = None, samples_file: str | Path | None = None,
                   reference: tuple[np.ndarray, str] | None = None, n_ref: int = 10000, dataset: str | None = None,
                   data_dir: str | None = None, classifier=None, fid_net=None, batch_size: int = 64, seed: int = 0,
                   progress: Callable | None = None, **sampler_options) -> dict:
    """Sample quality of a loaded model: FD/KD (and FID/KID with ``fid_net``) of ``n_samples`` fresh
    samples, or of the samples in ``samples_file``, against ``n_ref`` training examples.

    ``reference``: (images, name) from :func:`hold_mlx.quality.reference_images`, to score several
    models against one set; None draws it (seeded). ``classifier``: a loaded feature network (see
    :func:`quality_classifier`; None loads the shipped one where it applies). ``progress(step, t, u)``
    runs after every sampler step of every batch. ``grid`` None: the sampler's default;
    ``sampler_options`` (e.g. gddim's order, eta) go to the sampler.
    """
    from .quality import reference_images, sample_quality
    from .samplers import resolve_sampler

    data_cfg = model.config["data"]
    start = time.time()
    if samples_file is not None:
        samples = read_samples(samples_file, data_cfg)
        how = {"samples_file": str(samples_file)}
    else:
        grid = grid or getattr(resolve_sampler(sampler)[1], "default_grid", "uniform")
        options = {"sampler": sampler, "steps": steps, "grid": grid, **sampler_options}
        drawn = model.sample(n_samples, batch_size=batch_size, seed=seed, callback=progress, **options)
        bad = non_finite_rows(drawn.x)
        if bad:
            raise FloatingPointError(f"{bad} of {len(drawn.x)} samples are NaN or Inf; nothing was scored: try more "
                                     "steps or another sampler, or retrain the model with a lower learning rate")
        samples = drawn.user_units()
        how = {**options, "nfe": drawn.nfe, "seed": seed}
    if reference is None:
        reference = reference_images(data_cfg, n_ref, dataset=dataset, data_dir=data_dir, seed=seed)
    if classifier is None:
        classifier = quality_classifier(data_cfg, fid_net=fid_net)
    metrics = sample_quality(samples, reference[0], data_cfg, classifier=classifier, fid_net=fid_net, seed=seed)
    return {**how, "n_samples": len(samples), "reference": reference[1], "metrics": metrics,
            "wall_s": time.time() - start}

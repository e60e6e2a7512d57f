"""The shipped weights: the class-conditional Fashion-MNIST HOLD model is present, the same on MLX
and torch, and (slow) samples near the data in the shipped classifier's features and draws the
requested classes; the 2-D demo hits its modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "fashion-mnist-hold"
UNCONDITIONAL = WEIGHTS.parent / "fashion-mnist-hold-uncond"


def test_shipped_weights_are_the_documented_model():
    from hold_mlx.checkpoint import default_checkpoint, read_config
    from hold_mlx.data import FASHION_MNIST_CLASSES

    config = read_config(WEIGHTS / "model.safetensors")
    assert default_checkpoint().resolve() == (WEIGHTS / "model.safetensors").resolve()
    assert config["sde"]["name"] == "hold" and config["sde"]["order"] == 3
    assert config["data"]["name"] == "fashion-mnist" and list(config["data"]["shape"]) == [28, 28, 1]
    assert config["net"]["num_classes"] == 10 and config["data"]["classes"] == list(FASHION_MNIST_CLASSES)
    readme = (WEIGHTS.parent / "README.md").read_text()
    assert f"step {config['step']}" in readme  # the README describes this very checkpoint
    old = read_config(UNCONDITIONAL / "model.safetensors")  # the previous default, kept for its tables
    assert "num_classes" not in old["net"] and f"step {old['step']}" in readme


def test_shipped_model_scores_agree_on_mlx_and_torch():
    pytest.importorskip("torch")
    import mlx.core as mx
    import torch

    from hold_mlx.model import load

    mlx_model, torch_model = load(None, "mlx"), load(None, "torch")
    rng = np.random.default_rng(0)
    u = rng.standard_normal((4, 28, 28, 3)).astype(np.float32)
    t = np.array([1e-3, 0.1, 0.5, 1.0], dtype=np.float32)
    s_mlx = np.array(mlx_model(mx.array(u), mx.array(t)))
    with torch.no_grad():
        s_torch = torch_model(torch.from_numpy(u), torch.from_numpy(t)).numpy()
    assert s_mlx.shape == (4, 28, 28, 1)
    scale = np.abs(s_torch).max(axis=(1, 2, 3))
    assert np.all(np.abs(s_mlx - s_torch).max(axis=(1, 2, 3)) <= 1e-4 * scale), (s_mlx - s_torch).max()


@pytest.mark.slow
def test_shipped_samples_look_like_fashion_mnist():
    """64 samples at 50 Lie-Trotter steps, in the shipped classifier's feature space: far closer to
    the training images than uniform noise is (KD, unbiased at any sample size), spread over
    several classes."""
    from hold_mlx.classifier import classifier_logits, load_classifier
    from hold_mlx.data import load_dataset, to_user_units
    from hold_mlx.quality import reference_images, sample_quality
    from hold_mlx.model import load

    rt = load(None, "mlx")
    drawn = rt.sample(64, batch_size=64, steps=50, seed=0)
    x, nfe = drawn.x, drawn.nfe
    assert nfe == 51 and np.isfinite(x).all()
    cfg = rt.config["data"]
    images = to_user_units(x, cfg)
    net, _ = load_classifier()
    reference, _ = reference_images(cfg, 1000, seed=0)
    test = load_dataset("fashion-mnist", split="test")

    def kd(imgs):
        return sample_quality(imgs, reference, cfg, classifier=net)["KD-FMNIST-classifier"]["mean"]

    noise = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    kd_samples, kd_real, kd_noise = kd(images), kd(test.to_user(test.data[:64])), kd(noise)
    assert kd_real < kd_samples < 0.3 * kd_noise, (kd_real, kd_samples, kd_noise)
    assert np.unique(classifier_logits(net, images).argmax(1)).size >= 6


@pytest.mark.slow
def test_shipped_model_draws_the_requested_classes():
    """20 samples of each class at the default guidance (50 Lie-Trotter steps): the shipped
    classifier assigns most of them to the class that was asked for."""
    from hold_mlx.classifier import classifier_logits, load_classifier
    from hold_mlx.model import DEFAULT_GUIDANCE, load

    model = load(None, "mlx")
    labels = np.repeat(np.arange(10), 20)
    drawn = model.sample(len(labels), steps=50, seed=3, batch_size=100, labels=labels)
    assert drawn.guidance == DEFAULT_GUIDANCE and list(drawn.labels) == list(labels)
    predicted = classifier_logits(load_classifier()[0], drawn.user_units()).argmax(1)
    per_class = [np.mean(predicted[labels == k] == k) for k in range(10)]
    assert np.mean(per_class) > 0.8 and min(per_class) > 0.4, per_class


def test_shipped_2d_demo_samples_the_eight_modes():
    from hold_mlx.data import to_user_units
    from hold_mlx.model import load

    rt = load(WEIGHTS.parent / "8gaussians-hold", "mlx")
    x = rt.sample(1000, batch_size=1000, steps=100, seed=1).x
    pts = to_user_units(x, rt.config["data"])
    angles = 2 * np.pi * np.arange(8) / 8
    modes = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    dist = np.linalg.norm(pts[:, None, :] - modes[None], axis=-1)
    near = dist.min(1) < 0.5  # the modes have std 0.1
    assert near.mean() > 0.95
    share = np.bincount(dist.argmin(1)[near], minlength=8) / near.sum()
    assert np.all(np.abs(share - 1 / 8) < 0.06), share

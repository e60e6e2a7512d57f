"""`hold-mlx eval` end to end on tiny random networks, MLX/torch parity of the likelihood, the
shipped classifier, and the FID weights checks (no FID numbers: the Inception file is not here)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from hold_mlx.checkpoint import make_config, write_tensors
from hold_mlx.cli import main
from hold_mlx.netconfig import net_preset
from hold_mlx.sde import get_sde


def make_checkpoint(path, *, sde="hold", net="tiny", data=None, seed=0, noise=0.05, **net_overrides):
    """A checkpoint of a randomly initialised network with every weight perturbed (so the score is
    a genuinely nonlinear function; the zero-initialised output layers would make it linear)."""
    from hold_mlx._mlx import mx
    from hold_mlx.model import flat_params
    from hold_mlx.nets import build_net

    mx.random.seed(seed)

    sde_obj = get_sde(sde)
    data = data or {"name": "fashion-mnist", "kind": "image", "shape": [28, 28, 1], "shift": 0.5, "scale": 0.5}
    channels = data["shape"][-1]
    extra = {"image_size": data["shape"][0]} if data["kind"] == "image" else {}
    cfg = net_preset(net, order=sde_obj.order, data_channels=channels, **extra, **net_overrides)
    tensors = flat_params(build_net(cfg).parameters())
    rng = np.random.default_rng(seed)
    tensors = {k: (v + noise * rng.standard_normal(v.shape)).astype(np.float32) if not k.endswith(".W") else v
               for k, v in tensors.items()}
    write_tensors(path, tensors, make_config(sde_obj, cfg, data))
    return path


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "model.safetensors", noise=0.01)


@pytest.fixture(scope="module")
def nonlinear_model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "nonlinear.safetensors", noise=0.05)


@pytest.fixture(scope="module")
def points_model(tmp_path_factory):
    data = {"name": "8gaussians", "kind": "points", "shape": [2], "shift": [0.0, 0.0], "scale": [2.0, 2.0]}
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "points.safetensors", sde="cld", net="mlp-tiny",
                           data=data, noise=0.01)


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


# ----------------------------------------------------------------------------- the command


def test_eval_needs_something_to_measure(image_model):
    code, out = run(["eval", "--checkpoint", str(image_model)])
    assert code != 0 and "--bpd and/or --quality" in out


def test_eval_images_bpd_and_quality(image_model, tmp_path):
    report = tmp_path / "r.json"
    code, out = run(["eval", "--checkpoint", str(image_model), "--bpd", "--n-images", "2", "--rtol", "1e-3",
                     "--atol", "1e-3", "--quality", "--n-samples", "16", "--steps", "3", "--n-ref", "40",
                     "--batch-size", "8", "--out", str(report)])
    assert code == 0, out
    assert "bits/dim" in out and "FD-FMNIST-classifier" in out and "FID" not in out
    r = json.loads(report.read_text())
    lik = r["likelihood"]
    assert lik["unit"] == "bits/dim" and lik["n"] == 2 and math.isfinite(lik["mean"]) and lik["stderr"] > 0
    assert lik["mean"] > 0  # bits/dim of 8-bit data under any density on the dequantised cube is > 0
    q = r["quality"]
    assert q["n_samples"] == 16 and q["nfe"] == 4  # 3 lie-trotter steps + the denoising call
    assert q["metrics"]["FD-FMNIST-classifier"] > 0
    assert q["metrics"]["KD-FMNIST-classifier"]["subset_size"] == 16


def test_eval_points(points_model, tmp_path):
    report = tmp_path / "p.json"
    code, out = run(["eval", "--checkpoint", str(points_model), "--bpd", "--n-images", "4", "--estimator", "exact",
                     "--quality", "--n-samples", "50", "--steps", "5", "--n-ref", "60", "--out", str(report)])
    assert code == 0, out
    r = json.loads(report.read_text())
    assert r["likelihood"]["unit"] == "nats" and math.isfinite(r["likelihood"]["mean"])
    assert set(r["quality"]["metrics"]) == {"FD-points", "KD-points"}


def test_eval_scores_given_samples(image_model, tmp_path):
    """--samples: quality of an .npz of images: held-out test images score far better than noise."""
    from hold_mlx.data import load_dataset

    test = load_dataset("fashion-mnist", split="test")
    good, noise = tmp_path / "good.npz", tmp_path / "noise.npz"
    np.savez(good, samples=test.to_user(test.data[:200]))
    np.savez(noise, samples=np.random.default_rng(0).random((200, 28, 28, 1)).astype(np.float32))
    scores = {}
    for name, path in (("good", good), ("noise", noise)):
        report = tmp_path / f"{name}.json"
        code, out = run(["eval", "--checkpoint", str(image_model), "--samples", str(path), "--n-ref", "200",
                         "--out", str(report)])
        assert code == 0, out
        scores[name] = json.loads(report.read_text())["quality"]["metrics"]
    # FD carries a finite-sample bias (about 18 at 200 vs 200 images); KD is unbiased, so held-out
    # real images score near 0 (within its spread at n = 200) against the training images.
    assert scores["noise"]["FD-FMNIST-classifier"] > 5 * scores["good"]["FD-FMNIST-classifier"]
    kd_good, kd_noise = (scores[k]["KD-FMNIST-classifier"]["mean"] for k in ("good", "noise"))
    assert kd_noise > 10 * abs(kd_good)


def test_library_reports_equal_the_cli_json(points_model, tmp_path):
    """hold_mlx.evaluate called directly gives the numbers `hold-mlx eval --out` writes for the same
    seed; progress runs once per sampler step of every batch, and another seed draws other samples."""
    from hold_mlx.evaluate import likelihood_report, quality_report
    from hold_mlx.model import load

    report = tmp_path / "cli.json"
    code, out = run(["eval", "--checkpoint", str(points_model), "--bpd", "--n-images", "6", "--rtol", "1e-3",
                     "--atol", "1e-3", "--quality", "--n-samples", "40", "--steps", "4", "--n-ref", "50",
                     "--batch-size", "16", "--seed", "3", "--out", str(report)])
    assert code == 0, out
    cli = json.loads(report.read_text())
    model = load(points_model, "mlx")
    lik = likelihood_report(model, 6, rtol=1e-3, atol=1e-3, batch_size=16, seed=3)
    for key in ("unit", "mean", "stderr", "n", "data", "nfe_per_batch", "t0"):
        assert lik[key] == cli["likelihood"][key], key
    steps_seen = []
    q = quality_report(model, n_samples=40, steps=4, n_ref=50, batch_size=16, seed=3,
                       progress=lambda *step: steps_seen.append(step))
    assert q["metrics"] == cli["quality"]["metrics"] and q["nfe"] == cli["quality"]["nfe"] == 5
    assert q["reference"] == cli["quality"]["reference"] and q["n_samples"] == 40
    assert len(steps_seen) == 4 * 3  # 4 steps in each of 3 batches (16 + 16 + 8)
    other = quality_report(model, n_samples=40, steps=4, n_ref=50, batch_size=16, seed=4)
    assert other["metrics"]["FD-points"] != q["metrics"]["FD-points"]


def test_eval_quality_of_other_images_needs_fid_weights(tmp_path):
    data = {"name": "digits", "kind": "image", "shape": [8, 8, 1], "shift": 0.5, "scale": 0.5}
    path = make_checkpoint(tmp_path / "digits.safetensors", data=data)
    code, out = run(["eval", "--checkpoint", str(path), "--quality"])
    assert code != 0 and "--fid-weights" in out and "(8, 8, 1)" in out


def test_eval_fid_weights_errors(image_model, tmp_path):
    code, out = run(["eval", "--checkpoint", str(image_model), "--fid-weights", str(tmp_path / "missing.pth")])
    assert code != 0 and "no such file" in out and "pt_inception-2015-12-05-6726825d.pth" in out
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    fake.write_bytes(b"not the inception weights")
    code, out = run(["eval", "--checkpoint", str(image_model), "--fid-weights", str(fake)])
    assert code != 0 and "SHA-256" in out and len(out.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- library pieces on real networks


def test_probe_on_a_network_mlx_torch_and_finite_differences(nonlinear_model):
    """The score probe q = z.(ds/du_n)z on a nonlinear U-Net: MLX (mx.vjp) and torch (autograd)
    agree, and both match a central finite difference of the score along z in the last block."""
    pytest.importorskip("torch")
    from hold_mlx.likelihood import score_probe
    from hold_mlx.model import load

    rng = np.random.default_rng(11)
    u = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    z = rng.choice([-1.0, 1.0], size=(2, 28, 28, 1)).astype(np.float32)
    t = np.array([0.3, 2.0])
    got = {}
    for backend in ("mlx", "torch"):
        model = load(nonlinear_model, backend)
        ops = model.backend
        s, q = score_probe(model, ops, 1)(ops.asarray(u), ops.asarray(t), ops.asarray(z))
        got[backend] = (ops.to_numpy(s), ops.to_numpy(q))
        if backend == "mlx":
            h = 1e-2
            shift = np.concatenate([np.zeros_like(u[..., :2]), h * z], axis=-1)
            plus = ops.to_numpy(model(ops.asarray(u + shift), ops.asarray(t)))
            minus = ops.to_numpy(model(ops.asarray(u - shift), ops.asarray(t)))
            fd = ((plus - minus) / (2 * h) * z).reshape(2, -1).sum(1)
            np.testing.assert_allclose(got["mlx"][1], fd, rtol=2e-2)
    np.testing.assert_allclose(got["mlx"][0], got["torch"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["mlx"][1], got["torch"][1], rtol=1e-3)


@pytest.mark.slow
def test_likelihood_mlx_and_torch_agree_on_a_network(tmp_path):
    """The whole likelihood on an MLP checkpoint: MLX and torch give the same nats per point. (At
    rtol 1e-6; a random network oscillates in log t, and at 1e-5 its ODE error reaches 1e-2 nats for
    VP and 0.1 for CLD, which the two backends' step choices then expose.)"""
    pytest.importorskip("torch")
    from hold_mlx.likelihood import evaluate_likelihood
    from hold_mlx.model import load

    data = {"name": "8gaussians", "kind": "points", "shape": [2], "shift": [0.0, 0.0], "scale": [2.0, 2.0]}
    path = make_checkpoint(tmp_path / "vp.safetensors", sde="vp", net="mlp-tiny", data=data, noise=0.01)
    points = np.random.default_rng(12).standard_normal((4, 2)) * 2.0
    values = {}
    for backend in ("mlx", "torch"):
        model = load(path, backend)
        values[backend] = evaluate_likelihood(model.sde, model, model.backend, points, model.config["data"], seed=4,
                                              estimator="exact", rtol=1e-6, atol=1e-6).values
    np.testing.assert_allclose(values["mlx"], values["torch"], atol=2e-3)


def test_shipped_classifier_accuracy():
    """The shipped feature network classifies held-out Fashion-MNIST (README: test accuracy)."""
    from hold_mlx.classifier import classifier_logits, load_classifier
    from hold_mlx.data import load_dataset

    net, meta = load_classifier()
    test = load_dataset("fashion-mnist", split="test")
    logits = classifier_logits(net, test.to_user(test.data[:2000]))
    accuracy = (logits.argmax(1) == test.labels[:2000]).mean()
    # binomial s.e. at 2000 images is 0.7%: the full-set figure in the metadata must be consistent
    assert accuracy >= 0.88 and abs(accuracy - meta["test_accuracy"]) < 0.03
    assert meta["test_accuracy"] >= 0.90

"""The command line as a user meets it: help, resumable training, sample files, one-line errors."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from conftest import run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith("Error:") or "Invalid value" in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def test_help_and_version():
    top = run_cli("--help").stdout
    for command in ("sample", "train", "doctor"):
        assert command in top
        assert "Usage: hold-mlx " + command in run_cli(command, "--help").stdout
    assert "--steps" in run_cli("sample", "--help").stdout
    version = run_cli("--version").stdout
    assert version.startswith("hold-mlx ") and "BLAS:" in version


def test_train_resume_and_sample_files(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--dataset", "digits", "--net", "tiny", "--steps", "3", "--batch-size", "8",
                    "--save-every", "2", "--no-compile", "--sample-steps", "4", "--out", out)
    assert "new run" in first.stdout and "done: step 3" in first.stdout
    assert (out / "samples_0000003.png").is_file()
    again = run_cli("train", "--out", out, "--steps", "5")  # everything else comes from the run
    assert "resuming at step 3" in again.stdout and "done: step 5" in again.stdout

    npz = tmp_path / "s.npz"
    proc = run_cli("sample", "--checkpoint", out, "--steps", "5", "--n", "6", "--batch-size", "4", "--out", npz)
    assert "6 samples" in proc.stdout and "6 network calls" in proc.stdout
    samples = np.load(npz)["samples"]
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.float32
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    png = tmp_path / "s.png"
    run_cli("sample", "--checkpoint", out, "--steps", "3", "--n", "4", "--out", png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 16 and im.mode == "L"


def test_points_sample_as_scatter_and_npz(tmp_path, tiny_points_run):
    npz = tmp_path / "p.npz"
    run_cli("sample", "--checkpoint", tiny_points_run, "--steps", "4", "--n", "50", "--out", npz)
    pts = np.load(npz)["samples"]
    assert pts.shape == (50, 2) and np.isfinite(pts).all()
    run_cli("sample", "--checkpoint", tiny_points_run, "--steps", "4", "--n", "50", "--out", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("args,fragments", [
    (["sample", "--steps", "0"], ["--steps"]),
    (["sample", "--sampler", "nope"], ["--sampler"]),
    (["sample", "--out", "/nonexistent-dir/x.png"], ["does not exist"]),
    (["sample", "--out", "x.jpg"], [".png or .npz"]),
    (["sample", "--checkpoint", "/nonexistent-file.safetensors"], ["no such checkpoint"]),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent", "--out", "/tmp/hold-mlx-never"],
     ["apt-get install dataset-fashion-mnist"]),
    (["train", "--dataset", "digits", "--device", "cuda", "--out", "/tmp/hold-mlx-never"], ["--device"]),
])
def test_bad_input_gives_one_line_errors(args, fragments):
    assert_one_line_error(run_cli(*args, check=False), *fragments)


def test_corrupted_checkpoint_is_one_line(tmp_path, tiny_run):
    broken = tmp_path / "model.safetensors"
    data = (tiny_run / "model.safetensors").read_bytes()
    broken.write_bytes(data[:100])
    assert_one_line_error(run_cli("sample", "--checkpoint", broken, check=False), "model.safetensors")


def test_doctor_reports_blas_and_datasets():
    out = run_cli("doctor").stdout
    assert "mlx BLAS" in out and "fashion-mnist" in out and "torch" in out
    native = next(line for line in out.splitlines() if line.startswith("mlx native kernels"))
    if sys.platform == "linux" and shutil.which("g++"):  # the kernels build on such a machine
        assert "built: " in native, native
        from hold_mlx import native as native_module

        isa, why = native_module.choose_variant()
        variant = next(line for line in out.splitlines() if line.startswith("native variant"))
        assert variant.split()[2] == isa and why in variant, variant


def test_train_options_are_the_train_config():
    """Every `train` option but the SDE/network overrides is a TrainConfig field with its default:
    the CLI derives them instead of repeating the library."""
    from dataclasses import fields

    from hold_mlx.cli import train
    from hold_mlx.trainloop import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for param in train.params:
        if param.name in ("out", "order", "sde_param", "net_param"):
            continue
        assert param.name in defaults, param.name
        assert param.default == defaults[param.name], param.name

"""`hold-mlx sample` with every sampler family and its options, on a tiny trained 2-D model."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def points_run(tmp_path_factory):
    """An MLX run folder: tiny MLP, CLD, 2-D 8-gaussians, 4 training steps."""
    from hold_mlx.train import Trainer
    from hold_mlx.trainloop import TrainConfig

    out = tmp_path_factory.mktemp("points_run")
    cfg = TrainConfig(dataset="8gaussians", net="mlp-tiny", sde="cld", steps=4, batch_size=8, save_every=2,
                      warmup=2, compile=False, sample_steps=5)
    for _ in Trainer(cfg, out).run():
        pass
    return out


def sample_cli(*args):
    from hold_mlx.cli import main

    return CliRunner().invoke(main, ["sample", *map(str, args)])


@pytest.mark.parametrize("extra", [
    ["--sampler", "exp-heun"],
    ["--sampler", "plmc", "--substeps", "3"],
    ["--sampler", "ams", "--norms", "batch", "--snr", "0.1"],
    ["--sampler", "rk45"],
    ["--sampler", "gddim", "--order", "3", "--eta", "0.5", "--grid", "edm"],
    ["--sampler", "gddim", "--grid", "log-sigma"],
    ["--sampler", "gddim", "--corrector", "--eta", "0.3", "--grid", "power-2.5"],
])
def test_sample_options_reach_the_sampler(tmp_path, points_run, extra):
    npz = tmp_path / "s.npz"
    result = sample_cli("--checkpoint", points_run, "--steps", "3", "--n", "10", "--batch-size", "4", "--out", npz,
                        *extra)
    assert result.exit_code == 0, result.output
    assert "10 samples" in result.output
    pts = np.load(npz)["samples"]
    assert pts.shape == (10, 2) and np.all(np.isfinite(pts))


def test_an_option_the_sampler_does_not_take_is_a_one_line_error(tmp_path, points_run):
    result = sample_cli("--checkpoint", points_run, "--sampler", "lie-trotter", "--substeps", "3",
                        "--out", tmp_path / "x.npz")
    assert result.exit_code != 0
    assert "Error: sampler 'lie-trotter' has no option 'substeps'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "gddim", "--eta", "2"], "Error: gddim eta must be a number in [0, 1]"),
    (["--sampler", "gddim", "--order", "4"], "Invalid value for '--order'"),
    (["--sampler", "lie-trotter", "--order", "2"], "Error: --order applies only to --sampler gddim"),
    (["--sampler", "ams", "--no-corrector"], "Error: --corrector applies only to --sampler gddim"),
    (["--sampler", "gddim", "--grid", "power-20"], "Invalid value for '--grid': unknown time grid 'power-20'"),
])
def test_gddim_options_are_checked(tmp_path, points_run, extra, message):
    result = sample_cli("--checkpoint", points_run, "--steps", "3", "--out", tmp_path / "x.npz", *extra)
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

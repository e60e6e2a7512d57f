"""Shared fixtures: tiny run folders made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, check=True, timeout=600, env=None):
    """Run ``hold-mlx ARGS`` in a subprocess (as a user would); returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "hold_mlx", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"hold-mlx {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_config(**overrides):
    from hold_mlx.trainloop import TrainConfig

    base = dict(dataset="digits", net="tiny", steps=4, batch_size=8, save_every=2, warmup=2, compile=False,
                sample_steps=5)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """An MLX run folder: tiny U-Net, HOLD order 3, 8x8 digits, 4 steps."""
    from hold_mlx.train import Trainer

    out = tmp_path_factory.mktemp("tiny_run")
    trainer = Trainer(tiny_config(), out)
    for _ in trainer.run():
        pass
    return out


@pytest.fixture(scope="session")
def tiny_points_run(tmp_path_factory) -> Path:
    """An MLX run folder: tiny MLP, CLD, 2-D 8-gaussians, 4 steps."""
    from hold_mlx.train import Trainer

    out = tmp_path_factory.mktemp("tiny_points_run")
    trainer = Trainer(tiny_config(dataset="8gaussians", net="mlp-tiny", sde="cld"), out)
    for _ in trainer.run():
        pass
    return out

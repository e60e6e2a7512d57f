"""MLX <-> torch: the same checkpoint gives the same samples, and run folders move both ways.

Network-level parity (outputs to ~1e-5) and the layout map are in test_torch_nets.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from hold_export.parity import (differing_tensors, random_checkpoint_config,  # noqa: E402
                                random_checkpoint_tensors, weight_gap_in_steps)
from hold_export.torch_train import TorchTrainer  # noqa: E402
from hold_mlx.checkpoint import MODEL_FILE, STATE_FILE, read_config, read_tensors, write_tensors  # noqa: E402
from hold_mlx.cli import main  # noqa: E402
from hold_mlx.netconfig import net_preset  # noqa: E402
from hold_mlx.model import load  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402
from hold_mlx.train import Trainer as MLXTrainer  # noqa: E402
from hold_mlx.trainloop import TrainConfig  # noqa: E402
from torch_fixtures import digits, one_thread  # noqa: E402,F401

# tiny U-Net on 8x8 digits, no dropout (the two backends draw dropout masks differently); a large
# step size and a short EMA so that a few steps move every weight well away from its init
RUN = dict(dataset="digits", net="tiny", batch_size=8, lr=1e-2, warmup=0, ema_decay=0.5, sde="hold", compile=False,
           save_every=2)


def _samples(checkpoint, backend, **options):
    return load(checkpoint, backend).sample(5, batch_size=3, seed=11, **options).x


@pytest.mark.parametrize("sampler", ["lie-trotter", "euler-maruyama", "gddim"])
def test_same_checkpoint_same_seed_same_samples(tmp_path, sampler):
    """Random U-Net weights (every layer active), portable noise: MLX and torch agree."""
    sde = get_sde("hold")
    cfg = net_preset("tiny", image_size=8, data_channels=1, order=sde.order)
    ckpt = tmp_path / "m.safetensors"
    write_tensors(ckpt, random_checkpoint_tensors(cfg, seed=1), random_checkpoint_config(cfg, sde))
    a = _samples(ckpt, "mlx", steps=12, sampler=sampler)
    b = _samples(ckpt, "torch", steps=12, sampler=sampler)
    assert a.shape == b.shape == (5, 8, 8, 1)
    assert np.abs(a).max() > 1.0  # model space, not clipped
    assert np.abs(a - b).max() < 1e-4


def test_cli_sample_matches_across_backends(tmp_path):
    """`hold-mlx sample` on both backends, points data (written unclipped in its own units)."""
    sde = get_sde("cld")
    cfg = net_preset("mlp-tiny", data_channels=2, order=sde.order)
    ckpt = tmp_path / "m.safetensors"
    write_tensors(ckpt, random_checkpoint_tensors(cfg, seed=2), random_checkpoint_config(cfg, sde))
    out = {}
    for backend in ("mlx", "torch"):
        path = tmp_path / f"{backend}.npz"
        result = CliRunner().invoke(main, ["sample", "--checkpoint", str(ckpt), "--backend", backend, "--steps", "20",
                                           "--n", "50", "--batch-size", "16", "--seed", "4", "--out", str(path)])
        assert result.exit_code == 0, result.output
        out[backend] = np.load(path)["samples"]
    assert out["mlx"].shape == (50, 2) and np.abs(out["mlx"]).max() > 0.5
    assert np.abs(out["mlx"] - out["torch"]).max() < 1e-4


class TorchWithMLXNoise(TorchTrainer):
    """The torch trainer fed the MLX trainer's noise: both backends then compute the same steps."""

    def _noise(self, batch, data_shape):
        from hold_mlx._mlx import mx
        from hold_mlx.train import _noise_key

        eps = mx.random.normal((self.sde.order, *batch.x0.shape), key=_noise_key(batch.noise_seed))
        return torch.from_numpy(np.array(eps))


def _train(trainer_cls, out, digits, steps, backend):
    trainer = trainer_cls(TrainConfig(**{**RUN, "steps": steps, "backend": backend}), out, dataset=digits)
    start = trainer.step
    losses = [info.loss for info in trainer.run()]
    return trainer, start, losses


def _state(out):
    return read_tensors(out / STATE_FILE)[0]


@pytest.mark.parametrize("first,second", [("mlx", "torch"), ("torch", "mlx")], ids=["mlx-to-torch", "torch-to-mlx"])
def test_run_folder_moves_between_backends(tmp_path, digits, first, second):
    """Train 2 steps on one backend; the other resumes at step 2 with exactly the saved weights,
    EMA and Adam state; 2 more steps (same batches and noise) agree with the first backend going on
    alone, to a small fraction of one Adam step (see weight_gap_in_steps). The model then samples
    the same on both."""
    classes = {"mlx": MLXTrainer, "torch": TorchWithMLXNoise}
    _train(classes[first], tmp_path / "a", digits, 2, first)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    saved = _state(tmp_path / "a")

    resumed = classes[second](TrainConfig(**{**RUN, "steps": 4, "backend": second}), tmp_path / "b", dataset=digits)
    assert resumed.step == 2
    assert differing_tensors(saved, resumed._backend_state()) == []
    losses_second = [info.loss for info in resumed.run()]
    _, start, losses_first = _train(classes[first], tmp_path / "a", digits, 4, first)
    assert start == 2 and len(losses_first) == len(losses_second) == 2
    assert np.allclose(losses_first, losses_second, rtol=1e-4)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert int(a["adam_step"][0]) == int(b["adam_step"][0]) == 4
    typical, worst = weight_gap_in_steps(a, b, RUN["lr"])
    assert typical < 1e-3 and worst < 0.05
    assert read_config(tmp_path / "b" / MODEL_FILE)["train"]["backend"] == second

    samples = {backend: _samples(tmp_path / "b", backend, steps=8) for backend in ("mlx", "torch")}
    assert np.abs(samples["mlx"] - samples["torch"]).max() < 1e-4

"""torch training: resume, mixed precision, channels_last, CUDA paths (skipped without CUDA), errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from hold_export.parity import (differing_tensors, random_checkpoint_config,  # noqa: E402
                                random_checkpoint_tensors, weight_gap_in_steps)
from hold_export.torch_model import load_weights  # noqa: E402
from hold_export.torch_nets import build_net  # noqa: E402
from hold_export.torch_train import TorchTrainer, score_matching_loss  # noqa: E402
from hold_mlx.checkpoint import STATE_FILE, read_config, read_tensors, write_tensors  # noqa: E402
from hold_mlx.cli import main  # noqa: E402
from hold_mlx.netconfig import net_preset  # noqa: E402
from hold_mlx.parameterisation import objective_coefficients  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402
from hold_mlx.trainloop import TrainConfig  # noqa: E402
from torch_fixtures import digits, one_thread  # noqa: E402,F401

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")

# digits (8x8) on the tiny U-Net, with dropout so that resuming must also repeat the dropout masks
TINY = dict(dataset="digits", net="tiny", net_params={"dropout": 0.1}, batch_size=8, lr=2e-3, warmup=2,
            sde="hold", backend="torch", compile=False, save_every=2)


def _run(out, digits, steps, **overrides) -> TorchTrainer:
    trainer = TorchTrainer(TrainConfig(**{**TINY, "steps": steps, **overrides}), out, dataset=digits)
    for _ in trainer.run():
        pass
    return trainer


def _state(out) -> dict[str, np.ndarray]:
    return read_tensors(Path(out) / STATE_FILE)[0]


def test_resume_repeats_the_uninterrupted_run_bitwise(tmp_path, digits):
    _run(tmp_path / "full", digits, steps=4)
    first = _run(tmp_path / "split", digits, steps=2)
    assert first.step == 2
    resumed = TorchTrainer(TrainConfig(**{**TINY, "steps": 4}), tmp_path / "split", dataset=digits)
    assert resumed.step == 2
    for _ in resumed.run():
        pass
    assert differing_tensors(_state(tmp_path / "full"), _state(tmp_path / "split")) == []
    assert read_config(tmp_path / "split" / STATE_FILE)["step"] == 4
    raw = _state(tmp_path / "full")
    assert not np.array_equal(raw["raw/conv_out.weight"], 0 * raw["raw/conv_out.weight"])  # it trained


@pytest.mark.slow
def test_kill_and_resume_repeats_the_uninterrupted_run_bitwise(tmp_path, digits):
    """SIGKILL a `hold-mlx train` process mid-run, resume it, and compare with an uninterrupted run.
    (64 steps: with 16 a fast machine finished the run between two polls, before the kill.)"""
    steps = 64
    args = [sys.executable, "-m", "hold_mlx.cli", "train", "--backend", "torch", "--dataset", "digits",
            "--net", "tiny", "--net-param", "dropout=0.1", "--batch-size", "8", "--lr", "2e-3", "--warmup", "2",
            "--save-every", "1", "--no-compile", "--steps", str(steps), "--sample-steps", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / STATE_FILE).exists() and read_config(killed / STATE_FILE)["step"] >= 3:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stopped_at = read_config(killed / STATE_FILE)["step"]
    assert 3 <= stopped_at < steps, "the run was not killed mid-way"
    done = subprocess.run(args + ["--out", str(killed)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {stopped_at}" in done.stdout
    _run(tmp_path / "full", digits, steps=steps, save_every=1)
    assert differing_tensors(_state(tmp_path / "full"), _state(killed)) == []


def _loss_inputs(digits, batch=6, seed=0):
    sde = get_sde("hold")
    rng = np.random.default_rng(seed)
    x0 = torch.from_numpy(digits.data[:batch])
    eps = torch.from_numpy(rng.standard_normal((sde.order, *x0.shape)).astype(np.float32))
    c = objective_coefficients(sde, np.linspace(0.01, sde.T, batch)).as_float32()
    return x0, eps, [torch.from_numpy(c[k]) for k in ("t", "mean", "chol", "mixed", "weight")]


def test_bf16_autocast_loss_on_cpu(digits):
    """The loss under bf16 autocast (the CUDA recipe, runnable on the CPU): network in bf16, the
    loss and its gradients in fp32, and close to the fp32 loss."""
    cfg = net_preset("tiny", image_size=8, data_channels=1, order=3)
    net = build_net(cfg)
    load_weights(net, random_checkpoint_tensors(cfg, seed=1))
    x0, eps, coeffs = _loss_inputs(digits)
    ref = score_matching_loss(net, x0, eps, *coeffs)
    low = score_matching_loss(net, x0, eps, *coeffs, amp_dtype=torch.bfloat16)
    assert ref.dtype == low.dtype == torch.float32
    assert 1e-6 < abs(low.item() - ref.item()) / ref.item() < 3e-2
    low.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())


def test_loss_is_the_objective_of_objective_py(digits):
    """With the network replaced by the exact answer (alpha = eps_n - mixed u_n) the loss is 0;
    with alpha = 0 it is the weighted mean of (mixed u_n - eps_n)^2, computed here by hand."""
    x0, eps, (t, mean, chol, mixed, weight) = _loss_inputs(digits)
    n = eps.shape[0]
    u_last = mean[:, n - 1].reshape(-1, 1, 1, 1) * x0 + sum(
        chol[:, n - 1, j].reshape(-1, 1, 1, 1) * eps[j] for j in range(n))

    def oracle(u, t_):  # NCHW in, NCHW out
        return (eps[-1] - mixed.reshape(-1, 1, 1, 1) * u_last).permute(0, 3, 1, 2)

    assert score_matching_loss(oracle, x0, eps, t, mean, chol, mixed, weight).item() < 1e-10
    zero = score_matching_loss(lambda u, t_: torch.zeros_like(u[:, :1]), x0, eps, t, mean, chol, mixed, weight)
    by_hand = (weight * ((mixed.reshape(-1, 1, 1, 1) * u_last - eps[-1]) ** 2).mean(dim=(1, 2, 3))).mean()
    assert zero.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_bf16_training_step_on_cpu_and_no_grad_scaler(tmp_path, digits):
    trainer = _run(tmp_path / "bf16", digits, steps=2, amp="bf16")
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    assert np.isfinite(_state(tmp_path / "bf16")["raw/conv_out.weight"]).all()


def test_fp16_needs_cuda(tmp_path, digits):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(ValueError, match="fp16 needs --device cuda"):
        TorchTrainer(TrainConfig(**{**TINY, "steps": 1, "amp": "fp16"}), tmp_path / "x", dataset=digits)


def _losses(out, digits, steps, **overrides) -> list[float]:
    trainer = TorchTrainer(TrainConfig(**{**TINY, "steps": steps, **overrides}), out, dataset=digits)
    return [info.loss for info in trainer.run()]


def test_channels_last_trains_the_same_numbers(tmp_path, digits):
    """channels_last changes the memory order only: the same losses up to float rounding, and
    weights within a small fraction of one Adam step (see weight_gap_in_steps). Without dropout:
    torch draws a dropout mask in memory order, so the masks differ between formats."""
    no_dropout = {"net_params": {}}
    plain = _losses(tmp_path / "plain", digits, 3, **no_dropout)
    cl = _losses(tmp_path / "cl", digits, 3, channels_last=True, **no_dropout)
    assert np.allclose(plain, cl, rtol=1e-5)
    typical, worst = weight_gap_in_steps(_state(tmp_path / "plain"), _state(tmp_path / "cl"), TINY["lr"])
    assert typical < 1e-3 and worst < 0.05
    trainer = TorchTrainer(TrainConfig(**{**TINY, "steps": 3, "channels_last": True, **no_dropout}), tmp_path / "cl",
                           dataset=digits)
    assert trainer.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@no_cuda
@pytest.mark.parametrize("command", [["sample", "--backend", "torch", "--device", "cuda", "--n", "1"],
                                     ["train", "--backend", "torch", "--device", "cuda", "--dataset", "digits",
                                      "--net", "tiny", "--steps", "1"]], ids=["sample", "train"])
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, command):
    ckpt = tmp_path / "m.safetensors"
    cfg = net_preset("mlp-tiny", data_channels=2, order=3)
    write_tensors(ckpt, random_checkpoint_tensors(cfg), random_checkpoint_config(cfg, get_sde("hold")))
    extra = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "s.npz")] if command[0] == "sample" \
        else ["--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, command + extra)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --device cuda: no usable CUDA device"), result.output


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    cfg = net_preset("tiny", image_size=8, data_channels=1, order=3)
    other = net_preset("tiny", image_size=8, data_channels=1, order=3, channels=8)
    ckpt = tmp_path / "bad.safetensors"
    write_tensors(ckpt, random_checkpoint_tensors(other), random_checkpoint_config(cfg, get_sde("hold")))
    result = CliRunner().invoke(main, ["sample", "--backend", "torch", "--checkpoint", str(ckpt), "--n", "1",
                                       "--steps", "1", "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0] and "shape" in lines[0], result.output


# ----------------------------------------------------------------------------- CUDA only


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_compile_channels_last(tmp_path, digits, amp):
    trainer = _run(tmp_path / amp, digits, steps=3, device="cuda", amp=amp, compile=True, channels_last=True)
    assert trainer.device.type == "cuda"
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert trainer.optimizer.defaults["fused"] is True
    state = _state(tmp_path / amp)
    assert all(np.isfinite(v).all() for v in state.values())
    assert int(state["adam_step"][0]) == 3 or amp == "fp16"  # fp16 may skip an overflowing step


@needs_cuda
def test_cuda_network_matches_cpu():
    from hold_export.parity import network_inputs, torch_alpha

    cfg = net_preset("tiny", image_size=8, data_channels=1, order=3)
    tensors = random_checkpoint_tensors(cfg, seed=3)
    u, t = network_inputs(cfg, 4, seed=4)
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    try:
        gpu = torch_alpha(cfg, tensors, u, t, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    cpu = torch_alpha(cfg, tensors, u, t)
    assert np.abs(gpu - cpu).max() <= 1e-5 * np.abs(cpu).max()


@needs_cuda
def test_cuda_resume_continues_from_a_cpu_run(tmp_path, digits):
    _run(tmp_path / "run", digits, steps=2)
    trainer = TorchTrainer(TrainConfig(**{**TINY, "steps": 3, "device": "cuda", "amp": "bf16"}), tmp_path / "run",
                           dataset=digits)
    assert trainer.step == 2
    before = _state(tmp_path / "run")
    assert differing_tensors(before, trainer._backend_state()) == []
    for _ in trainer.run():
        pass
    assert read_config(tmp_path / "run" / STATE_FILE)["step"] == 3

#!/usr/bin/env python
"""Parity and throughput of the torch reference path, on CUDA (or the CPU, to show it works).

For each network preset (Fashion-MNIST and CIFAR-10 by default, HOLD order 3):
  - model FLOPs per image, counted analytically (hold_export.flops) and cross-checked against
    torch.utils.flop_counter (forward, and forward + backward for a training step);
  - parity: max |alpha_mlx - alpha_torch| / max |alpha_mlx| with random weights (fp32, TF32 off),
    when MLX is importable, and torch on the device vs torch on the CPU;
  - training images/s through the real TorchTrainer step (objective, Adam, clipping, EMA, loss
    read-back) for fp32 / bf16 / bf16 + channels_last / + torch.compile, peak GPU memory, and the
    achieved fraction of the GPU's dense bf16 peak (model FLOPs utilisation);
  - sampling images/s of the Lie-Trotter sampler at 100 steps (+1 denoising call), fp32 with
    portable noise (the cross-backend reproducible mode) and with native noise, and bf16.

    python tools/bench_cuda.py                         # CUDA, writes its section of docs/torch.md
    python tools/bench_cuda.py --device cpu --quick    # the CPU, small batches and few steps

Prints a markdown table and replaces the section for this device kind in docs/torch.md (give
--doc '' to leave the docs alone). Random weights: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hold_export.flops import TRAIN_FACTOR, counted_flops, forward_flops  # noqa: E402
from hold_export.parity import network_parity, random_checkpoint_config, random_checkpoint_tensors  # noqa: E402
from hold_export.torch_model import load_weights, resolve_device  # noqa: E402
from hold_export.torch_nets import build_net  # noqa: E402
from hold_export.torch_train import TorchTrainer  # noqa: E402
from hold_mlx.api import sample_full  # noqa: E402
from hold_mlx.backends import TorchBackend  # noqa: E402
from hold_mlx.data import Dataset  # noqa: E402
from hold_mlx.model import Model  # noqa: E402
from hold_mlx.netconfig import net_preset  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402
from hold_mlx.trainloop import TrainConfig  # noqa: E402

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor datasheets; the first
#: name contained in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0),
    ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("A6000", 155.0),
)

#: preset -> (image size, channels) of the dataset it is sized for
PRESETS = {"fashion-mnist": (28, 1), "cifar10": (32, 3), "digits": (8, 1), "tiny": (8, 1)}

SDE = "hold"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def rate(x: float) -> str:
    """Thousands separators for big rates, three significant digits for small ones."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_tf32():
    """Compare fp32 with fp32: cuDNN convolutions default to TF32 on Ampere and later."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def synthetic_images(size: int, channels: int, n: int = 4096) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset("synthetic", rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32), "image", 0.5, 0.5)


def bench_train(preset, data, device, batch, steps, warmup, amp, channels_last, compile_) -> tuple[float, float | None]:
    """(images/s, peak memory in GiB or None) of the real training step."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(dataset="synthetic", net=preset, sde=SDE, batch_size=batch, steps=10**9, warmup=0,
                          backend="torch", device=str(device), amp=amp, channels_last=channels_last,
                          compile=compile_, save_every=10**9)
        trainer = TorchTrainer(cfg, out, dataset=data)
        batches = [trainer.batch(i) for i in range(warmup + steps)]
        for b in batches[:warmup]:
            trainer._backend_step(b)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for b in batches[warmup:]:
            trainer._backend_step(b)  # reads the loss back: one sync per step, as in real training
        sync(device)
        elapsed = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps * batch / elapsed, memory


def bench_sample(cfg, sde, device, batch, steps, noise, amp_dtype, channels_last) -> float:
    """Images/s of the Lie-Trotter sampler with ``steps`` steps (+1 denoising call)."""
    config = random_checkpoint_config(cfg, sde)
    net = build_net(cfg)
    load_weights(net, random_checkpoint_tensors(cfg))
    net = net.to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    ops = TorchBackend(device, amp_dtype=amp_dtype)
    model = Model(ops, ops.network_fn(net), sde, config, net=net)
    shape = (batch, cfg.image_size, cfg.image_size, cfg.data_channels)
    sample_full(sde, model, shape, ops=ops, steps=2, noise=noise)  # warm-up (cuDNN autotune, allocator)
    sync(device)
    start = time.perf_counter()
    sample_full(sde, model, shape, ops=ops, steps=steps, noise=noise)
    sync(device)
    return batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--presets", default="fashion-mnist,cifar10", help="comma-separated network presets")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: cuda 128, cpu 8)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (cuda 30, cpu 2)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (cuda 256, cpu 8)")
    parser.add_argument("--sample-steps", type=int, default=None,
                        help="sampler steps timed (cuda 100; cpu 5, images/s then scaled to 100 steps)")
    parser.add_argument("--quick", action="store_true", help="fewer variants (CPU smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the dense bf16 peak")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "torch.md"),
                        help="markdown file whose section for this device kind is replaced ('' for none)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    batch = args.batch or (128 if cuda else 8)
    train_steps = args.train_steps or (30 if cuda else 2)
    sample_batch = args.sample_batch or (256 if cuda else 8)
    sample_steps = args.sample_steps or (100 if cuda else 5)
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    peak = peak_tflops(device_name, args.peak_tflops) if cuda else None
    try:
        import hold_mlx._mlx  # noqa: F401

        have_mlx = True
    except ImportError:
        have_mlx = False

    variants = [("fp32", "none", False, False), ("bf16", "bf16", False, False), ("bf16+cl", "bf16", True, False)]
    if cuda:
        variants.append(("bf16+cl+compile", "bf16", True, True))
    if args.quick:
        variants = variants[:2]
    sample_variants = [("fp32 portable", "portable", None, False), ("fp32 native", "native", None, False)]
    if cuda:
        sample_variants.append(("bf16+cl native", "native", torch.bfloat16, True))
    if args.quick:
        sample_variants = sample_variants[:1]

    sde = get_sde(SDE)
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    command = shlex.join(["python", "tools/bench_cuda.py", *(argv if argv is not None else sys.argv[1:])])
    emit(f"Measured {datetime.date.today().isoformat()} with `{command}`: {device_name}"
         f"{f' (dense bf16 peak {peak:g} TFLOP/s)' if peak else ''}, torch {torch.__version__}"
         f"{f', CUDA {torch.version.cuda}' if cuda else f', {torch.get_num_threads()} threads'}, SDE {SDE} (order "
         f"{sde.order}), training batch {batch}, {train_steps} timed steps, sampling batch {sample_batch}.")
    emit()
    emit("| preset | params | GFLOP/img fwd (analytic / counted) | train GFLOP/img (counted) | parity MLX | "
         "parity device/CPU |")
    emit("|---|---|---|---|---|---|")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    configs = {}
    for preset in presets:
        if preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        size, channels = PRESETS[preset]
        cfg = net_preset(preset, image_size=size, data_channels=channels, order=sde.order)
        analytic = sum(forward_flops(cfg).values())
        fwd, train = counted_flops(cfg)
        params = sum(p.numel() for p in build_net(cfg).parameters())
        with no_tf32():
            mlx = (f"{max(network_parity(cfg, batch_sizes=(2,), device=device).values()):.1e}" if have_mlx
                   else "n/a (no MLX)")
            if cuda:
                here = network_parity_torch(cfg, device)
        emit(f"| {preset} | {params / 1e6:.2f} M | {analytic / 1e9:.3f} / {fwd / 1e9:.3f} | {train / 1e9:.3f} "
             f"({train / fwd:.2f}x fwd; rule of thumb {TRAIN_FACTOR}x) | {mlx} | {f'{here:.1e}' if cuda else 'n/a'} |")
        configs[preset] = (cfg, train)

    emit()
    emit("| preset | training variant | images/s | peak memory | model TFLOP/s | of bf16 peak |")
    emit("|---|---|---|---|---|---|")
    for preset, (cfg, train_flops) in configs.items():
        data = synthetic_images(cfg.image_size, cfg.data_channels)
        for label, amp, channels_last, compile_ in variants:
            warmup = 3 if compile_ else 1
            images_per_s, memory = bench_train(preset, data, device, batch, train_steps, warmup, amp, channels_last,
                                               compile_)
            achieved = images_per_s * train_flops / 1e12
            memory_text = f"{memory:.2f} GiB" if memory is not None else "n/a"
            fraction = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
            emit(f"| {preset} | {label} | {rate(images_per_s)} | {memory_text} | {achieved:.3g} | {fraction} |")

    emit()
    scaled = "" if sample_steps == 100 else f" (timed over {sample_steps} steps, scaled to 100)"
    emit(f"| preset | sampling variant | images/s at 100 steps{scaled} |")
    emit("|---|---|---|")
    for preset, (cfg, _) in configs.items():
        for label, noise, amp_dtype, channels_last in sample_variants:
            images_per_s = bench_sample(cfg, sde, device, sample_batch, sample_steps, noise, amp_dtype, channels_last)
            images_per_s *= (sample_steps + 1) / 101  # 100 steps + 1 denoising call
            emit(f"| {preset} | {label} | {rate(images_per_s)} |")

    if args.doc:
        write_section(Path(args.doc), "cuda" if cuda else "cpu", "\n".join(lines))
        print(f"\nwrote the {'cuda' if cuda else 'cpu'} section of {args.doc}")
    return 0


def network_parity_torch(cfg, device) -> float:
    """max |alpha_device - alpha_cpu| / max |alpha_cpu|, fp32, random weights."""
    from hold_export.parity import network_inputs, torch_alpha

    tensors = random_checkpoint_tensors(cfg)
    u, t = network_inputs(cfg, 2)
    ref = torch_alpha(cfg, tensors, u, t)
    return float(np.abs(torch_alpha(cfg, tensors, u, t, device) - ref).max() / np.abs(ref).max())


def write_section(path: Path, kind: str, body: str) -> None:
    """Replace the text between <!-- bench_cuda:KIND --> and <!-- /bench_cuda:KIND --> (appended if absent)."""
    start, end = f"<!-- bench_cuda:{kind} -->", f"<!-- /bench_cuda:{kind} -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

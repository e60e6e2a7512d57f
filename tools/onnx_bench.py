"""onnxruntime vs torch eager on the CPU, ORT session options, and a fused sampler-step graph.

    PYTHONPATH=. python tools/onnx_bench.py --threads 2 --write-docs

Models have random weights (timing does not depend on them): the fashion-mnist U-Net preset on
28x28x1 HOLD (order 3) and the "mlp" preset on 2-D points. Prints markdown tables; with
--write-docs it replaces the measured block of docs/onnx.md (between the bench markers).

Measured:
  1. one score call (network + float64 score coefficients) per runtime and session option;
  2. a full Lie-Trotter sample through the shared sampler (portable noise, final denoising);
  3. the fused step: ONE graph for the whole Lie-Trotter step (exact linear flow E u + C z, the
     network, the score kick), coefficients computed in float64 by hold_mlx.sde and fed as inputs,
     against the plain network graph + the NumPy update of the shared sampler. The fused graph's
     samples are checked against the shared sampler's before it is timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hold_export.onnx_export import export_graph, export_onnx  # noqa: E402
from hold_export.onnx_runtime import make_session  # noqa: E402
from hold_export.torch_model import checkpoint_tensors  # noqa: E402
from hold_export.torch_nets import build_net  # noqa: E402
from hold_mlx.api import sample_full  # noqa: E402
from hold_mlx.backends import NumpyBackend  # noqa: E402
from hold_mlx.checkpoint import make_config, write_tensors  # noqa: E402
from hold_mlx.netconfig import net_preset  # noqa: E402
from hold_mlx.noise import PortableNoise  # noqa: E402
from hold_mlx.model import load  # noqa: E402
from hold_mlx.parameterisation import ScoreParameterisation  # noqa: E402
from hold_mlx.samplers import Context, denoise, prior_sample, time_grid  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402

DOCS = ROOT / "docs" / "onnx.md"
BEGIN, END = "<!-- onnx_bench:begin -->", "<!-- onnx_bench:end -->"

MODELS = {
    # name: (net preset, data shape, data config)
    "fashion-mnist U-Net": ("fashion-mnist", (28, 28, 1),
                            {"name": "fashion-mnist", "kind": "image", "shape": [28, 28, 1], "shift": 0.5, "scale": 0.5}),
    "mlp (2-D points)": ("mlp", (2,), {"name": "toy", "kind": "points", "shape": [2], "shift": [0.0, 0.0],
                                       "scale": [1.0, 1.0]}),
}


def plural(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}"


def timed(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median wall time in seconds of each fn(), runs interleaved (round-robin) so that a change in
    the machine's load hits every variant alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in fns}
    for _ in range(reps):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: float(np.median(ts)) for label, ts in times.items()}


def make_checkpoint(folder: Path, name: str) -> Path:
    preset, shape, data = MODELS[name]
    sde = get_sde("hold")
    overrides = {"data_channels": shape[-1], "order": sde.order}
    if len(shape) == 3:
        overrides["image_size"] = shape[0]
    cfg = net_preset(preset, **overrides)
    torch.manual_seed(0)
    net = build_net(cfg)
    with torch.no_grad():  # non-zero output layers, so the fused-step check compares real numbers
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = folder / f"{preset}.safetensors"
    write_tensors(path, checkpoint_tensors(net), make_config(sde, cfg, data))
    return path


# ----------------------------------------------------------------------------- fused step graph


class LieTrotterStep(torch.nn.Module):
    """One Lie-Trotter step as a graph: v = E u + C z (exact linear flow, blocks mixed by n x n
    matrices), then v_n += ka * alpha(v, t) + sum_j w_j v_j (the score kick, with a(t), b(t), the
    stationary precision row and dB sigma^2 folded into the per-sample inputs ka (B,) and w (B, n))."""

    def __init__(self, net: torch.nn.Module, order: int, image: bool):
        super().__init__()
        self.net, self.n, self.image = net, order, image

    def forward(self, u, z, t, E, C, ka, w):
        n = self.n
        blocks = u.reshape(*u.shape[:-1], n, u.shape[-1] // n)
        noise = z.reshape(blocks.shape)
        v = torch.einsum("ij,...jc->...ic", E, blocks) + torch.einsum("ij,...jc->...ic", C, noise)
        flat = v.reshape(u.shape)
        alpha = self.net(flat.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1) if self.image else self.net(flat, t)
        per_sample = (-1,) + (1,) * (alpha.ndim - 1)
        kick = ka.reshape(per_sample) * alpha + torch.einsum("bj,b...jc->b...c", w, v)
        return torch.cat([v[..., : n - 1, :], (v[..., n - 1, :] + kick).unsqueeze(-2)], dim=-2).reshape(u.shape)


class FusedSampler:
    """Lie-Trotter sampling with the fused step graph; the same noise stream as the shared sampler."""

    def __init__(self, ckpt: Path, threads: int):
        torch_model = load(ckpt, "torch")
        self.sde, self.config = torch_model.sde, torch_model.config
        image = self.config["net"]["kind"] == "unet"
        n = self.sde.order
        shape = tuple(self.config["data"]["shape"])
        self.state_shape = shape[:-1] + (n * shape[-1],)
        example = (torch.zeros(2, *self.state_shape), torch.zeros(2, *self.state_shape), torch.ones(2),
                   torch.eye(n), torch.eye(n), torch.ones(2), torch.ones(2, n))
        names = ["u", "z", "t", "E", "C", "ka", "w"]
        with torch.no_grad():
            model = export_graph(LieTrotterStep(torch_model.net, n, image).eval(), example, names, ["u_next"],
                                 batched=["u", "z", "t", "ka", "w"])
        self.step_session = make_session(model.SerializeToString(), threads=threads)
        self.parameterisation = ScoreParameterisation.from_config(self.sde, self.config)

    def inputs(self, u, z, t0: float, t1: float) -> dict:
        """The step graph's inputs; every coefficient in float64 from hold_mlx.sde, then float32."""
        sde, batch = self.sde, u.shape[0]
        E, C = sde.reverse_linear_step(t0, t1)
        k = float(sde.B(t0) - sde.B(t1)) * sde.sigma**2
        a, b = self.parameterisation.score_coefficients(np.array([t1]))
        w = k * sde.stationary_precision_last_row()
        w[-1] += k * b[0]
        f32 = np.float32
        return {"u": u, "z": z, "t": np.full(batch, t1, f32), "E": E.astype(f32), "C": C.astype(f32),
                "ka": np.full(batch, k * a[0], f32), "w": np.tile(w.astype(f32), (batch, 1))}

    def sample(self, score_fn, batch: int, steps: int, seed: int = 0) -> np.ndarray:
        ops = NumpyBackend()
        ctx = Context(self.sde, score_fn, ops, PortableNoise(seed, np.arange(batch)), batch)
        shape = (batch, *self.config["data"]["shape"])
        ts = time_grid(self.sde, steps)
        u = prior_sample(ctx, shape)
        for t0, t1 in zip(ts[:-1], ts[1:]):
            z = ctx.noise.normal(ops, self.state_shape)
            u = self.step_session.run(None, self.inputs(u, z, float(t0), float(t1)))[0]
        return ctx.split(denoise(ctx, u, float(ts[-1])))[0]


# ----------------------------------------------------------------------------- measurements


def bench_calls(name, ckpt, folder, threads, batches, reps):
    """Rows (runtime, options, ms per call at each batch)."""
    torch.set_num_threads(threads)
    torch_model = load(ckpt, "torch")
    sde, config = torch_model.sde, torch_model.config
    shape = tuple(config["data"]["shape"])
    state = shape[:-1] + (sde.order * shape[-1],)
    rng = np.random.default_rng(0)
    inputs = {b: (rng.standard_normal((b, *state)).astype(np.float32), np.full(b, 0.3, np.float32)) for b in batches}

    def torch_call(b):
        u, t = inputs[b]
        with torch.no_grad():
            torch_model(torch.from_numpy(u), torch.from_numpy(t))

    calls = [("torch eager", f"{plural(threads)}", torch_call)]  # (runtime, label, fn(batch))

    fp32 = folder / f"{name}.onnx"
    export_onnx(ckpt, fp32)
    variants = [(f"opt={level}, sequential, {plural(threads)}", fp32, dict(optimization=level, threads=threads))
                for level in ("disable", "basic", "extended", "all")]
    variants.append((f"opt=all, parallel executor, {plural(threads)}", fp32,
                     dict(optimization="all", threads=threads, sequential=False)))
    if threads > 1:
        variants.append(("opt=all, sequential, 1 thread", fp32, dict(optimization="all", threads=1)))
    fp16 = folder / f"{name}-fp16.onnx"
    export_onnx(ckpt, fp16, fp16=True)
    variants.append((f"fp16 graph, opt=all, {plural(threads)}", fp16, dict(optimization="all", threads=threads)))
    for label, path, options in variants:
        model = load(path, "onnx", **options)
        calls.append(("onnxruntime", label, lambda b, model=model: model(*inputs[b])))

    if config["net"]["kind"] == "unet":  # the layout choice: NCHW graph fed by NumPy transposes
        with torch.no_grad():
            u2, t2 = inputs[batches[0]][0][:1].repeat(2, 0).transpose(0, 3, 1, 2).copy(), np.full(2, 0.3, np.float32)
            nchw = export_graph(torch_model.net.eval(), (torch.from_numpy(u2), torch.from_numpy(t2)), ["u", "t"],
                                ["alpha"])
        session = make_session(nchw.SerializeToString(), threads=threads)

        def nchw_call(b):
            u, t = inputs[b]
            alpha = session.run(None, {"u": np.ascontiguousarray(u.transpose(0, 3, 1, 2)), "t": t})[0]
            return np.ascontiguousarray(alpha.transpose(0, 2, 3, 1))

        fp32_model = load(fp32, "onnx", threads=threads)
        calls.append(("onnxruntime", f"NCHW graph + NumPy transposes (alpha only), {plural(threads)}", nchw_call))
        calls.append(("onnxruntime", f"NHWC graph (shipped layout, alpha only), {plural(threads)}",
                      lambda b: fp32_model.alpha(*inputs[b])))
    per_batch = {b: timed({i: (lambda fn=fn, b=b: fn(b)) for i, (_, _, fn) in enumerate(calls)}, reps)
                 for b in batches}
    rows = [(runtime, label, {b: per_batch[b][i] for b in batches}) for i, (runtime, label, _) in enumerate(calls)]
    return rows, fp32


def bench_samples(ckpt, onnx_path, threads, batch, steps, reps):
    """Rows (path, seconds per full sample, ms per step) and the fused-vs-shared max difference."""
    torch_rt = load(ckpt, "torch", threads=threads)
    ort_rt = load(onnx_path, "onnx", threads=threads)

    def shared(rt):
        return lambda: sample_full(rt.sde, rt, (batch, *rt.data_shape), ops=rt.backend, steps=steps, seed=0)

    fused = FusedSampler(ckpt, threads)
    paths = {"torch eager, shared sampler": shared(torch_rt), "onnxruntime, shared sampler": shared(ort_rt),
             "onnxruntime, fused step graph": lambda: fused.sample(ort_rt, batch, steps)}
    rows = list(timed(paths, reps, warmup=0).items())
    reference = ort_rt.backend.to_numpy(shared(ort_rt)().x)
    diff = float(np.abs(fused.sample(ort_rt, batch, steps) - reference).max())

    # One step alone: plain graph + NumPy update (what the shared sampler does) vs the fused graph.
    rng = np.random.default_rng(1)
    u = rng.standard_normal((batch, *fused.state_shape)).astype(np.float32)
    z = rng.standard_normal(u.shape).astype(np.float32)
    t0, t1 = (float(t) for t in time_grid(fused.sde, steps)[:2])
    ctx = Context(fused.sde, ort_rt, ort_rt.backend, None, batch)
    E, C = fused.sde.reverse_linear_step(t0, t1)

    def plain_step():
        from hold_mlx.samplers import mix

        v = ctx.join([a + c for a, c in zip(mix(E, ctx.split(u)), mix(C, ctx.split(z)))])
        return ctx.kick(v, ctx.remainder(v, t1), t0, t1)

    noise = PortableNoise(0, np.arange(batch))
    step_ms = timed({"onnxruntime, shared sampler": plain_step,
                     "onnxruntime, fused step graph": lambda: fused.step_session.run(None, fused.inputs(u, z, t0, t1)),
                     "noise": lambda: noise.normal(ctx.ops, fused.state_shape)},
                    reps * 3)
    return rows, step_ms, diff


# ----------------------------------------------------------------------------- report


def render(args, results) -> str:
    lines = [f"Command: `PYTHONPATH=. python tools/onnx_bench.py --threads {args.threads} --steps {args.steps} "
             f"--batch {args.batch} --reps {args.reps}{' --write-docs' if args.write_docs else ''}`",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
             f"onnxruntime {__import__('onnxruntime').__version__}; {time.strftime('%Y-%m-%d')}. Median of "
             f"{args.reps} runs; ratios are from the same run. Random weights.", ""]
    for name, (call_rows, sample_rows, step_ms, diff, sample_batch) in results.items():
        batches = list(call_rows[0][2])
        base = call_rows[0][2][batches[-1]]
        lines += [f"**{name}: one score call (ms)**", "",
                  "| runtime | options | " + " | ".join(f"batch {b}" for b in batches) + f" | torch / this (batch {batches[-1]}) |",
                  "|---|---|" + "---:|" * (len(batches) + 1)]
        for runtime, label, ms in call_rows:
            cells = " | ".join(f"{ms[b] * 1e3:.2f}" for b in batches)
            lines.append(f"| {runtime} | {label} | {cells} | {base / ms[batches[-1]]:.2f}x |")
        torch_s = sample_rows[0][1]
        lines += ["", f"**{name}: full Lie-Trotter sample, batch {sample_batch}, {args.steps} steps + denoising "
                      f"({plural(args.threads)})**", "",
                  "| path | seconds per sample batch | ms per step (update + network) | torch / this |",
                  "|---|---:|---:|---:|"]
        for label, seconds in sample_rows:
            step = f"{step_ms[label] * 1e3:.2f}" if label in step_ms else "-"
            lines.append(f"| {label} | {seconds:.3f} | {step} | {torch_s / seconds:.2f}x |")
        lines += ["", f"Per step both paths also draw the portable noise: {step_ms['noise'] * 1e3:.2f} ms. "
                      f"Fused-step samples vs the shared sampler: max |difference| {diff:.1e}.", ""]
    return "\n".join(lines)


def write_docs(block: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else f"# ONNX\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{block}\n{END}", text, flags=re.S)
    DOCS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    parser.add_argument("--batch", type=int, default=16, help="batch of the full-sample runs")
    parser.add_argument("--steps", type=int, default=20, help="Lie-Trotter steps of the full-sample runs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--write-docs", action="store_true", help=f"replace the measured block of {DOCS}")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            ckpt = make_checkpoint(Path(tmp), name)
            batches = [1, args.batch] if MODELS[name][1][-1] == 1 else [1, args.batch, 1024]
            calls, onnx_path = bench_calls(name.split()[0], ckpt, Path(tmp), args.threads, batches, args.reps)
            batch = args.batch if len(MODELS[name][1]) == 3 else 1024
            sample_rows, step_ms, diff = bench_samples(ckpt, onnx_path, args.threads, batch, args.steps,
                                                       max(1, args.reps // 2))
            results[name] = (calls, sample_rows, step_ms, diff, batch)
            print(f"[done] {name}", file=sys.stderr)
    block = render(args, results)
    print(block)
    if args.write_docs:
        write_docs(block)


if __name__ == "__main__":
    main()

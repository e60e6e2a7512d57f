"""One benchmark of hold-mlx sampling and training on this machine: MLX vs torch eager vs onnxruntime.

    python tools/benchmark.py                         # full run, writes docs/benchmarks.md
    python tools/benchmark.py --quick                 # regression check, < 2 min: ratios only
    python tools/benchmark.py --quick --emulate-avx2  # the same with every library held to AVX2
    python tools/benchmark.py --cli                   # whole processes: `hold-mlx sample` per backend

``--quick`` keeps one worker process per backend alive and interleaves them: each round times
one full sample of the shipped model (``--steps``, batch ``--batch``) and one training step on
every backend in turn, rotating the order; it prints the medians and the MLX/torch and
MLX/onnxruntime ratios (below 1: MLX is faster). ``--emulate-avx2`` runs an AVX-512 machine as
an AVX2-only one would: hold-mlx's AVX2 kernels, OpenBLAS's Haswell kernels, oneDNN and torch's
own kernels capped at AVX2; onnxruntime's MLAS has no such switch and keeps AVX-512.
Every table starts with a stamp: CPU model, the vector instruction sets that matter, cores and
library versions.

Every figure of a table is measured in the same run, each backend in its own subprocess with
the same thread count (``--threads``, default: all cores of this process), warm-up calls
excluded, medians over ``--repeats``. The model is the shipped fashion-mnist checkpoint
(weights/fashion-mnist-hold) or, until it exists, the fashion-mnist network preset with seeded
random weights written to a temporary checkpoint. Rows:

* network-call latency at the sampling batch (the score function the sampler calls),
* full-sample throughput (images/s) with Lie-Trotter at each ``--steps``,
* the sampler's own overhead: a sample with a zero-cost score function / a sample with the network,
* the training step (images/s) of the MLX and torch trainers,
* peak memory of each backend's process,
* the FLOP floor: model FLOPs per image x NFE / the machine's measured matmul rate, and
  achieved/floor per backend.

MLX runs in several configurations (native kernels and fast CPU ops on/off, threads, BLAS) so the table shows what
each setting buys; on a Mac (Metal) the fast CPU ops are off by default and the same script runs
unchanged. The BLAS section times MLX with the BLAS bundled in the wheel against OpenBLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python tools/benchmark.py"

# (label, environment) of each MLX configuration. THREADS is replaced by --threads.
MLX_CONFIGS = [
    ("mlx", {}),
    ("mlx, no native kernels", {"HOLD_MLX_NATIVE": "0"}),
    ("mlx, 1 stream + BLAS threads", {"HOLD_MLX_THREADS": "1", "HOLD_MLX_BLAS_THREADS": "THREADS"}),
    ("mlx, stock ops", {"HOLD_MLX_FASTOPS": "0"}),
    ("mlx, stock ops, 32 MiB cache", {"HOLD_MLX_FASTOPS": "0", "HOLD_MLX_CACHE_MB": "0",
                                      "HOLD_MLX_THREADS": "1", "HOLD_MLX_BLAS_THREADS": "THREADS"}),
]


# Environment that makes an AVX-512 machine run like an AVX2-only one (--emulate-avx2). MLAS
# (onnxruntime) picks its kernels from CPUID with no override, so onnxruntime keeps AVX-512.
EMULATE_AVX2_ENV = {
    "HOLD_MLX_NATIVE_ISA": "avx2",  # hold-mlx's native kernels (hold_mlx/native.py)
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS (MLX's matmuls): its AVX2 kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN 3.x in torch (convolutions); DNNL_MAX_CPU_ISA is the old name
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (torch's matmuls)
}
EMULATE_AVX2_NOTE = ("**emulated AVX2**: an AVX-512 CPU with hold-mlx, OpenBLAS, oneDNN, ATen and MKL held to "
                     "AVX2 (" + ", ".join(f"{k}={v}" for k, v in EMULATE_AVX2_ENV.items())
                     + "); onnxruntime's MLAS cannot be limited and keeps AVX-512")

# The CPU flags that decide which kernels every library runs.
_ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "avx", "asimd", "sve")


# ----------------------------------------------------------------------------- helpers


def machine_stamp(threads: int | None = None) -> str:
    """One line naming the CPU, its vector instruction sets, the cores and the library versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in _ISA_FLAGS if f in flags] or ["(unknown)"]
    versions = [f"Python {platform.python_version()}"]
    for name in ("mlx", "torch", "onnxruntime", "numpy"):
        try:
            module = __import__(name + (".core" if name == "mlx" else ""), fromlist=["__version__"])
            versions.append(f"{name} {module.__version__}")
        except ImportError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (f"CPU: {model} ({platform.machine()}), ISA: {' '.join(isa)}; {cores} cores"
            + (f", {threads} thread{'s' if threads != 1 else ''} per backend" if threads else "") + "; " + ", ".join(versions) + ".")
    if os.environ.get("HOLD_MLX_NATIVE_ISA") == EMULATE_AVX2_ENV["HOLD_MLX_NATIVE_ISA"] and \
            os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2":
        line += " " + EMULATE_AVX2_NOTE + "."
    return line


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 if sys.platform != "darwin" else 2**20)


def write_random_checkpoint(path: Path) -> None:
    """The fashion-mnist preset with seeded random weights (every layer non-zero)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from hold_mlx._mlx import mx
    from hold_mlx.checkpoint import make_config
    from hold_mlx.model import save_model
    from hold_mlx.nets import build_net
    from hold_mlx.netconfig import net_preset
    from hold_mlx.sde import get_sde

    mx.random.seed(0)
    cfg = net_preset("fashion-mnist")
    net = build_net(cfg)
    params = [(k, v if k.endswith("time_features.W") else v + 0.02 * mx.random.normal(v.shape))
              for k, v in tree_flatten(net.parameters())]
    net.update(tree_unflatten(params))
    data = {"name": "fashion-mnist", "kind": "image", "shape": [28, 28, 1], "shift": 0.5, "scale": 0.5}
    save_model(path, net, make_config(get_sde("hold"), cfg, data, extra={"note": "random weights (benchmark)"}))


def model_flops_per_image(checkpoint) -> float:
    """Multiply-adds x 2 of one network call per image: convolutions, linear layers, attention."""
    from hold_mlx._mlx import mx, nn
    from hold_mlx import nets
    from hold_mlx.model import load

    model = load(checkpoint)
    config = model.config
    total = [0.0]
    conv_call, linear_call, attn_call = nn.Conv2d.__call__, nn.Linear.__call__, nets.Attention.__call__

    def conv(self, x):
        y = conv_call(self, x)
        o, kh, kw, c = self.weight.shape
        total[0] += 2.0 * y.shape[1] * y.shape[2] * o * kh * kw * c
        return y

    def linear(self, x):
        total[0] += 2.0 * x.size * self.weight.shape[0]
        return linear_call(self, x)

    def attention(self, x, emb=None):
        _, h, w, c = x.shape
        total[0] += 2.0 * 2.0 * (h * w) ** 2 * c  # q k^T and weights v
        return attn_call(self, x, emb)

    nn.Conv2d.__call__, nn.Linear.__call__, nets.Attention.__call__ = conv, linear, attention
    saved = os.environ.get("HOLD_MLX_FASTOPS")
    os.environ["HOLD_MLX_FASTOPS"] = "0"  # the stock layers, whose calls the patches see
    try:
        shape = tuple(config["data"]["shape"])
        u = mx.zeros((1,) + shape[:-1] + (model.sde.order * shape[-1],))
        mx.eval(model.net(u, mx.array([0.5])))
    finally:
        nn.Conv2d.__call__, nn.Linear.__call__, nets.Attention.__call__ = conv_call, linear_call, attn_call
        if saved is None:
            os.environ.pop("HOLD_MLX_FASTOPS")
        else:
            os.environ["HOLD_MLX_FASTOPS"] = saved
    return total[0]


# ----------------------------------------------------------------------------- workers


def _zero_score(ops, channels):
    def score(u, t):
        return 0.0 * u[..., -channels:]
    return score


def _onnx_file(checkpoint: Path, workdir: Path) -> tuple[Path, str]:
    """An .onnx of the checkpoint: the shared exporter when it is there, else a plain export.

    TEMPORARY fallback (marked for the lead): once export/onnx_export.py has landed, the first
    branch always runs and the second can go.
    """
    out = workdir / "model.onnx"
    try:
        from hold_export.onnx_export import export_onnx

        export_onnx(checkpoint, out)
        return out, "hold_export.onnx_export"
    except ImportError:
        pass
    import torch

    from hold_mlx.model import load

    model = load(checkpoint, "torch")

    class ChannelsLast(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, u, t):
            return self.net(u.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1)

    example = (torch.randn(2, 28, 28, 3), torch.full((2,), 0.5))
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(ChannelsLast(model.net).eval(), example, str(out), input_names=["u", "t"],
                      output_names=["alpha"], dynamo=True, dynamic_shapes={"u": {0: batch}, "t": {0: batch}})
    return out, "torch.onnx.export (benchmark fallback)"


class _OnnxNetwork:
    """alpha(u, t) from a bare alpha-graph .onnx (the fallback export), NumPy in and out."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, u, t):
        return self.session.run(None, {"u": np.ascontiguousarray(u, np.float32), "t": np.asarray(t, np.float32)})[0]


def load_backend(kind: str, checkpoint: Path, threads: int, workdir: Path):
    """(model, how the .onnx was made); MLX takes its threads from HOLD_MLX_THREADS (run_worker)."""
    from hold_mlx.model import Model, load

    if kind != "onnx":
        return load(checkpoint, kind, threads=None if kind == "mlx" else threads), ""
    onnx_path, how = _onnx_file(checkpoint, workdir)
    try:
        return load(onnx_path, "onnx", threads=threads), how
    except Exception:  # the fallback file carries no hold-mlx metadata
        from hold_mlx.backends import OnnxBackend
        from hold_mlx.checkpoint import read_tensors, sde_from_config

        _, config = read_tensors(checkpoint)
        return Model(OnnxBackend(), _OnnxNetwork(onnx_path, threads), sde_from_config(config), config), how


def train_step_time(kind: str, batch: int, repeats: int) -> float:
    """Median seconds of one optimisation step of the backend's trainer (random images)."""
    return median_time(train_step_runner(kind, batch), repeats, warmup=2)


def worker(args) -> dict:
    threads = args.threads
    kind = args.worker
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
    from hold_mlx.api import sample_full

    result = {"backend": kind}
    with tempfile.TemporaryDirectory() as tmp:
        rt, how = load_backend(kind, Path(args.checkpoint), threads, Path(tmp))
        if kind == "mlx":  # after load: it configures the MLX backend
            from hold_mlx import _mlx, fastops, native

            result.update(blas=_mlx.BLAS, blas_threads=_mlx.BLAS_THREADS, streams=len(_mlx.cpu_streams()),
                          fastops=fastops.enabled(), native=fastops.enabled() and native.status().available,
                          device=str(_mlx.mx.default_device()))
        if how:
            result["exporter"] = how
        ops, shape = rt.backend, (args.batch,) + rt.data_shape
        n = rt.sde.order
        rng = np.random.default_rng(1)
        u = ops.asarray(rng.standard_normal(shape[:-1] + (n * shape[-1],)).astype(np.float32))
        t = ops.asarray(np.linspace(0.1, 1.0, args.batch))

        def call():
            ops.eval(out := rt(u, t))
            ops.to_numpy(out[:1])  # make sure the work is done (lazy MLX, async torch)

        result["latency_s"] = median_time(call, args.repeats, warmup=2)
        result["sample_s"], result["nfe"] = {}, {}
        for steps in args.steps:
            def sample(score=rt, steps=steps):
                r = sample_full(rt.sde, score, shape, ops=ops, steps=steps, seed=0)
                ops.to_numpy(r.x)
                return r.nfe
            result["nfe"][steps] = sample()
            result["sample_s"][steps] = median_time(sample, args.sample_repeats, warmup=0)
        zero = _zero_score(ops, shape[-1])
        steps = max(args.steps)
        result["zero_sample_s"] = median_time(
            lambda: ops.to_numpy(sample_full(rt.sde, zero, shape, ops=ops, steps=steps, seed=0).x),
            args.sample_repeats, warmup=1)
        if kind in ("mlx", "torch") and not args.no_train:
            result["train_step_s"] = train_step_time(kind, args.batch, max(2, args.repeats))
        if kind == "mlx":
            result["mlx_peak_mb"] = _mlx.mx.get_peak_memory() / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def rate_worker(args) -> dict:
    """The machine's matmul rate (GFLOP/s, float32 2048^3) through torch and through MLX."""
    import torch

    torch.set_num_threads(args.threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t_torch = median_time(lambda: a @ b, 5, warmup=2)
    from hold_mlx._mlx import mx, set_blas_threads

    set_blas_threads(args.threads)
    x, y = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
    t_mlx = median_time(lambda: mx.eval(x @ y), 5, warmup=2)
    flop = 2.0 * 2048**3
    return {"torch_gflops": flop / t_torch / 1e9, "mlx_gflops": flop / t_mlx / 1e9}


def blas_worker(args) -> dict:
    """MLX with whatever BLAS this process got: matmul, one 3x3 conv, one network call (batch 8)."""
    from hold_mlx._mlx import BLAS, mx, set_blas_threads
    from hold_mlx.model import load

    model = load(args.checkpoint)
    set_blas_threads(args.threads)  # after load, which configures MLX from the environment
    x, y = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
    out = {"blas": BLAS, "matmul_gflops": 2.0 * 1024**3 / median_time(lambda: mx.eval(x @ y), 3) / 1e9}
    img, w = mx.random.normal((8, 28, 28, 64)), mx.random.normal((64, 3, 3, 64))
    out["conv_s"] = median_time(lambda: mx.eval(mx.conv2d(img, w, padding=1)), 3)
    u, t = mx.random.normal((8, 28, 28, 3)), mx.full((8,), 0.5)
    out["net_s"] = median_time(lambda: mx.eval(model(u, t)), 3)
    return out


def quick_worker(args) -> None:
    """A persistent worker for --quick: sets up its backend, says "ready", then answers each
    "sample" / "train" line on stdin with the seconds that one run took."""
    kind = args.worker.removeprefix("quick-")
    if kind == "torch":
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_backend(kind, Path(args.checkpoint), args.threads, Path(tmp))

        def sample():
            model.sample(args.batch, steps=max(args.steps), seed=0, batch_size=args.batch)

        train = None
        if kind in ("mlx", "torch") and not args.no_train:
            train = train_step_runner(kind, args.batch)
        sample()  # warm-up: compiled graphs, caches, the native build
        if train:
            train()
            train()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            what = line.strip()
            fn = {"sample": sample, "train": train}.get(what)
            if fn is None:
                print(json.dumps({"error": f"cannot {what}"}), flush=True)
                continue
            start = time.perf_counter()
            fn()
            print(json.dumps({"s": time.perf_counter() - start}), flush=True)


def train_step_runner(kind: str, batch: int):
    """one() runs one optimisation step of the backend's trainer on random images; the trainer's
    temporary run folder lives as long as the process."""
    from hold_mlx.data import Dataset
    from hold_mlx.trainloop import TrainConfig

    rng = np.random.default_rng(0)
    data = Dataset("fashion-mnist", rng.uniform(-1, 1, (512, 28, 28, 1)).astype(np.float32), "image", 0.5, 0.5)
    cfg = TrainConfig(dataset="fashion-mnist", net="fashion-mnist", sde="hold", batch_size=batch, warmup=10,
                      backend=kind, save_every=10**6)
    out = tempfile.TemporaryDirectory(prefix="hold-bench-")
    if kind == "mlx":
        from hold_mlx.train import Trainer
    else:
        from hold_export.torch_train import TorchTrainer as Trainer
    trainer = Trainer(cfg, out.name, dataset=data)
    step = [0]

    def one():
        trainer._backend_step(trainer.batch(step[0]))
        step[0] += 1

    one.run_folder = out  # removed when the runner goes
    return one


QUICK_BACKENDS = (("MLX", "mlx"), ("torch", "torch"), ("onnxruntime", "onnx"))


def ratio_table(rows) -> list[str]:
    """Markdown rows of (what, MLX, torch, onnxruntime) medians in seconds, with MLX / other ratios."""
    lines = ["| | MLX | torch eager | onnxruntime | MLX / torch | MLX / onnxruntime |", "|---|---|---|---|---|---|"]
    for what, m, t, o in rows:
        lines.append(f"| {what} | {fmt(m)} | {fmt(t)} | {fmt(o)} | "
                     f"{f'{m / t:.2f}' if m and t else '–'} | {f'{m / o:.2f}' if m and o else '–'} |")
    return lines


def cli_rounds(args) -> str:
    """Interleaved whole-process runs of ``hold-mlx sample`` (start-up, model load, any export or
    native build already cached, sampling, the PNG); the order rotates every round."""
    import shutil

    exe = shutil.which("hold-mlx")
    base = [exe] if exe else [sys.executable, "-m", "hold_mlx"]
    env = dict(os.environ, HOLD_MLX_THREADS=str(args.threads))
    sample = ["sample", "--steps", str(max(args.steps)), "--n", str(args.batch), "--threads", str(args.threads)]
    kinds = list(QUICK_BACKENDS)
    times: dict = {label: [] for label, _ in kinds}
    with tempfile.TemporaryDirectory() as out:
        # onnxruntime runs an exported graph (untimed, as a user exports once)
        subprocess.run(base + ["export", "--checkpoint", str(args.checkpoint), "--out", f"{out}/model.onnx"], env=env,
                       check=True, capture_output=True)
        source = {"mlx": str(args.checkpoint), "torch": str(args.checkpoint), "onnx": f"{out}/model.onnx"}

        def run(kind):
            subprocess.run(base + sample + ["--backend", kind, "--checkpoint", source[kind], "--out",
                                            f"{out}/{kind}.png"], env=env, check=True, capture_output=True)
        for label, kind in kinds:  # warm-up: the native build and the OS file cache
            run(kind)
        for r in range(args.rounds):
            for label, kind in kinds[r % 3:] + kinds[:r % 3]:
                start = time.perf_counter()
                run(kind)
                times[label].append(time.perf_counter() - start)
                print(f"round {r + 1}: {label} {times[label][-1]:.2f} s", file=sys.stderr, flush=True)
    med = {label: float(np.median(v)) for label, v in times.items()}
    return "\n".join([
        machine_stamp(args.threads),
        f"`{COMMAND} --cli --rounds {args.rounds}`: whole processes, `hold-mlx {shlex.join(sample)} --backend B` "
        f"(the shipped model, its default sampler and guidance), medians of {args.rounds} interleaved rounds after "
        "one untimed warm-up run per backend. Ratios are MLX time / other time.", "",
        *ratio_table([("`hold-mlx sample` (s)", med["MLX"], med["torch"], med["onnxruntime"])])])


def quick(args) -> str:
    """Interleaved rounds over persistent workers (see the module docstring); returns the report."""
    env = dict(os.environ)
    env["HOLD_MLX_THREADS"] = str(args.threads)
    env["HOLD_MLX_BLAS_THREADS"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    workers = {}
    print("starting the workers (set-up and warm-up are not timed) ...", file=sys.stderr, flush=True)
    for label, kind in QUICK_BACKENDS:  # all at once: their set-up overlaps
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"quick-{kind}", "--checkpoint",
               str(args.checkpoint), "--threads", str(args.threads), "--batch", str(args.batch),
               "--steps", *map(str, args.steps)] + (["--no-train"] if args.no_train else [])
        workers[label] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for label, proc in workers.items():
        if not proc.stdout.readline():
            proc.wait()
            workers[label] = None
            print(f"{label}: failed to start (exit {proc.returncode})", file=sys.stderr, flush=True)

    def ask(proc, what):
        proc.stdin.write(what + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline()).get("s")

    times = {label: {"sample": [], "train": []} for label in workers}
    order = [label for label in workers if workers[label] is not None]
    for r in range(args.rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]  # nobody always goes first
        for label in rotated:
            times[label]["sample"].append(ask(workers[label], "sample"))
            if label != "onnxruntime" and not args.no_train:
                times[label]["train"].append(ask(workers[label], "train"))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for proc in workers.values():
        if proc is not None:
            proc.stdin.close()
            proc.wait()

    def med(label, what):
        values = [v for v in times.get(label, {}).get(what, []) if v is not None]
        return float(np.median(values)) if values else None

    steps = max(args.steps)
    lines = [machine_stamp(args.threads),
             f"`{COMMAND} --quick`: medians of {args.rounds} interleaved rounds; one sample = {args.batch} images, "
             f"{steps} Lie-Trotter steps of the shipped model, in-process (no start-up); one training step = "
             f"batch {args.batch}. Ratios are MLX time / other time: at most 1.00 means MLX is at least as fast.", ""]
    lines += ratio_table([(unit, med("MLX", what), med("torch", what), med("onnxruntime", what))
                          for what, unit in (("sample", "sample (s)"), ("train", "train step (s)"))])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def run_worker(args, name: str, env_extra: dict) -> dict:
    env = dict(os.environ)
    env["HOLD_MLX_THREADS"] = str(args.threads)  # MLX: one CPU stream per thread, one BLAS thread
    env["HOLD_MLX_BLAS_THREADS"] = "1"  # per call (configs may override both)
    env.update({k: v.replace("THREADS", str(args.threads)) for k, v in env_extra.items()})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--checkpoint", str(args.checkpoint),
           "--threads", str(args.threads), "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--sample-repeats", str(args.sample_repeats), "--steps", *map(str, args.steps)]
    if args.no_train:
        cmd.append("--no-train")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}g}"


def report(args, rows: list[tuple[str, dict]], rate: dict, flops: float, blas_rows: list[dict], model_note: str) -> str:
    floor_rate = max(rate.get("torch_gflops", 0.0), rate.get("mlx_gflops", 0.0)) * 1e9
    base = dict(rows).get("torch eager", {})
    lines = [machine_stamp(args.threads),
             f"Model: {model_note}; {flops / 1e9:.3f} GFLOP per image per network call. "
             f"Matmul rate (float32 2048^3): torch {fmt(rate.get('torch_gflops'))} GFLOP/s, "
             f"MLX {fmt(rate.get('mlx_gflops'))} GFLOP/s; the floor uses the larger.", ""]
    steps = args.steps
    head = ["backend", f"net call B={args.batch} (ms)", "net call / floor"]
    head += [f"img/s @{s} steps" for s in steps] + [f"vs torch @{max(steps)}", "sample / floor",
                                                   "sampler overhead", "train img/s", "train / floor", "peak RSS (MB)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        lat = r["latency_s"]
        floor_call = flops * args.batch / floor_rate
        smax = max(steps)
        ips = {s: args.batch / r["sample_s"][str(s)] for s in steps}
        sample_floor = flops * args.batch * r["nfe"][str(smax)] / floor_rate
        vs = (base["sample_s"][str(smax)] / r["sample_s"][str(smax)]) if base and "sample_s" in base else None
        train = args.batch / r["train_step_s"] if "train_step_s" in r else None
        train_floor = (r["train_step_s"] / (3 * flops * args.batch / floor_rate)) if train else None
        cells = [label, fmt(lat * 1e3), f"{lat / floor_call:.2f}x"] + [fmt(ips[s]) for s in steps]
        cells += [f"{vs:.2f}x" if vs else "–", f"{r['sample_s'][str(smax)] / sample_floor:.2f}x",
                  f"{100 * r['zero_sample_s'] / r['sample_s'][str(smax)]:.1f}%",
                  fmt(train), f"{train_floor:.2f}x" if train_floor else "–", fmt(r["peak_rss_mb"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Configurations: " + "; ".join(
        f"**{label}**: " + (", ".join(f"{k}={v}" for k, v in r.items()
                                      if k in ("blas", "blas_threads", "streams", "fastops", "native", "device",
                                               "exporter"))
                            or "defaults") for label, r in rows if "error" not in r) + "."]
    if blas_rows:
        lines += ["", "MLX with the BLAS bundled in the `mlx[cpu]` wheel vs OpenBLAS preloaded by hold_mlx "
                      "(1024^2 matmul, 3x3 conv B=8 28x28 64->64, network call B=8):", "",
                  "| BLAS | matmul GFLOP/s | conv (ms) | net call B=8 (ms) |", "|---|---|---|---|"]
        for r in blas_rows:
            if "error" in r:
                lines.append(f"| error: {r['error']} | | | |")
            else:
                lines.append(f"| {r['blas']} | {fmt(r['matmul_gflops'])} | {fmt(r['conv_s'] * 1e3)} | "
                             f"{fmt(r['net_s'] * 1e3)} |")
    return "\n".join(lines)


DOC_HEAD = """# Benchmarks

One section per kind of CPU (its model and widest vector instruction set), each written by
`python tools/benchmark.py` on such a machine: a run replaces its own CPU's section and keeps the
others. Rerun it on a quiet machine for figures you quote (other processes on the cores change
every number). Column meanings: *net call* is one call of the score function at the sampling batch;
*/ floor* divides a time by the FLOP floor (model FLOPs x images (x NFE) / the measured matmul
rate; training counts 3x the forward FLOPs); *sampler overhead* is the time of a sample with a
zero-cost score function as a fraction of the real sample (the same steps, noise and adapter);
*peak RSS* is the backend process's peak resident memory. Notes on why each backend stands
where it does: docs/performance.md.

"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model to time (default: weights/fashion-mnist-hold, else random weights)")
    p.add_argument("--threads", type=int, default=None, help="threads per backend (default: all cores)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    p.add_argument("--repeats", type=int, default=5, help="repeats of the latency and train-step timings")
    p.add_argument("--sample-repeats", type=int, default=1, help="repeats of each full sample")
    p.add_argument("--backends", nargs="+", default=None,
                   help="labels to run (default: all: " + ", ".join([c[0] for c in MLX_CONFIGS] + ["torch eager", "onnxruntime"]) + ")")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-blas", action="store_true", help="skip the bundled-BLAS comparison")
    p.add_argument("--quick", action="store_true",
                   help="regression check in under two minutes: interleaved rounds, MLX/torch/onnxruntime ratios "
                        "for sampling and training (default --steps 10, --rounds 3; never writes docs)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --quick and --cli")
    p.add_argument("--cli", action="store_true",
                   help="whole processes as a user runs them: `hold-mlx sample --steps S --n N --backend B` for "
                        "mlx, torch and onnx in turn, --rounds rounds, medians (default --steps 50 --batch 64)")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="run every library as on an AVX2-only CPU (onnxruntime excepted; see the docstring)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.worker and args.worker.startswith("quick-"):
        quick_worker(args)
        return
    if args.worker:
        fn = {"rate": rate_worker, "blas": blas_worker}.get(args.worker, worker)
        print(json.dumps(fn(args)))
        return
    if args.emulate_avx2:
        os.environ.update(EMULATE_AVX2_ENV)  # inherited by every worker
    if args.quick and "--steps" not in (argv if argv is not None else sys.argv):
        args.steps = [10]
    if args.cli and "--steps" not in (argv if argv is not None else sys.argv):
        args.steps = [50]
    sys.path.insert(0, str(ROOT))
    shipped = ROOT / "weights" / "fashion-mnist-hold"
    tmp = tempfile.TemporaryDirectory()
    if args.checkpoint:
        model_note = str(args.checkpoint)
    elif shipped.exists():
        args.checkpoint, model_note = shipped, "shipped weights/fashion-mnist-hold"
    else:
        args.checkpoint = Path(tmp.name) / "random.safetensors"
        model_note = "fashion-mnist preset, random weights (weights/fashion-mnist-hold not shipped yet)"
        write_random_checkpoint(args.checkpoint)
    if args.quick:
        print(quick(args))
        tmp.cleanup()
        return
    if args.cli:
        print(cli_rounds(args))
        tmp.cleanup()
        return
    flops = model_flops_per_image(args.checkpoint)
    configs = MLX_CONFIGS + [("torch eager", {}), ("onnxruntime", {})]
    if args.backends:
        configs = [c for c in configs if c[0] in args.backends]
    rate = run_worker(args, "rate", {})
    rows = []
    for label, env in configs:
        kind = "torch" if label.startswith("torch") else "onnx" if label.startswith("onnx") else "mlx"
        print(f"timing {label} ...", file=sys.stderr, flush=True)
        rows.append((label, run_worker(args, kind, env)))
        print(json.dumps(rows[-1][1]), file=sys.stderr, flush=True)
    blas_rows = []
    if not args.no_blas and sys.platform != "darwin":
        print("timing MLX with the bundled BLAS ...", file=sys.stderr, flush=True)
        blas_rows = [run_worker(args, "blas", {"HOLD_MLX_BLAS": "none"}), run_worker(args, "blas", {})]
    table = report(args, rows, rate, flops, blas_rows, model_note)
    print(table)
    if not args.no_docs:
        command = COMMAND + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
        section = f"Measured by `{command}` ({time.strftime('%Y-%m-%d')}).\n\n{table}\n"
        write_doc_section(ROOT / "docs" / "benchmarks.md", cpu_kind(), section)
    tmp.cleanup()


def cpu_kind() -> str:
    """The heading of this CPU's section in benchmarks.md: model and widest vector unit."""
    stamp = machine_stamp()
    model = stamp.split("CPU: ", 1)[1].split(", ISA:", 1)[0]
    flags = stamp.split("ISA: ", 1)[1].split(";", 1)[0].split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "baseline"
    if "emulated AVX2" in stamp:
        isa = "AVX2, emulated on an AVX-512 CPU"
    return f"{model}, {isa}"


def write_doc_section(path: Path, kind: str, body: str) -> None:
    """Replace (or append) the `## kind` section of the benchmarks page, keeping the others."""
    text = path.read_text() if path.exists() else ""
    head, _, rest = text.partition("\n## ")
    if not head.startswith("# Benchmarks"):
        head, rest = "", ""
    sections = [sec for sec in ("## " + rest).split("\n## ") if rest] if rest else []
    sections = ["## " + sec.removeprefix("## ") for sec in sections]
    sections = [sec for sec in sections if sec.splitlines()[0] != f"## {kind}"] + [f"## {kind}\n\n{body}"]
    path.parent.mkdir(exist_ok=True)
    path.write_text(DOC_HEAD.rstrip() + "\n\n" + "\n".join(sec.rstrip() + "\n" for sec in sections))


if __name__ == "__main__":
    main()

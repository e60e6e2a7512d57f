"""Per-layer CPU timings of the shipped U-Net's hot layers: MLX stock vs hold-mlx's MLX-ops
fast path vs the native kernels vs torch eager, one thread, in one run.

    python tools/bench_layers.py              # batch 64, 7 repeats (docs/performance.md)
    python tools/bench_layers.py --batch 8 --repeats 3
    python tools/bench_layers.py --emulate-avx2   # every library held to AVX2 (tools/benchmark.py)
    python tools/bench_layers.py --plan --batch 32  # every layer of the shipped network, by kind

Prints a markdown table of median milliseconds (forward; then forward + backward for the
convolutions) and GFLOP/s of the native convolution. One thread everywhere: MLX on a single
stream with one BLAS thread, torch.set_num_threads(1), channels-last tensors for torch.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HOLD_MLX_THREADS", "1")
os.environ.setdefault("HOLD_MLX_BLAS_THREADS", "1")

from benchmark import EMULATE_AVX2_ENV, machine_stamp, median_time, model_flops_per_image  # noqa: E402

if "--emulate-avx2" in sys.argv:  # before MLX, OpenBLAS and torch load: they read it once
    os.environ.update(EMULATE_AVX2_ENV)

from hold_mlx import fastops  # noqa: E402
from hold_mlx._mlx import configure_cpu, mx, nn  # noqa: E402

CONVS = [(28, 32, 32), (28, 64, 64), (28, 96, 32), (14, 64, 64), (14, 128, 64), (7, 64, 64)]  # (size, C, O)
NORMS = [(28, 32), (28, 96), (14, 128)]  # (size, C), 8 groups, + SiLU


def median_ms(fn, repeats: int) -> float:
    return median_time(fn, repeats, warmup=2) * 1e3


def mlx_timer(layer, *args, grad: bool = False):
    step = layer
    mx.eval(*args)
    if grad:
        probe = mx.random.normal(layer(*args).shape)
        mx.eval(probe)  # evaluated: a lazy array captured by mx.compile is recomputed on every call
        step = mx.value_and_grad(lambda *a: (layer(*a) * probe).sum(), argnums=tuple(range(len(args))))
    step = mx.compile(step)
    return lambda: mx.eval(step(*args))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--emulate-avx2", action="store_true", help="hold every library to AVX2 (onnxruntime excepted)")
    p.add_argument("--plan", action="store_true",
                   help="instead: every body layer of the shipped network (its own shapes, the sampler's forward "
                        "path), MLX (as the sampler runs it) vs torch, summed by layer kind")
    p.add_argument("--grad", action="store_true", help="with --plan: forward + backward (what training runs)")
    args = p.parse_args()
    configure_cpu()  # one stream, one BLAS thread (the environment above)
    import torch

    torch.set_num_threads(1)
    native = fastops._native()
    if native is None:
        from hold_mlx import native as native_module

        raise SystemExit(f"the native kernels are unavailable: {native_module.status().detail}")
    b, r = args.batch, args.repeats
    if args.plan:
        print(machine_stamp() + f" Native kernels: {native.isa}.\n")
        print(f"Batch {b}, one thread, {'forward + backward' if args.grad else 'forward'}, median ms over {r} rounds "
              f"(python tools/bench_layers.py --plan{' --grad' if args.grad else ''} --batch {b} --repeats {r}"
              f"{' --emulate-avx2' if args.emulate_avx2 else ''}):\n")
        print("\n".join(plan_rows(b, r, args.grad)))
        return

    def mlx_paths(native_on: bool):
        fastops._native = (lambda: native) if native_on else (lambda: None)

    rows = ["| layer | MLX stock | MLX ops (fast) | native | torch | native GFLOP/s |", "|---|---|---|---|---|---|"]
    for grad in (False, True):
        for size, c, o in CONVS:
            x, w, bias = mx.random.normal((b, size, size, c)), 0.1 * mx.random.normal((o, 3, 3, c)), mx.zeros((o,))
            stock = median_ms(mlx_timer(lambda x, w, bias: mx.conv2d(x, w, padding=1) + bias, x, w, bias, grad=grad), r)
            times = []
            for native_on in (False, True):
                mlx_paths(native_on)
                times.append(median_ms(mlx_timer(fastops.conv3x3, x, w, bias, grad=grad), r))
            conv = torch.nn.Conv2d(c, o, 3, padding=1).to(memory_format=torch.channels_last)
            tx = torch.randn(b, c, size, size).to(memory_format=torch.channels_last).requires_grad_(grad)
            if grad:
                def torch_step():
                    conv.zero_grad()
                    conv(tx).sum().backward()
            else:
                def torch_step():
                    with torch.inference_mode():
                        conv(tx)
            t_torch = median_ms(torch_step, r)
            flop = 2 * b * size * size * c * o * 9 * (3 if grad else 1)
            name = f"conv {size}², {c}→{o}" + (" fwd+bwd" if grad else "")
            rows.append(f"| {name} | {stock:.1f} | {times[0]:.1f} | {times[1]:.1f} | {t_torch:.1f} | "
                        f"{flop / times[1] / 1e6:.0f} |")
    for size, c in NORMS:
        x, g, beta = mx.random.normal((b, size, size, c)), mx.random.normal((c,)), mx.random.normal((c,))
        layer = nn.GroupNorm(8, c, pytorch_compatible=True)
        stock = median_ms(mlx_timer(lambda x: nn.silu(layer(x)), x), r)
        times = []
        for native_on in (False, True):
            mlx_paths(native_on)
            times.append(median_ms(mlx_timer(lambda x, g, beta: fastops.group_norm(x, g, beta, 8, 1e-6, act=True),
                                             x, g, beta), r))
        norm = torch.nn.GroupNorm(8, c)
        tx = torch.randn(b, c, size, size).to(memory_format=torch.channels_last)

        def torch_norm():
            with torch.inference_mode():
                torch.nn.functional.silu(norm(tx))
        rows.append(f"| GroupNorm+SiLU {size}², {c} | {stock:.1f} | {times[0]:.1f} | {times[1]:.1f} | "
                    f"{median_ms(torch_norm, r):.1f} | – |")
    rows += stride2_rows(b, r)
    rows += whole_network_rows(b, r, native, mlx_paths)
    flag = " --emulate-avx2" if args.emulate_avx2 else ""
    print(machine_stamp() + f" Native kernels: {native.isa}.\n")
    print(f"Batch {b}, one thread, median ms of {r} (python tools/bench_layers.py --batch {b} --repeats {r}{flag}):\n")
    print("\n".join(rows))


def stride2_rows(b: int, r: int) -> list[str]:
    """The Downsample convolutions (3x3, stride 2) forward + backward: MLX's own gradient vs
    fastops' written-out one vs torch."""
    import torch

    rows = []
    for size, c in ((28, 64), (14, 64)):
        x, w, bias = mx.random.normal((b, size, size, c)), 0.1 * mx.random.normal((c, 3, 3, c)), mx.zeros((c,))
        stock = median_ms(mlx_timer(lambda x, w, bias: mx.conv2d(x, w, stride=2, padding=1) + bias, x, w, bias,
                                    grad=True), r)
        fast = median_ms(mlx_timer(fastops.conv3x3_stride2, x, w, bias, grad=True), r)
        conv = torch.nn.Conv2d(c, c, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
        tx = torch.randn(b, c, size, size).to(memory_format=torch.channels_last).requires_grad_(True)

        def torch_step():
            conv.zero_grad()
            conv(tx).sum().backward()
        rows.append(f"| conv {size}², {c}→{c} stride 2 fwd+bwd | {stock:.1f} | {fast:.1f} | {fast:.1f} | "
                    f"{median_ms(torch_step, r):.1f} | – |")
    return rows


def plan_rows(b: int, r: int, grad: bool = False) -> list[str]:
    """Each body layer of the shipped network on its own input shape, forward (``grad``: forward
    and backward, the gradients of the input, the embedding and the layer's parameters, as
    training needs them), MLX (compiled, the fast path) vs torch (channels-last), one thread; then
    the sums per layer kind. Every layer of both frameworks is timed once per round (median of 3
    calls) and a cell is the median over ``r`` rounds, so a load that comes and goes hits both
    sides alike. Where MLX's share is larger than torch's is where the whole-network gap is."""
    import statistics

    import torch

    from hold_mlx.model import load
    from hold_mlx.netplan import find_layer
    from hold_mlx.nets import _concat_channels

    model, tmodel = load(), load(None, "torch")
    net, tnet, plan = model.net, tmodel.net, model.net.plan
    emb, temb = mx.random.normal((b, plan.emb_dim)), torch.randn(b, plan.emb_dim)
    cases = []  # (layer, kind, mlx call, torch call)
    for layer in plan.body:
        c_in, size, skip = layer.c_in, layer.size, layer.skip_in
        # a layer that pops a skip is timed with the concatenation run_body does before it
        parts = [mx.random.normal((b, size, size, c_in - skip))] + ([mx.random.normal((b, size, size, skip))]
                                                                    if skip else [])
        tparts = [torch.randn(b, p.shape[3], size, size).to(memory_format=torch.channels_last) for p in parts]
        mx.eval(*parts, emb)

        module, tmodule = find_layer(net, layer), find_layer(tnet, layer)

        def mlx_layer(*xs, layer=layer, emb=emb):
            return net.run_layer(layer, _concat_channels(*xs) if len(xs) > 1 else xs[0], emb)
        if grad:
            probe = mx.random.normal(mlx_layer(*parts).shape)
            tprobe = torch.randn(probe.shape[0], probe.shape[3], probe.shape[1], probe.shape[2])
            mx.eval(probe)

            def mlx_loss(params, e, *xs, module=module, layer=layer, probe=probe):
                module.update(params)
                return (net.run_layer(layer, _concat_channels(*xs) if len(xs) > 1 else xs[0], e) * probe).sum()
            value_grad = mx.value_and_grad(mlx_loss, argnums=tuple(range(2 + len(parts))))
            # the layer's own parameters as the compiled inputs (the whole net's would add the cost
            # of flattening every parameter of the network to each layer's call)
            step = mx.compile(lambda *xs, module=module, vg=value_grad: vg(module.trainable_parameters(), emb, *xs),
                              inputs=[module], outputs=[module])
            tparts = [p.requires_grad_(True) for p in tparts]
            temb_grad = temb.clone().requires_grad_(True)

            def torch_layer(layer=layer, tparts=tparts, tmodule=tmodule, tprobe=tprobe, temb_grad=temb_grad):
                tmodule.zero_grad()
                x = torch.cat(tparts, 1) if len(tparts) > 1 else tparts[0]
                (tnet.run_layer(layer, x, temb_grad) * tprobe).sum().backward()
        else:
            step = mx.compile(mlx_layer, inputs=[module])

            def torch_layer(layer=layer, tparts=tparts):
                with torch.inference_mode():
                    x = torch.cat(tparts, 1) if len(tparts) > 1 else tparts[0]
                    tnet.run_layer(layer, x, temb)
        cases.append((layer, layer.kind + (" + concat" if skip else ""),
                      lambda step=step, parts=parts: mx.eval(step(*parts)), torch_layer))
    times = [([], []) for _ in cases]
    for _ in range(r):
        for (_, _, run_mlx, run_torch), (t_mlx, t_torch) in zip(cases, times):
            t_mlx.append(median_ms(run_mlx, 3))
            t_torch.append(median_ms(run_torch, 3))
    rows = ["| layer | kind | input (H², C) | MLX | torch | MLX / torch |", "|---|---|---|---|---|---|"]
    by_kind: dict = {}
    for (layer, kind, _, _), (t_mlx, t_torch) in zip(cases, times):
        m, t = statistics.median(t_mlx), statistics.median(t_torch)
        totals = by_kind.setdefault(kind, [0.0, 0.0, 0])
        totals[0], totals[1], totals[2] = totals[0] + m, totals[1] + t, totals[2] + 1
        rows.append(f"| {layer.name} | {kind} | {layer.size}², {layer.c_in} | {m:.2f} | {t:.2f} | {m / t:.2f} |")
    rows += ["", "| kind | layers | MLX | torch | MLX / torch |", "|---|---|---|---|---|"]
    for kind, (m, t, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        rows.append(f"| {kind} | {count} | {m:.1f} | {t:.1f} | {m / t:.2f} |")
    total_mlx, total_torch = sum(v[0] for v in by_kind.values()), sum(v[1] for v in by_kind.values())
    rows.append(f"| **all** | {len(plan.body)} | {total_mlx:.1f} | {total_torch:.1f} | {total_mlx / total_torch:.2f} |")
    return rows


def whole_network_rows(b: int, r: int, native, mlx_paths) -> list[str]:
    """The shipped U-Net end to end, compiled, one stream: forward, then forward + backward."""
    import torch

    from hold_mlx.checkpoint import default_checkpoint
    from hold_mlx.model import load

    flop_per_image = model_flops_per_image(default_checkpoint())
    model = load()
    net, cfg = model.net, model.config
    shape = (b, *cfg["data"]["shape"][:2], cfg["net"]["order"] * cfg["net"]["data_channels"])
    u, t = mx.random.normal(shape), mx.full((b,), 0.5)
    probe = mx.random.normal(shape[:3] + (cfg["net"]["data_channels"],))
    mx.eval(u, t, probe)
    tnet = load(None, "torch").net
    tu, tt = torch.randn(b, shape[3], *shape[1:3]), torch.full((b,), 0.5)
    tprobe = torch.randn(b, cfg["net"]["data_channels"], *shape[1:3])

    def torch_forward():
        with torch.inference_mode():
            tnet(tu, tt)

    def torch_train():
        tnet.zero_grad()
        (tnet(tu, tt) * tprobe).sum().backward()

    rows, fastops_choice = [], os.environ.get("HOLD_MLX_FASTOPS")
    for grad in (False, True):
        times = []
        for config in ("stock", "ops", "native"):
            os.environ["HOLD_MLX_FASTOPS"] = "0" if config == "stock" else "1"  # read at every call
            mlx_paths(config == "native")
            if grad:
                step = mx.compile(nn.value_and_grad(net, lambda u, t, probe: (net(u, t) * probe).sum()),
                                  inputs=[net], outputs=[net])
            else:
                step = mx.compile(net.__call__, inputs=[net])
            times.append(median_ms(lambda: mx.eval(step(u, t, probe) if grad else step(u, t)), r))
        t_torch = median_ms(torch_train if grad else torch_forward, r)
        flop = flop_per_image * b * (3 if grad else 1)
        rows.append(f"| **shipped U-Net{' fwd+bwd' if grad else ''}** | {times[0]:.0f} | {times[1]:.0f} | "
                    f"{times[2]:.0f} | {t_torch:.0f} | {flop / times[2] / 1e6:.0f} |")
    if fastops_choice is None:
        os.environ.pop("HOLD_MLX_FASTOPS")
    else:
        os.environ["HOLD_MLX_FASTOPS"] = fastops_choice
    return rows


if __name__ == "__main__":
    main()

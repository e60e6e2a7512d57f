#!/usr/bin/env python
"""Compare models: sample quality vs NFE and bits/dim, as one markdown table (HOLD vs CLD vs VP).

    python tools/eval_compare.py \\
        --model HOLD=runs/fmnist-hold-6000:lie-trotter --model CLD=runs/fmnist-cld:strang \\
        --model VP=runs/fmnist-vp:euler-maruyama --nfe 20 50 100 250 \\
        --n-samples 1000 --bpd-images 64 --out docs/results.md --json results.json

Each --model is NAME=CHECKPOINT[:SAMPLER] (default sampler lie-trotter). For every model and NFE
budget it draws --n-samples samples (steps = NFE - 1 for the one-call-per-step samplers, (NFE - 1)/2
for heun/ams; the NFE column is the count the sampler reported) and scores them with
FD-/KD-FMNIST-classifier against the same --n-ref training images; with --bpd-images N it also
reports bits/dim of the first N test images (hutchinson, RK45 1e-5). Everything goes through the
same library calls as `hold-mlx eval`. Add --fid-weights for FID/KID columns. For images the
last row is the floor: --n-samples held-out test images scored the same way (FD is biased at small
N, so a model is judged against that row, not against zero).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hold_mlx.data import load_dataset  # noqa: E402
from hold_mlx.evaluate import likelihood_report, quality_classifier, quality_report  # noqa: E402
from hold_mlx.quality import reference_images, sample_quality  # noqa: E402
from hold_mlx.model import load  # noqa: E402
from hold_mlx.samplers import resolve_sampler  # noqa: E402

CALLS_PER_STEP = {"ode": 2, "ams": 2, "poisson-midpoint": 2}  # heun is the fixed-step ode


def parse_model(text: str) -> tuple[str, str, str]:
    if "=" not in text:
        raise SystemExit(f"--model {text!r}: expected NAME=CHECKPOINT[:SAMPLER]")
    name, rest = text.split("=", 1)
    path, _, sampler = rest.partition(":")
    return name, path, sampler or "lie-trotter"


def steps_for(sampler: str, nfe: int) -> int:
    canonical, _, options = resolve_sampler(sampler)
    if options.get("method") == "rk45":
        raise SystemExit("rk45 is adaptive: its NFE cannot be chosen; use heun for the ODE")
    return max(1, (nfe - 1) // CALLS_PER_STEP.get(canonical, 1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT[:SAMPLER], repeatable")
    p.add_argument("--nfe", type=int, nargs="+", default=[20, 50, 100, 250])
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--n-ref", type=int, default=10000)
    p.add_argument("--bpd-images", type=int, default=0, help="bits/dim on the first N test images (0: skip)")
    p.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-weights", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args()

    models = [parse_model(m) for m in args.model]
    fid_net = None
    if args.fid_weights is not None:
        from hold_export.fid_inception import load_fid_inception

        fid_net = load_fid_inception(args.fid_weights, device=args.device)
    results, reference = [], None
    for name, path, sampler in models:
        rt = load(path, args.backend, device=args.device)
        cfg = rt.config["data"]
        if reference is None:  # every model is scored against the first one's reference set
            reference, ref_source = reference_images(cfg, args.n_ref, seed=args.seed)
            classifier = quality_classifier(cfg, fid_net=fid_net)
        bpd = None
        if args.bpd_images:
            lik = likelihood_report(rt, args.bpd_images, seed=args.seed, batch_size=min(args.batch_size, 64))
            bpd = {"mean": lik["mean"], "stderr": lik["stderr"], "n": lik["n"], "nfe": lik["nfe_per_batch"],
                   "wall_s": lik["wall_s"]}
            print(f"{name}: {lik['mean']:.4f} ± {lik['stderr']:.4f} {lik['unit']}", file=sys.stderr, flush=True)
        for nfe in args.nfe:
            steps = steps_for(sampler, nfe)
            q = quality_report(rt, n_samples=args.n_samples, sampler=sampler, steps=steps,
                               reference=(reference, ref_source), classifier=classifier, fid_net=fid_net,
                               batch_size=args.batch_size, seed=args.seed)
            metrics = q["metrics"]
            row = {"model": name, "checkpoint": path, "sampler": sampler, "steps": steps, "nfe": q["nfe"],
                   "n_samples": args.n_samples, "reference": ref_source, "metrics": metrics, "bpd": bpd,
                   "wall_s": q["wall_s"]}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("model", "sampler", "nfe")} | {
                k: (v if not isinstance(v, dict) else v["mean"]) for k, v in metrics.items()}), file=sys.stderr,
                flush=True)

    if cfg["kind"] == "image":  # the floor: held-out images scored exactly like the samples
        test = load_dataset(cfg["name"], split="test")
        pick = np.random.default_rng(args.seed).choice(len(test.data), min(args.n_samples, len(test.data)),
                                                       replace=False)
        metrics = sample_quality(test.to_user(test.data[pick]), reference, cfg, classifier=classifier,
                                 fid_net=fid_net, seed=args.seed)
        results.append({"model": "test images (floor)", "checkpoint": None, "sampler": "–", "steps": 0, "nfe": "–",
                        "n_samples": len(pick), "reference": ref_source, "metrics": metrics,
                        "bpd": None, "wall_s": 0.0})

    metric_names = list(results[0]["metrics"])
    head = ["model", "sampler", "NFE", *metric_names] + (["bits/dim"] if args.bpd_images else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], r["sampler"], str(r["nfe"])]
        for m in metric_names:
            v = r["metrics"][m]
            cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if isinstance(v, dict) else f"{v:.3f}")
        if args.bpd_images:
            cells.append(f"{r['bpd']['mean']:.3f} ± {r['bpd']['stderr']:.3f}" if r["bpd"] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    command = "python tools/eval_compare.py " + " ".join(sys.argv[1:])
    text = (f"{table}\n\n{args.n_samples} samples per cell against {ref_source}; KD: mean ± std over subsets; "
            f"bits/dim: first {args.bpd_images} test images, ± standard error.\n\nCommand: `{command}`\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=1, default=float))


if __name__ == "__main__":
    main()

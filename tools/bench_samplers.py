#!/usr/bin/env python
"""Exact-score sampler benchmark: sample quality against the true law at equal NFE.

A Gaussian mixture pushed through a linear SDE stays a Gaussian mixture, so its score is exact
(hold_mlx.exact.ExactScore): what is measured here is the samplers alone, free of training noise.
For every SDE (VP, CLD, HOLD order 3 and 4), sampler and time grid, and for NFE in
{10, 20, 50, 100, 250, 1000} (RK45 at its own NFE, one point per tolerance), draw N samples and
compare them with N fresh samples of the mixture:

- unbiased MMD^2 with a multi-scale Gaussian kernel (bandwidths h/16 ... h, h the median distance
  between data points), whose expectation is 0 for a perfect sampler;
- sliced 2-Wasserstein distance (256 random directions);
- the Monte-Carlo floor: the same metrics between independent data sets of the same size.

It prints the tables and writes docs/samplers.md and docs/samplers_quality.png.

    nice -n 10 python tools/bench_samplers.py            # full run (~45 min of one core)
    python tools/bench_samplers.py --quick               # smoke run (a minute)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread: small GEMMs, shared cores

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hold_mlx.api import sample_full  # noqa: E402
from hold_mlx.exact import (ExactScore, checkerboard_like_mixture, median_distance, ring_mixture,  # noqa: E402
                            sliced_wasserstein)
from hold_mlx.metrics import gaussian_kernel, mmd2_unbiased  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402

SDES = {"vp": ("vp", {}), "cld": ("cld", {}), "hold3": ("hold", {"order": 3}), "hold4": ("hold", {"order": 4})}
NFES = (10, 20, 50, 100, 250, 1000)
GRIDS = ("uniform", "quadratic")
TOLERANCES = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4)
PM_SUBSTEPS = 4


@dataclass
class Spec:
    """A sampler as benchmarked: its name, options and how many steps buy a given NFE."""

    label: str
    sampler: str
    options: dict = field(default_factory=dict)
    calls_per_step: float = 1.0  # expected batched calls per step (the denoising call comes on top)

    def steps_for(self, nfe: int) -> int:
        return max(1, int(round((nfe - 1) / self.calls_per_step)))


def pm_calls_per_step(K: int, variant: str) -> float:
    """b0, plus one batched call when some midpoint j >= 1 is drawn (j = 0 needs none)."""
    return 1.0 + ((1.0 - (1.0 - 1.0 / K) ** (K - 1)) if variant == "bernoulli" else (K - 1) / K)


SPECS = [
    Spec("lie-trotter", "lie-trotter"),
    Spec("strang", "strang"),
    Spec("euler-maruyama", "euler-maruyama"),
    Spec("ode-heun", "ode", {"method": "heun"}, 2.0),
    Spec("ode-exp-heun", "ode", {"method": "exp-heun"}, 2.0),
    Spec(f"pm-bernoulli-K{PM_SUBSTEPS}", "poisson-midpoint", {"substeps": PM_SUBSTEPS, "variant": "bernoulli"},
         pm_calls_per_step(PM_SUBSTEPS, "bernoulli")),
    Spec(f"pm-one-K{PM_SUBSTEPS}", "poisson-midpoint", {"substeps": PM_SUBSTEPS, "variant": "one"},
         pm_calls_per_step(PM_SUBSTEPS, "one")),
    Spec("ams", "ams", {"norms": "sample"}, 2.0),
    Spec("ams-batchnorm", "ams", {"norms": "batch"}, 2.0),
]
RK45 = Spec("ode-rk45", "ode", {"method": "rk45"})


@dataclass
class Problem:
    name: str
    mixture: object
    n: int
    data: np.ndarray
    bandwidths: tuple
    floor: dict  # metric -> (mean, std) between independent data sets

    def metrics(self, x: np.ndarray) -> dict:
        return {"mmd2": mmd2_unbiased(x, self.data, gaussian_kernel, bandwidths=self.bandwidths),
                "sw": sliced_wasserstein(x, self.data)}


def make_problem(dim: int, n: int, floor_repeats: int) -> Problem:
    mix = ring_mixture() if dim == 2 else checkerboard_like_mixture(dim)
    name = "2-D ring of 8 Gaussians (std 0.15, radius 2)" if dim == 2 else \
        f"{dim}-D mixture of 8 anisotropic Gaussians (checkerboard_like_mixture, variances 0.02-0.3)"
    h = median_distance(mix.sample(2000, np.random.default_rng(1)))
    bandwidths = tuple(h * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1))
    data = mix.sample(n, np.random.default_rng(2))
    problem = Problem(name, mix, n, data, bandwidths, {})
    values = [problem.metrics(mix.sample(n, np.random.default_rng(100 + i))) for i in range(floor_repeats)]
    problem.floor = {k: (float(np.mean([v[k] for v in values])), float(np.std([v[k] for v in values])))
                     for k in values[0]}
    return problem


def run_point(problem, sde, spec: Spec, steps: int, grid: str, seed: int, extra=None) -> dict:
    score = ExactScore(sde, problem.mixture)
    t0 = time.perf_counter()
    res = sample_full(sde, score, (problem.n, problem.mixture.dim), sampler=spec.sampler, steps=steps, grid=grid,
                      backend="numpy", noise="native", seed=seed, **{**spec.options, **(extra or {})})
    x = np.asarray(res.x, dtype=np.float64)
    row = {"steps": steps, "nfe": res.nfe, "seconds": time.perf_counter() - t0}
    if np.all(np.isfinite(x)) and np.abs(x).max() < 1e6:
        row.update(problem.metrics(x))
    else:
        row.update(mmd2=math.inf, sw=math.inf)
    return row


def plan(dim: int, spec: Spec, grid: str, nfes, everything: bool):
    """Which NFE targets to run. In 2-D: all. In 64-D, where one exact score call costs ~30x more,
    the quadratic grid (the better one in 2-D for most samplers) for everyone, the uniform grid
    for Lie-Trotter and Euler-Maruyama, and the largest NFE for the reference samplers only."""
    if dim <= 2 or everything:
        return list(nfes)
    reference = spec.label in ("lie-trotter", "euler-maruyama", "strang")
    if grid == "uniform" and spec.label not in ("lie-trotter", "euler-maruyama"):
        return []
    return [v for v in nfes if v < max(nfes) or (reference and grid == "quadratic")]


# ----------------------------------------------------------------------------- analysis


REFERENCE_SAMPLERS = ("lie-trotter", "strang", "euler-maruyama")


def targets(problem, rows_by_key, sde_label):
    """The SDE's 1000-NFE quality (the mean over the reference samplers and grids at the largest
    NFE: DDPM-1000's analogue, and less noisy than the best of many noisy values) and the bar a
    configuration must clear: within 10% of it, or within the MC floor (its mean + 3 std: with
    dozens of configurations compared, 2 std would flag exact samplers by chance)."""
    top = max(r["target_nfe"] for r in rows_by_key.values() if r["sde"] == sde_label)
    refs = [r["points"][top] for r in rows_by_key.values()
            if r["sde"] == sde_label and r["spec"] in REFERENCE_SAMPLERS and top in r["points"]]
    ref = {m: float(np.mean([p[m] for p in refs])) for m in ("mmd2", "sw")}
    bar = {m: max(1.1 * ref[m], problem.floor[m][0] + 3 * problem.floor[m][1]) for m in ref}
    return ref, bar


def first_reaching(points: dict, bar: dict):
    """Smallest NFE target from which on (every larger target too) both metrics clear the bar."""
    ok = [all(points[k][m] <= bar[m] for m in bar) for k in sorted(points)]
    keys = sorted(points)
    for i, k in enumerate(keys):
        if all(ok[i:]):
            return k, points[k]["nfe"]
    return None, None


def fmt(v: float, metric: str) -> str:
    if not math.isfinite(v):
        return "diverged"
    return f"{v * 1e3:.2f}" if metric == "mmd2" else f"{v:.3f}"


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few points, small N")
    ap.add_argument("--dims", default="2,64", help="data dimensions (comma separated)")
    ap.add_argument("--n", type=int, default=None, help="samples per point (default 2000 in 2-D, 1000 in 64-D)")
    ap.add_argument("--full-64d", action="store_true",
                    help="in 64-D too, every sampler on both grids at every NFE (about 3x the 64-D time)")
    ap.add_argument("--sdes", default=",".join(SDES))
    ap.add_argument("--nfe", default=",".join(map(str, NFES)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "samplers.md")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "samplers_quality.png")
    ap.add_argument("--json", type=Path, default=None,
                    help="also save the raw numbers here (default: next to --out, samplers_results.json)")
    ap.add_argument("--render-only", action="store_true", help="re-render --out and --plot from --json")
    args = ap.parse_args(argv)
    json_path = args.json or args.out.with_name(args.out.stem + "_results.json")
    if args.render_only:
        saved = json.loads(json_path.read_text())
        results = {int(dim): (Problem(**{**p, "data": None, "mixture": None, "bandwidths": tuple(p["bandwidths"])}),
                              {tuple(k.split("|")): v for k, v in rows.items()}, n)
                   for dim, (p, rows, n) in saved["results"].items()}
        for _, rows, _ in results.values():
            for row in rows.values():
                row["points"] = {float(k) if "." in k or "e" in k else int(k): v for k, v in row["points"].items()}
        args.quick = saved["quick"]
        write_outputs(results, saved["nfes"], saved["sdes"], args, saved["elapsed"], None)
        return

    dims = [int(d) for d in args.dims.split(",")]
    sdes = args.sdes.split(",")
    nfes = [int(v) for v in args.nfe.split(",")]
    specs, tolerances = SPECS, TOLERANCES
    if args.quick:
        dims, sdes, nfes = dims[:1], ["vp", "hold3"], [10, 50]
        specs = [s for s in SPECS if s.label in ("lie-trotter", "ode-exp-heun", f"pm-one-K{PM_SUBSTEPS}")]
        tolerances = (1e-2,)
    started = time.time()
    results = {}
    for dim in dims:
        n = args.n or (200 if args.quick else 2000 if dim <= 2 else 1000)
        problem = make_problem(dim, n, 3 if args.quick else 8)
        print(f"\n## {problem.name}: N = {n}; floor MMD^2 {problem.floor['mmd2'][0]:.2e} "
              f"+- {problem.floor['mmd2'][1]:.2e}, SW {problem.floor['sw'][0]:.4f} +- {problem.floor['sw'][1]:.4f}",
              flush=True)
        rows = {}
        for sde_label in sdes:
            name, kw = SDES[sde_label]
            sde = get_sde(name, **kw)
            for spec in specs:
                for grid in GRIDS:
                    point_nfes = plan(dim, spec, grid, nfes, args.full_64d or args.quick)
                    if not point_nfes:
                        continue
                    key = (sde_label, spec.label, grid)
                    row = rows[key] = {"sde": sde_label, "spec": spec.label, "grid": grid, "points": {},
                                       "target_nfe": max(nfes)}
                    for nfe in point_nfes:
                        p = run_point(problem, sde, spec, spec.steps_for(nfe), grid, args.seed)
                        row["points"][nfe] = p
                        print(f"{sde_label:6s} {spec.label:18s} {grid:9s} NFE {p['nfe']:5d} "
                              f"MMD2e3 {fmt(p['mmd2'], 'mmd2'):>8s} SW {fmt(p['sw'], 'sw'):>8s} "
                              f"({p['seconds']:.1f}s)", flush=True)
            key = (sde_label, RK45.label, "adaptive")
            row = rows[key] = {"sde": sde_label, "spec": RK45.label, "grid": "adaptive", "points": {},
                               "target_nfe": max(nfes)}
            for tol in (tolerances if dim <= 2 or args.quick else (1e-2, 1e-4)):
                p = run_point(problem, sde, RK45, 1, "uniform", args.seed, {"rtol": tol, "atol": tol})
                p["tol"] = tol
                row["points"][tol] = p
                print(f"{sde_label:6s} {RK45.label:18s} tol {tol:<7g} NFE {p['nfe']:5d} "
                      f"MMD2e3 {fmt(p['mmd2'], 'mmd2'):>8s} SW {fmt(p['sw'], 'sw'):>8s} ({p['seconds']:.1f}s)",
                      flush=True)
        results[dim] = (problem, rows, n)
    elapsed = time.time() - started
    write_outputs(results, nfes, sdes, args, elapsed, json_path)


def write_outputs(results, nfes, sdes, args, elapsed, json_path) -> None:
    report = render(results, nfes, sdes, args, elapsed)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    if BEGIN in old and END in old:  # keep the hand-written text around the generated block
        report = old[:old.index(BEGIN)] + report + old[old.index(END) + len(END) + 1:]
    args.out.write_text(report)
    plot(results, nfes, sdes, args.plot)
    if json_path is not None:
        saved = {"quick": args.quick, "nfes": nfes, "sdes": sdes, "elapsed": elapsed, "results": {
            dim: ({"name": p.name, "n": p.n, "bandwidths": list(p.bandwidths), "floor": p.floor},
                  {"|".join(k): v for k, v in rows.items()}, n) for dim, (p, rows, n) in results.items()}}
        json_path.write_text(json.dumps(saved, indent=1))
    print(f"wrote {args.out} and {args.plot} ({elapsed / 60:.1f} min of sampling)")


BEGIN = "<!-- begin: generated by tools/bench_samplers.py; edit the script, not this block -->"
END = "<!-- end: generated by tools/bench_samplers.py -->"


def render(results, nfes, sdes, args, elapsed) -> str:
    cmd = "nice -n 10 python tools/bench_samplers.py" + (" --quick" if args.quick else "")
    lines = [
        BEGIN,
        "## Measured: samplers at equal NFE, with exact scores",
        "",
        f"Command: `{cmd}` ({elapsed / 60:.1f} min on {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}).",
        "",
        "Every score is exact (`hold_mlx.exact.ExactScore`: a Gaussian mixture pushed through the SDE), so",
        "the numbers measure the samplers alone. Quality is measured against N fresh data samples:",
        "unbiased MMD² (×10³; multi-scale Gaussian kernel, bandwidths h/16, h/8, h/4, h/2, h with h the",
        "median distance between data points; 0 is perfect and small negative values are noise) and sliced",
        "2-Wasserstein distance (256 random directions). *Floor*: the same metric between independent data",
        "sets of the same size (mean ± std). NFE counts batched score calls, the final denoising call included;",
        f"Poisson midpoint uses K = {PM_SUBSTEPS} substeps and its NFE varies with the coin flips (the table shows",
        "the realised count at each target). AMS: snr 0.16, one corrector step per predictor step, norms per",
        "sample (the library default) or averaged over the batch (score_sde / AMS code).",
        "",
    ]
    for dim, (problem, rows, n) in results.items():
        lines += [f"### {problem.name}", "",
                  f"N = {n} samples per point. Floor: MMD² {fmt(problem.floor['mmd2'][0], 'mmd2')} ± "
                  f"{fmt(problem.floor['mmd2'][1], 'mmd2')} (×10³), SW {problem.floor['sw'][0]:.3f} ± "
                  f"{problem.floor['sw'][1]:.3f}.", ""]
        reach = []
        for sde_label in sdes:
            best, bar = targets(problem, {k: v for k, v in rows.items() if v["grid"] != "adaptive"}, sde_label)
            lines += [f"#### {sde_label}", "",
                      f"{max(nfes)}-NFE quality (mean of {', '.join(REFERENCE_SAMPLERS)} at NFE {max(nfes)}): "
                      f"MMD² {fmt(best['mmd2'], 'mmd2')}, SW {best['sw']:.3f}; bar (within 10% of it or within floor + 2 std): "
                      f"MMD² ≤ {fmt(bar['mmd2'], 'mmd2')}, SW ≤ {bar['sw']:.3f}.", "",
                      "| sampler | grid | " + " | ".join(f"NFE {v}" for v in nfes) + " | reaches bar at |",
                      "|---|---|" + "---|" * len(nfes) + "---|"]
            for key, row in rows.items():
                if row["sde"] != sde_label or row["grid"] == "adaptive":
                    continue
                first, actual = first_reaching(row["points"], bar)
                reach.append((actual if actual else math.inf, sde_label, row["spec"], row["grid"], first))
                cells = []
                for v in nfes:
                    if v not in row["points"]:
                        cells.append("")
                        continue
                    p = row["points"][v]
                    tag = f" ({p['nfe']})" if p["nfe"] != v else ""
                    cells.append(f"{fmt(p['mmd2'], 'mmd2')} / {fmt(p['sw'], 'sw')}{tag}")
                lines.append(f"| {row['spec']} | {row['grid']} | " + " | ".join(cells) +
                             f" | {actual if actual else '—'} |")
            rk = rows[(sde_label, RK45.label, "adaptive")]
            cells = [f"tol {p['tol']:g}: NFE {p['nfe']}, {fmt(p['mmd2'], 'mmd2')} / {fmt(p['sw'], 'sw')}"
                     for p in rk["points"].values()]
            lines += ["", f"ode-rk45 (rtol = atol; MMD² ×10³ / SW): " + "; ".join(cells) + ".", ""]
        reach.sort(key=lambda r: r[0])
        lines += [f"#### Fewest NFE to reach the SDE's {max(nfes)}-NFE quality ({dim}-D)", "",
                  "| SDE | sampler | grid | NFE (realised) |", "|---|---|---|---|"]
        for actual, sde_label, spec, grid, first in reach[:12]:
            if math.isfinite(actual):
                lines.append(f"| {sde_label} | {spec} | {grid} | {actual} |")
        for sde_label in sdes:
            mine = [r for r in reach if r[1] == sde_label and math.isfinite(r[0])]
            if not mine:
                lines.append(f"| {sde_label} | (none within NFE ≤ {max(nfes)}) | | |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def plot(results, nfes, sdes, path: Path) -> None:
    """Quality vs NFE: per dimension a row of sliced W2 (log) and a row of MMD^2 (symlog), one
    column per SDE; solid uniform grid, dashed quadratic, dotted RK45; grey band: MC floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(results)
    fig, axes = plt.subplots(2 * len(dims), len(sdes), figsize=(4.2 * len(sdes), 3.4 * 2 * len(dims)),
                             squeeze=False)
    labels = sorted({row["spec"] for _, rows, _ in results.values() for row in rows.values()})
    colors = dict(zip(labels, plt.cm.tab10.colors))
    for i, dim in enumerate(dims):
        problem, rows, _ = results[dim]
        for r, (metric, cap, title) in enumerate((("sw", 10.0, "sliced W2"), ("mmd2", 0.1, "MMD² (unbiased)"))):
            mean, std = problem.floor[metric]
            for j, sde_label in enumerate(sdes):
                ax = axes[2 * i + r, j]
                for (sde, spec, grid), row in rows.items():
                    if sde != sde_label:
                        continue
                    pts = sorted(row["points"].values(), key=lambda p: p["nfe"])
                    ys = [min(p[metric], cap) for p in pts]
                    style = {"uniform": "-", "quadratic": "--"}.get(grid, ":")
                    ax.plot([p["nfe"] for p in pts], ys, style, color=colors[spec], marker="o", ms=2.5, lw=1,
                            label=f"{spec} ({grid})")
                ax.axhspan(mean - 3 * std, mean + 3 * std, color="0.85", zorder=0)
                ax.set_xscale("log")
                if metric == "sw":
                    ax.set_yscale("log")
                else:
                    ax.set_yscale("symlog", linthresh=max(3 * std, 1e-6))
                ax.set_title(f"{sde_label}, {dim}-D: {title}", fontsize=9)
                ax.set_xlabel("NFE")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=len(sdes) + 1)
    fig.tight_layout(rect=(0, 0.03 + 0.012 * len(handles) / (len(sdes) + 1), 1, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Exact-score sampler benchmark: sample quality against the true law at equal NFE.

A Gaussian mixture pushed through a linear SDE stays a Gaussian mixture, so its score is exact
(hold_mlx.exact.ExactScore): what is measured here is the samplers alone, free of training noise.
For every SDE (VP, CLD, HOLD order 3 and 4), sampler and time grid, and for NFE in
{10, 15, 20, 50, 100, 1000} (RK45 at its own NFE, one point per tolerance), and for every seed
(5 by default: the sampler's noise and the reference data set both change with the seed), draw N
samples and compare them with N fresh samples of the mixture:

- unbiased MMD^2 with a multi-scale Gaussian kernel (bandwidths h/16 ... h, h the median distance
  between data points), whose expectation is 0 for a perfect sampler;
- sliced 2-Wasserstein distance (256 random directions);
- the Monte-Carlo floor: the same metrics between independent data sets of the same size.

``--metric exact`` takes the reference set out of the noise: MMD^2 against the mixture itself
(``hold_mlx.exact.mmd2_to_mixture``, its expectations in closed form) and sliced W2 against one
large data set (20 000 samples), so the spread over seeds is the samples' own. Its tables go to a
block of their own in docs/samplers.md; it is the sharper test of the few-step targets:

    OPENBLAS_NUM_THREADS=1 nice -n 10 python tools/bench_samplers.py --metric exact --dims 64 \
        --sdes vp,cld,hold3 --nfe 10,15,20,1000 --n 1000 --specs lie-trotter,euler-maruyama,gddim-2,gddim-3,gddim-2-eta0.5

Every cell is the mean ± std over the seeds; a configuration "reaches the 1000-NFE quality" only
where the MEAN clears the bar (see ``BAR_RULE``). It prints the tables and writes docs/samplers.md
and docs/samplers_quality.png.

    nice -n 10 python tools/bench_samplers.py            # full run (~40 min of one core)
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
from hold_mlx.exact import (ExactScore, checkerboard_like_mixture, median_distance, mmd2_to_mixture,  # noqa: E402
                            ring_mixture, sliced_wasserstein)
from hold_mlx.metrics import gaussian_kernel, mmd2_unbiased  # noqa: E402
from hold_mlx.samplers import NOISE_LEVEL_GRIDS  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402

SDES = {"vp": ("vp", {}), "cld": ("cld", {}), "hold3": ("hold", {"order": 3}), "hold4": ("hold", {"order": 4})}
NFES = (10, 15, 20, 50, 100, 1000)
SEEDS = 5
#: The bar, in words (rendered into the docs) and as used by ``targets``.
BAR_FACTOR, BAR_STDS = 1.1, 3.0
BAR_RULE = (f"within {round((BAR_FACTOR - 1) * 100)}% (of its magnitude) of the 1000-NFE quality, or within the "
            "Monte-Carlo floor of a "
            f"mean over the seeds (floor mean + {BAR_STDS:g} std / sqrt(seeds))")
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
    grids: tuple = ()  # only these grids (default: those plan() gives)

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
    Spec("gddim-1", "gddim", {"order": 1}),
    Spec("gddim-2", "gddim", {"order": 2}),
    Spec("gddim-3", "gddim", {"order": 3}),
    Spec("gddim-2-eta0.5", "gddim", {"order": 2, "eta": 0.5}),
    Spec("gddim-2-eta1", "gddim", {"order": 2, "eta": 1.0}),
    # chosen for CLD on seeds 5-24 of the exact-score problem (docs/samplers.md), measured here on 0-4
    Spec("gddim-2-pc-eta0.5", "gddim", {"order": 2, "eta": 0.5, "corrector": True}, grids=("power-2.5",)),
]
#: Grids benchmarked besides uniform and quadratic (for gddim only: it picks its default by them).
NOISE_GRIDS = NOISE_LEVEL_GRIDS
RK45 = Spec("ode-rk45", "ode", {"method": "rk45"})


@dataclass
class Problem:
    name: str
    mixture: object
    n: int
    data: np.ndarray
    bandwidths: tuple
    floor: dict  # metric -> (mean, std) between independent data sets
    exact: bool = False  # MMD^2 against the mixture in closed form, SW against one large data set
    _data: dict = field(default_factory=dict)

    def data_for(self, seed: int) -> np.ndarray:
        """The reference data set of a seed (seed 0: ``data``); a fresh one for every seed, so
        the spread over seeds includes the Monte-Carlo noise of the metric (``exact``: ``data``,
        the one large set, for every seed)."""
        if seed == 0 or self.exact:
            return self.data
        if seed not in self._data:
            self._data[seed] = self.mixture.sample(self.n, np.random.default_rng(2 + 7919 * seed))
        return self._data[seed]

    def metrics(self, x: np.ndarray, seed: int = 0) -> dict:
        data = self.data_for(seed)
        if self.exact:
            return {"mmd2": mmd2_to_mixture(x, self.mixture, self.bandwidths),
                    "sw": sliced_wasserstein(x, data, seed=seed)}
        return {"mmd2": mmd2_unbiased(x, data, gaussian_kernel, bandwidths=self.bandwidths), "sw": sliced_wasserstein(x, data, seed=seed)}


EXACT_REFERENCE = 20000  # data samples behind the sliced W2 of --metric exact


def make_problem(dim: int, n: int, floor_repeats: int, exact: bool = False) -> Problem:
    mix = ring_mixture() if dim == 2 else checkerboard_like_mixture(dim)
    name = "2-D ring of 8 Gaussians (std 0.15, radius 2)" if dim == 2 else \
        f"{dim}-D mixture of 8 anisotropic Gaussians (checkerboard_like_mixture, variances 0.02-0.3)"
    h = median_distance(mix.sample(2000, np.random.default_rng(1)))
    bandwidths = tuple(h * f for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1))
    data = mix.sample(EXACT_REFERENCE if exact else n, np.random.default_rng(2))
    problem = Problem(name, mix, n, data, bandwidths, {}, exact)
    values = [problem.metrics(mix.sample(n, np.random.default_rng(100 + i))) for i in range(floor_repeats)]
    problem.floor = {k: (float(np.mean([v[k] for v in values])), float(np.std([v[k] for v in values])))
                     for k in values[0]}
    return problem


def run_cell(problem, sde, spec: Spec, steps: int, grid: str, seeds: int, extra=None, first_seed: int = 0) -> dict:
    """run_point for seeds first_seed.. (seeds of them): mean and std of each metric (inf if any seed
    diverged)."""
    runs = [run_point(problem, sde, spec, steps, grid, seed, extra) for seed in range(first_seed, first_seed + seeds)]
    cell = {"steps": steps, "nfe": int(round(np.mean([r["nfe"] for r in runs]))),
            "seconds": sum(r["seconds"] for r in runs), "seeds": len(runs)}
    for m in ("mmd2", "sw"):
        values = np.array([r[m] for r in runs])
        finite = np.all(np.isfinite(values))
        cell[m] = float(values.mean()) if finite else math.inf
        cell[m + "_std"] = float(values.std()) if finite else math.inf
    return cell


def run_point(problem, sde, spec: Spec, steps: int, grid: str, seed: int, extra=None) -> dict:
    score = ExactScore(sde, problem.mixture)
    t0 = time.perf_counter()
    res = sample_full(sde, score, (problem.n, problem.mixture.dim), sampler=spec.sampler, steps=steps, grid=grid,
                      backend="numpy", noise="native", seed=seed, **{**spec.options, **(extra or {})})
    x = np.asarray(res.x, dtype=np.float64)
    row = {"steps": steps, "nfe": res.nfe, "seconds": time.perf_counter() - t0}
    if np.all(np.isfinite(x)) and np.abs(x).max() < 1e6:
        row.update(problem.metrics(x, seed))
    else:
        row.update(mmd2=math.inf, sw=math.inf)
    return row


#: The seeded default run: the reference samplers, the best few-step samplers of the one-seed
#: study (exp-heun, PLMC) and gddim. --full adds the rest (heun, pm-one, ams) on every grid.
DEFAULT_SPECS = ("lie-trotter", "strang", "euler-maruyama", "ode-exp-heun", f"pm-bernoulli-K{PM_SUBSTEPS}",
                 "gddim-1", "gddim-2", "gddim-3", "gddim-2-eta0.5", "gddim-2-eta1", "gddim-2-pc-eta0.5")


def plan(dim: int, spec: Spec, grid: str, nfes, everything: bool):
    """Which NFE targets to run (the same plan in 2-D and 64-D). Lie-Trotter on both classic grids
    and Euler-Maruyama on the uniform one at every NFE (the largest defines the bar); the other
    samplers on the quadratic grid up to NFE 50 (the few-step range this benchmark is for);
    gddim-2 also on the uniform and the SDE-derived grids (they decide gddim's default grid)."""
    if everything:
        return list(nfes)
    if spec.label not in DEFAULT_SPECS:
        return []
    if spec.grids:
        return [v for v in nfes if v <= 50] if grid in spec.grids else []
    if spec.label == "lie-trotter" and grid in ("uniform", "quadratic") or \
            spec.label == "euler-maruyama" and grid == "uniform":
        return list(nfes)
    if grid == "quadratic" or spec.label == "gddim-2":
        return [v for v in nfes if v <= 50]
    return []


# ----------------------------------------------------------------------------- analysis


REFERENCE_SAMPLERS = ("lie-trotter", "strang", "euler-maruyama")


def targets(problem, rows_by_key, sde_label, seeds: int):
    """The SDE's 1000-NFE quality (the mean over the reference samplers and grids at the largest
    NFE: DDPM-1000's analogue, and less noisy than the best of many noisy values) and the bar a
    configuration's mean over seeds must clear (BAR_RULE): within 10% of it, or within the MC
    floor of a mean of ``seeds`` values, floor mean + 3 std / sqrt(seeds) (3, not 2: with dozens
    of configurations compared, 2 std would flag exact samplers by chance)."""
    top = max(r["target_nfe"] for r in rows_by_key.values() if r["sde"] == sde_label)
    refs = [r["points"][top] for r in rows_by_key.values()
            if r["sde"] == sde_label and r["spec"] in REFERENCE_SAMPLERS and top in r["points"]]
    ref = {m: float(np.mean([p[m] for p in refs])) for m in ("mmd2", "sw")}
    # ref + 10% of |ref|: MMD^2 estimates can be negative, where 1.1 * ref would be stricter than ref
    bar = {m: max(ref[m] + (BAR_FACTOR - 1) * abs(ref[m]),
                  problem.floor[m][0] + BAR_STDS * problem.floor[m][1] / math.sqrt(seeds)) for m in ref}
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


def fmt_pm(point: dict, metric: str) -> str:
    """mean ± std over the seeds."""
    if not math.isfinite(point[metric]):
        return "diverged"
    return f"{fmt(point[metric], metric)}±{fmt(point.get(metric + '_std', 0.0), metric)}"


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few points, small N")
    ap.add_argument("--dims", default="2,64", help="data dimensions (comma separated)")
    ap.add_argument("--n", type=int, default=None, help="samples per seed (default 1000 in 2-D, 500 in 64-D)")
    ap.add_argument("--full", action="store_true",
                    help="every sampler (heun, pm-one, ams too) on every grid at every NFE (about 5x the time)")
    ap.add_argument("--sdes", default=",".join(SDES))
    ap.add_argument("--nfe", default=",".join(map(str, NFES)))
    ap.add_argument("--seeds", type=int, default=SEEDS, help="seeds per cell (mean ± std over them)")
    ap.add_argument("--metric", choices=("sampled", "exact"), default="sampled",
                    help="sampled: MMD² and SW against N fresh data samples per seed; exact: MMD² against the "
                         "mixture in closed form, SW against 20 000 data samples (a block of its own in --out)")
    ap.add_argument("--specs", default=None,
                    help="only these samplers (comma-separated labels, e.g. lie-trotter,gddim-2; ode-rk45 for "
                         "the adaptive ODE), each on the grids plan() gives it")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "samplers.md")
    ap.add_argument("--plot", type=Path, default=None,
                    help="default docs/samplers_quality.png (--metric exact: docs/samplers_quality_exact.png)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also save the raw numbers here (default: next to --out, samplers_results.json)")
    ap.add_argument("--render-only", action="store_true", help="re-render --out and --plot from --json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="with --render-only: first merge these JSON files (one per --dims/--sdes process run in "
                         "parallel) into --json")
    args = ap.parse_args(argv)
    suffix = "_exact" if args.metric == "exact" else ""
    args.plot = args.plot or REPO / "docs" / f"samplers_quality{suffix}.png"
    json_path = args.json or args.out.with_name(args.out.stem + suffix + "_results.json")
    if args.render_only and args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {**parts[0], "results": {}, "sdes": [], "elapsed": sum(p["elapsed"] for p in parts)}
        if all(part.get("specs") for part in parts):  # the one command that would make all of it
            merged["specs"] = ",".join(dict.fromkeys(s for part in parts for s in part["specs"].split(",")))
        for part in parts:
            merged["sdes"] += [s for s in part["sdes"] if s not in merged["sdes"]]
            for dim, (problem, rows, n) in part["results"].items():
                merged["results"].setdefault(dim, [problem, {}, n])[1].update(rows)
        json_path.write_text(json.dumps(merged, indent=1))
    if args.render_only:
        saved = json.loads(json_path.read_text())
        results = {int(dim): (Problem(**{**p, "data": None, "mixture": None, "bandwidths": tuple(p["bandwidths"])}),
                              {tuple(k.split("|")): v for k, v in rows.items()}, n)
                   for dim, (p, rows, n) in saved["results"].items()}
        for _, rows, _ in results.values():
            for row in rows.values():
                row["points"] = {float(k) if "." in k or "e" in k else int(k): v for k, v in row["points"].items()}
        args.quick, args.seeds, args.metric = saved["quick"], saved.get("seeds", 1), saved.get("metric", "sampled")
        args.specs = saved.get("specs")
        write_outputs(results, saved["nfes"], saved["sdes"], args, saved["elapsed"], None)
        return

    dims = [int(d) for d in args.dims.split(",")]
    sdes = args.sdes.split(",")
    nfes = [int(v) for v in args.nfe.split(",")]
    specs, tolerances = SPECS, TOLERANCES
    wanted = args.specs.split(",") if args.specs else None
    if wanted:
        unknown = sorted(set(wanted) - {s.label for s in SPECS} - {RK45.label})
        if unknown:
            ap.error(f"unknown --specs {', '.join(unknown)}; choose from {', '.join(s.label for s in SPECS + [RK45])}")
        specs = [s for s in SPECS if s.label in wanted]
    if args.quick:
        dims, sdes, nfes = dims[:1], ["vp", "hold3"], [10, 50]
        specs = [s for s in SPECS if s.label in ("lie-trotter", "ode-exp-heun", f"pm-one-K{PM_SUBSTEPS}", "gddim-2")]
        tolerances = (1e-2,)
    started = time.time()
    results = {}
    for dim in dims:
        n = args.n or (200 if args.quick else 1000 if dim <= 2 else 500)
        problem = make_problem(dim, n, 3 if args.quick else 20 if args.metric == "exact" else 8,
                               args.metric == "exact")
        print(f"\n## {problem.name}: N = {n}; floor MMD^2 {problem.floor['mmd2'][0]:.2e} "
              f"+- {problem.floor['mmd2'][1]:.2e}, SW {problem.floor['sw'][0]:.4f} +- {problem.floor['sw'][1]:.4f}",
              flush=True)
        rows = {}
        for sde_label in sdes:
            name, kw = SDES[sde_label]
            sde = get_sde(name, **kw)
            for spec in specs:
                for grid in spec.grids or GRIDS + NOISE_GRIDS:
                    point_nfes = plan(dim, spec, grid, nfes, args.full or args.quick)
                    if not point_nfes:
                        continue
                    key = (sde_label, spec.label, grid)
                    row = rows[key] = {"sde": sde_label, "spec": spec.label, "grid": grid, "points": {},
                                       "target_nfe": max(nfes)}
                    for nfe in point_nfes:
                        p = run_cell(problem, sde, spec, spec.steps_for(nfe), grid, args.seeds)
                        row["points"][nfe] = p
                        print(f"{sde_label:6s} {spec.label:18s} {grid:9s} NFE {p['nfe']:5d} "
                              f"MMD2e3 {fmt_pm(p, 'mmd2'):>14s} SW {fmt_pm(p, 'sw'):>14s} "
                              f"({p['seconds']:.1f}s)", flush=True)
            if wanted and RK45.label not in wanted:
                continue
            key = (sde_label, RK45.label, "adaptive")
            row = rows[key] = {"sde": sde_label, "spec": RK45.label, "grid": "adaptive", "points": {},
                               "target_nfe": max(nfes)}
            for tol in (tolerances if args.quick else (1e-2, 1e-4) if dim <= 2 else (1e-2,)):
                p = run_cell(problem, sde, RK45, 1, "uniform", args.seeds, {"rtol": tol, "atol": tol})
                p["tol"] = tol
                row["points"][tol] = p
                print(f"{sde_label:6s} {RK45.label:18s} tol {tol:<7g} NFE {p['nfe']:5d} "
                      f"MMD2e3 {fmt_pm(p, 'mmd2'):>14s} SW {fmt_pm(p, 'sw'):>14s} ({p['seconds']:.1f}s)",
                      flush=True)
        results[dim] = (problem, rows, n)
    elapsed = time.time() - started
    write_outputs(results, nfes, sdes, args, elapsed, json_path)


def write_outputs(results, nfes, sdes, args, elapsed, json_path) -> None:
    report = render(results, nfes, sdes, args, elapsed)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    begin, end = markers(args.metric)
    if begin in old and end in old:  # keep the hand-written text around the generated block
        report = old[:old.index(begin)] + report + old[old.index(end) + len(end) + 1:]
    elif old:  # a new block (the first --metric exact run) goes at the end
        report = old.rstrip("\n") + "\n\n" + report
    args.out.write_text(report)
    plot(results, nfes, sdes, args.plot)
    if json_path is not None:
        saved = {"quick": args.quick, "seeds": args.seeds, "metric": args.metric, "specs": args.specs, "nfes": nfes, "sdes": sdes, "elapsed": elapsed, "results": {
            dim: ({"name": p.name, "n": p.n, "bandwidths": list(p.bandwidths), "floor": p.floor, "exact": p.exact},
                  {"|".join(k): v for k, v in rows.items()}, n) for dim, (p, rows, n) in results.items()}}
        json_path.write_text(json.dumps(saved, indent=1))
    print(f"wrote {args.out} and {args.plot} ({elapsed / 60:.1f} min of sampling)")


def markers(metric: str) -> tuple[str, str]:
    """The generated block's first and last lines in --out: one block per metric."""
    tag = "" if metric == "sampled" else f" --metric {metric}"
    return (f"<!-- begin: generated by tools/bench_samplers.py{tag}; edit the script, not this block -->",
            f"<!-- end: generated by tools/bench_samplers.py{tag} -->")


def render(results, nfes, sdes, args, elapsed) -> str:
    exact = args.metric == "exact"
    cmd = "nice -n 10 python tools/bench_samplers.py" + (" --quick" if args.quick else "") + \
        (f" --seeds {args.seeds}" if args.seeds != SEEDS else "")
    if exact:
        ns = sorted({n for _, _, n in results.values()})
        cmd = ("OPENBLAS_NUM_THREADS=1 " + cmd + " --metric exact" + f" --dims {','.join(map(str, results))}" +
               f" --sdes {','.join(sdes)} --nfe {','.join(map(str, nfes))}" +
               (f" --n {ns[0]}" if len(ns) == 1 else "") + (f" --specs {args.specs}" if args.specs else ""))
    begin, end = markers(args.metric)
    head = [
        "## Measured: the sharper test (MMD² against the exact mixture)" if exact else
        "## Measured: samplers at equal NFE, with exact scores",
        "",
        f"Command: `{cmd}` ({elapsed / 60:.1f} min on {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}).",
        "",
    ]
    if exact:
        lines = [begin, *head,
                 "The same problems, samplers, seeds and bar rule as the table above, with the reference data",
                 "taken out of the noise: MMD² (×10³, the same kernel) of the N samples against the mixture",
                 "itself, its expectations over the mixture in closed form (`hold_mlx.exact.mmd2_to_mixture`), and",
                 f"sliced W2 against one fixed set of {EXACT_REFERENCE} data samples. The spread over seeds is the",
                 "samples' own; exact samples give MMD² 0 on average (the floor). Every cell is the mean ± std",
                 f"over {args.seeds} seeds. A configuration reaches the SDE's {max(nfes)}-NFE quality when the MEAN "
                 f"of both metrics clears the bar: {BAR_RULE}.", ""]
        return "\n".join(_tables(lines, results, nfes, sdes, args) + [end]) + "\n"
    lines = [
        begin, *head,
        "Every score is exact (`hold_mlx.exact.ExactScore`: a Gaussian mixture pushed through the SDE), so",
        "the numbers measure the samplers alone. Quality is measured against N fresh data samples:",
        "unbiased MMD² (×10³; multi-scale Gaussian kernel, bandwidths h/16, h/8, h/4, h/2, h with h the",
        "median distance between data points; 0 is perfect and small negative values are noise) and sliced",
        "2-Wasserstein distance (256 random directions). *Floor*: the same metric between independent data",
        "sets of the same size (mean ± std). Every cell is the mean ± std over "
        f"{args.seeds} seeds (each seed its own sampler noise and its own reference data set).",
        f"A configuration reaches the SDE's {max(nfes)}-NFE quality when the MEAN of both metrics clears the bar: "
        f"{BAR_RULE}; \"reaches bar at\" is the smallest NFE from which on every larger NFE clears it too.",
        "NFE counts batched score calls, the final denoising call included;",
        f"Poisson midpoint uses K = {PM_SUBSTEPS} substeps and its NFE varies with the coin flips (the table shows",
        "the realised count at each target). AMS: snr 0.16, one corrector step per predictor step, norms per",
        "sample (the library default) or averaged over the batch (score_sde / AMS code). gddim-q: order q,",
        "eta = 0 unless named; it runs on its default quadratic grid, gddim-2 also on the SDE-derived grids",
        "(log-sigma: uniform in log σ_eff; edm: EDM's ρ = 7 schedule in σ_eff); gddim-2-pc-eta0.5 (the",
        "corrector, η = 0.5) on the power-2.5 grid only. Plan (`plan()`): Lie–Trotter",
        "(both grids) and Euler–Maruyama (uniform) at every NFE, the other samplers up to NFE 50 on the",
        "quadratic grid; `--full` adds Heun, PLMC-one and AMS on every grid.",
        "",
    ]
    return "\n".join(_tables(lines, results, nfes, sdes, args) + [end]) + "\n"


def _tables(lines, results, nfes, sdes, args) -> list:
    """``lines`` plus, per dimension and SDE, the bar and the table of cells, and the fewest-NFE summary."""
    for dim, (problem, rows, n) in results.items():
        lines += [f"### {problem.name}", "",
                  f"N = {n} samples per point. Floor: MMD² {fmt(problem.floor['mmd2'][0], 'mmd2')} ± "
                  f"{fmt(problem.floor['mmd2'][1], 'mmd2')} (×10³), SW {problem.floor['sw'][0]:.3f} ± "
                  f"{problem.floor['sw'][1]:.3f}.", ""]
        reach = []
        dim_sdes = [sde for sde in sdes if any(r["sde"] == sde for r in rows.values())]
        for sde_label in dim_sdes:
            best, bar = targets(problem, {k: v for k, v in rows.items() if v["grid"] != "adaptive"}, sde_label,
                                args.seeds)
            lines += [f"#### {sde_label}", "",
                      f"{max(nfes)}-NFE quality (mean of {', '.join(REFERENCE_SAMPLERS)} at NFE {max(nfes)}): "
                      f"MMD² {fmt(best['mmd2'], 'mmd2')}, SW {best['sw']:.3f}; bar: "
                      f"MMD² ≤ {fmt(bar['mmd2'], 'mmd2')}, SW ≤ {bar['sw']:.3f}. Cells: MMD² ×10³ / SW.", "",
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
                    cells.append(f"{fmt_pm(p, 'mmd2')} / {fmt_pm(p, 'sw')}{tag}")
                lines.append(f"| {row['spec']} | {row['grid']} | " + " | ".join(cells) +
                             f" | {actual if actual else '—'} |")
            rk = rows.get((sde_label, RK45.label, "adaptive"))
            cells = [f"tol {p['tol']:g}: NFE {p['nfe']}, {fmt_pm(p, 'mmd2')} / {fmt_pm(p, 'sw')}"
                     for p in rk["points"].values()] if rk else []
            lines += ["", "ode-rk45 (rtol = atol; MMD² ×10³ / SW): " + "; ".join(cells) + ".", ""] if cells else [""]
        reach.sort(key=lambda r: r[0])
        lines += [f"#### Fewest NFE to reach the SDE's {max(nfes)}-NFE quality ({dim}-D, mean over seeds)", "",
                  "| SDE | sampler | grid | NFE (realised) |", "|---|---|---|---|"]
        for sde_label in dim_sdes:  # the five fastest configurations of each SDE
            mine = [r for r in reach if r[1] == sde_label and math.isfinite(r[0])]
            for actual, _, spec, grid, first in mine[:5]:
                lines.append(f"| {sde_label} | {spec} | {grid} | {actual} |")
            if not mine:
                lines.append(f"| {sde_label} | (none within NFE ≤ {max(nfes)}) | | |")
        lines.append("")
    return lines


def plot(results, nfes, sdes, path: Path) -> None:
    """Quality vs NFE: per dimension a row of sliced W2 (log) and a row of MMD^2 (symlog), one
    column per SDE; solid uniform grid, dashed quadratic, dotted RK45; grey band: MC floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(results)
    sdes = [sde for sde in sdes if any(r["sde"] == sde for _, rows, _ in results.values() for r in rows.values())]
    fig, axes = plt.subplots(2 * len(dims), len(sdes), figsize=(4.2 * len(sdes), 3.4 * 2 * len(dims)),
                             squeeze=False)
    labels = sorted({row["spec"] for _, rows, _ in results.values() for row in rows.values()})
    colors = dict(zip(labels, plt.cm.tab20.colors))
    for i, dim in enumerate(dims):
        problem, rows, _ = results[dim]
        for r, (metric, cap, title) in enumerate((("sw", 10.0, "sliced W2"), ("mmd2", 0.1, "MMD² (unbiased)"))):
            mean, std = problem.floor[metric]
            for j, sde_label in enumerate(sdes):
                ax = axes[2 * i + r, j]
                if not any(sde == sde_label for sde, _, _ in rows):  # e.g. an SDE run in one dimension only
                    ax.set_visible(False)
                    continue
                for (sde, spec, grid), row in rows.items():
                    if sde != sde_label:
                        continue
                    pts = sorted(row["points"].values(), key=lambda p: p["nfe"])
                    ys = [min(p[metric], cap) for p in pts]
                    errs = [min(p.get(metric + "_std", 0.0), cap) for p in pts]
                    style = {"uniform": "-", "quadratic": "--", "log-sigma": "-.", "edm": (0, (1, 1))}.get(grid, ":")
                    ax.errorbar([p["nfe"] for p in pts], ys, yerr=errs, ls=style, color=colors[spec], marker="o",
                                ms=2.5, lw=1, elinewidth=0.6, capsize=1.5, label=f"{spec} ({grid})")
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

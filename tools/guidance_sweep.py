#!/usr/bin/env python
"""Classifier-free guidance sweep of a class-conditional Fashion-MNIST model: FD against class agreement.

    python tools/guidance_sweep.py --checkpoint runs/fmnist-hold-cond --guidance 0 0.5 1 2 4 \\
        --n-per-class 100 --steps 100 --seeds 0 1 2 --json docs/guidance_sweep.json --plot docs/guidance_sweep.png

For every guidance weight w and seed it draws --n-per-class samples of each class (labels
0, 0, ..., 1, 1, ...; sample i of a seed is the same on every backend and batch size), and reports
  agreement: the share of samples the project's classifier (weights/fmnist-classifier) assigns to
             the requested class, on average over the classes (and per class);
  FD / KD:   FD-/KD-FMNIST-classifier of all the samples against --n-ref training images;
plus the unconditional ("no label") samples of the same count as a reference row, and the
classifier's accuracy per class on the first --n-test test images: the ceiling of the agreement.
A guided call evaluates the network on twice the batch; the NFE column counts batched calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hold_mlx.checkpoint import weights_digest  # noqa: E402
from hold_mlx.classifier import classifier_logits, load_classifier  # noqa: E402
from hold_mlx.data import load_dataset  # noqa: E402
from hold_mlx.model import load  # noqa: E402
from hold_mlx.quality import quantize_images, reference_images, sample_quality  # noqa: E402


def class_agreement(classifier, images_user: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """{"mean": mean over classes of the share classified as requested, "per_class": [...]}."""
    predicted = classifier_logits(classifier, quantize_images(images_user)).argmax(axis=1)
    per_class = [float(np.mean(predicted[labels == k] == k)) for k in range(num_classes)]
    return {"mean": float(np.mean(per_class)), "per_class": per_class}


def classifier_ceiling(classifier, data_cfg: dict, n_test: int, dataset=None, data_dir=None) -> dict:
    """The classifier's accuracy per class on real test images (the agreement a perfect model gets)."""
    ds = load_dataset(dataset or data_cfg["name"], data_dir=data_dir, split="test")
    n = min(n_test, len(ds))
    return class_agreement(classifier, ds.to_user(ds.data[:n]), ds.labels[:n], int(ds.labels.max()) + 1)


def guidance_sweep(model, weights, *, n_per_class: int, steps: int, seeds=(0,), sampler: str = "lie-trotter",
                   sampler_options: dict | None = None, batch_size: int = 100, classifier=None, reference=None,
                   n_ref: int = 10000, n_test: int = 10000, dataset=None, data_dir=None, progress=None,
                   done=(), unconditional: bool = True) -> dict:
    """The sweep as a dict (rows per w and seed, the unconditional row, the classifier ceiling).

    ``done``: rows of an earlier run with the same settings; their (guidance, seed) cells are kept,
    not redrawn. ``progress(row)`` is called after every new row (to save it, for instance).
    ``unconditional``: also draw the "no label" reference row of every seed."""
    if not model.num_classes:
        raise ValueError("the guidance sweep needs a class-conditional model (hold-mlx train --conditional)")
    data_cfg = model.config["data"]
    if tuple(data_cfg["shape"]) != (28, 28, 1):
        raise ValueError(f"the sweep scores 28x28 grey images with the Fashion-MNIST classifier; the model makes "
                         f"{tuple(data_cfg['shape'])}")
    classifier = classifier if classifier is not None else load_classifier()[0]
    if reference is None:
        reference, _ = reference_images(data_cfg, n_ref, dataset=dataset, data_dir=data_dir)
    labels = np.repeat(np.arange(model.num_classes), n_per_class)
    options = dict(sampler_options or {})
    kept = {(r["guidance"], r["seed"]): r for r in done}
    rows = []

    def cell(w, seed):
        if (w, seed) in kept:
            rows.append(kept[(w, seed)])
            return
        start = time.time()
        guided = {} if w is None else {"labels": labels, "guidance": w}
        drawn = model.sample(len(labels), steps=steps, sampler=sampler, seed=seed, batch_size=batch_size,
                             **options, **guided)
        images = drawn.user_units()
        row = {"guidance": w, "seed": seed, "nfe": drawn.nfe,
               "metrics": sample_quality(images, reference, data_cfg, classifier=classifier, seed=seed)}
        if w is not None:
            row["agreement"] = class_agreement(classifier, images, labels, model.num_classes)
        row["wall_s"] = time.time() - start
        rows.append(row)
        if progress:
            progress(row)

    for seed in seeds:
        for w in [None] * unconditional + [float(w) for w in weights]:
            cell(w, seed)
    ceiling = classifier_ceiling(classifier, data_cfg, n_test, dataset, data_dir)
    return {"classes": model.class_names, "n_per_class": n_per_class, "steps": steps, "sampler": sampler,
            "sampler_options": options, "seeds": list(seeds), "n_ref": len(reference), "rows": rows, "ceiling": ceiling,
            "summary": summarize(rows)}


def summarize(rows) -> list[dict]:
    """Per guidance weight (None: unconditional): FD and agreement, mean and std over the seeds."""
    out = []
    for w in dict.fromkeys(r["guidance"] for r in rows):
        mine = [r for r in rows if r["guidance"] == w]
        fd = [r["metrics"][next(k for k in r["metrics"] if k.startswith("FD"))] for r in mine]
        entry = {"guidance": w, "fd_mean": float(np.mean(fd)), "fd_std": float(np.std(fd)), "seeds": len(mine)}
        if w is not None:
            agree = [r["agreement"]["mean"] for r in mine]
            entry.update(agreement_mean=float(np.mean(agree)), agreement_std=float(np.std(agree)))
        out.append(entry)
    return out


def plot(summary: list[dict], path, ceiling: float | None = None) -> Path:
    """FD (y) against class agreement (x), one point per guidance weight, labelled with w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guided = [s for s in summary if s["guidance"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.errorbar([s["agreement_mean"] for s in guided], [s["fd_mean"] for s in guided],
                xerr=[s["agreement_std"] for s in guided], yerr=[s["fd_std"] for s in guided], marker="o",
                capsize=3)
    for s in guided:
        ax.annotate(f"w={s['guidance']:g}", (s["agreement_mean"], s["fd_mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for s in summary:
        if s["guidance"] is None:
            ax.axhline(s["fd_mean"], color="grey", linestyle=":", label="no label (unconditional)")
    if ceiling is not None:
        ax.axvline(ceiling, color="grey", linestyle="--", label="classifier on test images")
    ax.set_xlabel("class agreement (classifier assigns the requested class)")
    ax.set_ylabel("FD-FMNIST-classifier (lower is better)")
    ax.set_title("classifier-free guidance sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="class-conditional run folder or .safetensors")
    parser.add_argument("--backend", default="mlx", choices=["mlx", "torch", "onnx"])
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sampler", default="lie-trotter")
    parser.add_argument("--order", type=int, default=None, help="gddim's order")
    parser.add_argument("--eta", type=float, default=None, help="gddim's eta")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--no-unconditional", action="store_true", help="skip the 'no label' reference rows")
    parser.add_argument("--n-ref", type=int, default=10000, help="training images the FD compares against")
    parser.add_argument("--n-test", type=int, default=10000, help="test images for the classifier's ceiling")
    parser.add_argument("--classifier", default=None, help="default: weights/fmnist-classifier")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=None,
                        help="results; an existing file of the same settings is resumed (its cells are kept)")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    model = load(args.checkpoint, args.backend)
    options = {k: v for k, v in (("order", args.order), ("eta", args.eta)) if v is not None}
    # the weights' digest: a model retrained at the same path starts a new sweep
    settings = {"checkpoint": str(args.checkpoint), "weights": weights_digest(args.checkpoint),
                "n_per_class": args.n_per_class, "steps": args.steps,
                "sampler": args.sampler, "sampler_options": options, "n_ref": args.n_ref}
    done = []
    if args.json and args.json.exists():
        earlier = json.loads(args.json.read_text())
        if all(earlier.get(k) == v for k, v in settings.items()):
            done = earlier["rows"]
    partial = {**settings, "rows": list(done)}

    def saved(row):
        print(f"w={row['guidance']} seed={row['seed']}: "
              f"{ {k: round(v, 4) for k, v in row['metrics'].items() if isinstance(v, float)} } "
              f"agreement={row.get('agreement', {}).get('mean')} ({row['wall_s']:.0f} s)", file=sys.stderr)
        if args.json:
            partial["rows"].append(row)
            args.json.write_text(json.dumps(partial, indent=1) + "\n")

    result = guidance_sweep(
        model, args.guidance, n_per_class=args.n_per_class, steps=args.steps, seeds=args.seeds, sampler=args.sampler,
        sampler_options=options, batch_size=args.batch_size, classifier=load_classifier(args.classifier)[0],
        n_ref=args.n_ref, n_test=args.n_test, dataset=args.dataset, data_dir=args.data_dir, progress=saved,
        done=done, unconditional=not args.no_unconditional)
    result["checkpoint"] = str(args.checkpoint)
    print("| guidance w | class agreement | FD-FMNIST-classifier |")
    print("|---|---|---|")
    for s in result["summary"]:
        agree = "-" if s["guidance"] is None else f"{s['agreement_mean']:.3f} ± {s['agreement_std']:.3f}"
        name = "no label" if s["guidance"] is None else f"{s['guidance']:g}"
        print(f"| {name} | {agree} | {s['fd_mean']:.3f} ± {s['fd_std']:.3f} |")
    print(f"classifier on test images: {result['ceiling']['mean']:.3f} (per class: "
          f"{', '.join(f'{a:.2f}' for a in result['ceiling']['per_class'])})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result["summary"], args.plot, result["ceiling"]["mean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train the Fashion-MNIST feature network behind FD-/KD-FMNIST-classifier (MLX, CPU is fine).

    nice -n 10 python tools/train_classifier.py [--epochs 12] [--out weights/fmnist-classifier]
    python tools/train_classifier.py --floor-only        # only re-measure the train-vs-test floor

Trains on the 60k training images only (Adam, cosine learning rate, random horizontal flips, a
fixed number of epochs: no model selection on the test set), reports the accuracy on the 10k test
images, then measures the metric floor (the test set scored against the training set) and writes
classifier.safetensors and README.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hold_mlx._mlx import BLAS, configure_cpu, mx, nn, optim  # noqa: E402
from hold_mlx.classifier import (CLASSIFIER_FILE, FashionMNISTClassifier, classifier_logits,  # noqa: E402
                                 load_classifier, save_classifier)
from hold_mlx.data import FASHION_MNIST_DIR, load_dataset  # noqa: E402
from hold_mlx.quality import feature_floor  # noqa: E402


def load_split(split: str, data_dir: str):
    ds = load_dataset("fashion-mnist", data_dir=data_dir, split=split)
    return ((ds.data + 1.0) / 2.0).astype(np.float32), ds.labels.astype(np.int32)  # [0, 1] images


def train(args, x, y, log) -> tuple[FashionMNISTClassifier, float]:
    mx.random.seed(args.seed)
    net = FashionMNISTClassifier()
    steps_per_epoch = len(x) // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = optim.cosine_decay(args.lr, total, end=args.lr * 0.01)
    opt = optim.Adam(learning_rate=schedule)
    value_and_grad = nn.value_and_grad(net, lambda m, xb, yb: nn.losses.cross_entropy(m(xb), yb).mean())
    state = [net.state, opt.state]

    def step(xb, yb):
        loss, grads = value_and_grad(net, xb, yb)
        opt.update(net, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    net.train()
    for epoch in range(args.epochs):
        perm = rng.permutation(len(x))
        losses = []
        for k in range(steps_per_epoch):
            idx = perm[k * args.batch_size:(k + 1) * args.batch_size]
            xb = x[idx]
            flip = rng.random(len(idx)) < 0.5
            xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
            loss = step(mx.array(xb), mx.array(y[idx]))
            mx.eval(state, loss)
            losses.append(float(loss))
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {np.mean(losses):.4f} ({time.time() - start:.0f} s)")
    net.eval()
    return net, time.time() - start


def accuracy(net, x, y) -> float:
    return float((classifier_logits(net, x).argmax(1) == y).mean())


def write_readme(out: Path, info: dict) -> None:
    floor_rows = "\n".join(
        f"| {r['n_test']} | {r['n_ref']} | {r['fd']:.3f} | {r['kd_mean']:.5f} ± {r['kd_std']:.5f} |"
        for r in info["floor"])
    text = f"""# Fashion-MNIST feature network (FD-/KD-FMNIST-classifier)

`{CLASSIFIER_FILE}`: a small MLX CNN whose penultimate layer ({info['hidden']} ReLU features) is the
feature space of `hold-mlx eval --quality` ("FD-FMNIST-classifier", "KD-FMNIST-classifier"; not FID).
Architecture: conv3x3(16)-ReLU-maxpool, conv3x3(32)-ReLU-maxpool, Linear(1568, 128)-ReLU [features],
dropout 0.3, Linear(128, 10); {info['params']} parameters, float32 ({info['size_kb']:.0f} KB).

- Data: Fashion-MNIST from the Debian package `dataset-fashion-mnist` ({FASHION_MNIST_DIR}); trained
  on the 60,000 training images only, random horizontal flips; no model selection on the test set.
- Training: Adam, cosine learning rate {info['lr']} -> {info['lr'] * 0.01:g}, batch {info['batch_size']},
  {info['epochs']} epochs, seed {info['seed']}.
- **Test accuracy: {100 * info['test_accuracy']:.2f}%** on the 10,000 test images
  (train: {100 * info['train_accuracy']:.2f}%).
- Hardware: {info['hardware']}; wall time {info['wall_s'] / 60:.1f} min of training.
- Command: `{info['command']}`

## Metric floor: the test set scored against the training set

A generator that drew fresh images from the data law would score about this (images quantised to
8 bits as in a PNG; KD: mean ± std over subsets of 1000).

| test images | reference (train) images | FD-FMNIST-classifier | KD-FMNIST-classifier |
|---|---|---|---|
{floor_rows}

Re-measure with `python tools/train_classifier.py --floor-only`.
"""
    (out / "README.md").write_text(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "weights" / "fmnist-classifier")
    p.add_argument("--data-dir", default=FASHION_MNIST_DIR)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-only", action="store_true", help="Load the trained classifier; re-measure the floor.")
    args = p.parse_args()
    configure_cpu()  # MLX's buffer cache, CPU streams and BLAS threads

    x_train, y_train = load_split("train", args.data_dir)
    x_test, y_test = load_split("test", args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / CLASSIFIER_FILE
    if args.floor_only:
        net, info = load_classifier(path)
    else:
        net, wall = train(args, x_train, y_train, lambda s: print(s, flush=True))
        n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(net.parameters()))
        info = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "wall_s": wall, "params": int(n_params), "hidden": net.config["hidden"],
                "hardware": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, mlx {mx.__version__} "
                            f"(BLAS {BLAS}), shared with other jobs, nice 10",
                "command": "nice -n 10 python tools/train_classifier.py " + " ".join(
                    f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("epochs", "batch_size", "lr", "seed"))}
        info["test_accuracy"] = accuracy(net, x_test, y_test)
        info["train_accuracy"] = accuracy(net, x_train, y_train)
        print(f"test accuracy {100 * info['test_accuracy']:.2f}%  train {100 * info['train_accuracy']:.2f}%")
        save_classifier(path, net, {k: v for k, v in info.items() if k != "config"})
    info.pop("config", None)
    info["size_kb"] = path.stat().st_size / 1024
    info["floor"] = []
    for n_test in (1000, 10000):
        row = feature_floor(net, x_train, x_test, n_test=n_test, n_ref=10000, seed=args.seed)
        info["floor"].append(row)
        print(f"floor n_test={n_test} n_ref=10000: FD {row['fd']:.4f}  KD {row['kd_mean']:.6f} ± {row['kd_std']:.6f}")
    save_classifier(path, net, {k: v for k, v in info.items()})
    write_readme(args.out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "floor"}, indent=1))


if __name__ == "__main__":
    main()

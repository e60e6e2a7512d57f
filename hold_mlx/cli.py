"""The ``hold-mlx`` command line: sample, train, export, eval, doctor.

The CLI owns everything the library does not do: progress bars, files, and turning the library's
exceptions into one-line errors.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__

SAMPLER_CHOICES = ("lie-trotter", "strang", "euler-maruyama", "exp-euler", "ode", "poisson-midpoint", "ams",
                   "gddim", "heun", "exp-heun", "rk45", "plmc", "plmc-one", "sscs", "em")


GRID_CHOICES = ("uniform", "quadratic", "log-sigma", "edm")


def _gddim_options(sampler: str, order, eta) -> dict:
    """--order/--eta as sampler options; they belong to gddim only."""
    given = {k: v for k, v in (("order", order), ("eta", eta)) if v is not None}
    if given and sampler.lower() != "gddim":
        verb = "apply" if len(given) > 1 else "applies"
        raise click.UsageError(f"--{' and --'.join(given)} {verb} only to --sampler gddim")
    return given


def friendly_errors(fn):
    """Known failures (bad input, missing files, diverged training) become one-line errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .checkpoint import CheckpointError
        from .data import DatasetError
        from .trainloop import TrainingDiverged

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, DatasetError, TrainingDiverged, ValueError, FileNotFoundError,
                PermissionError, RuntimeError, FloatingPointError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        except OSError as err:
            raise click.ClickException(f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")) from err

    return wrapper


def _print_version(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    try:
        from ._mlx import BLAS, mx

        mlx = f"mlx {mx.__version__}, BLAS: {BLAS}"
    except ImportError as err:
        mlx = f"mlx not usable: {err}"
    click.echo(f"hold-mlx {__version__} ({mlx}, Python {platform.python_version()})")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, the MLX build and the BLAS it uses, and exit.")
def main():
    """hold-mlx: high-order Langevin diffusion models (HOLD, CLD, VP) on MLX, PyTorch and onnxruntime.

    \b
    Quick start:
      hold-mlx sample --steps 100              # Fashion-MNIST from the shipped weights -> samples.png
      hold-mlx train --dataset fashion-mnist --sde hold --out runs/hold
      hold-mlx export --out model.onnx         # the score network for onnxruntime
      hold-mlx eval --bpd --quality            # bits/dim and FD/KD-FMNIST-classifier of the shipped model
      hold-mlx doctor                          # what is installed and which BLAS MLX uses
    """


# ----------------------------------------------------------------------------- sample


def _check_out(path: Path, suffixes=(".png", ".npz")) -> Path:
    if path.suffix.lower() not in suffixes:
        raise click.BadParameter(f"must end in {' or '.join(suffixes)}, got {path.name!r}", param_hint="--out")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist", param_hint="--out")
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"folder {parent} is not writable", param_hint="--out")
    return path


def write_samples(path: Path, samples_user: np.ndarray, kind: str) -> None:
    """.npz: key ``samples`` (float32; images (N, H, W, C) in [0, 1]); .png: a grid or scatter."""
    from .checkpoint import atomic_write
    from .images import save_samples_png

    if path.suffix.lower() == ".npz":
        import io

        buffer = io.BytesIO()
        np.savez(buffer, samples=samples_user.astype(np.float32))
        atomic_write(path, buffer.getvalue())
    else:
        save_samples_png(path, samples_user, kind)


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run folder, .safetensors file or (with --backend onnx) .onnx file. Default: the "
                   "Fashion-MNIST HOLD model shipped in weights/.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Sampler steps (network calls: 1 per step for lie-trotter/strang/em, 2 for heun/exp-heun/ams, "
                   "1 to 2 for poisson-midpoint; +1 for the final denoising step; rk45 ignores it).")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES, case_sensitive=False), default="lie-trotter",
              show_default=True, help="Reverse-time integrator (see README: Samplers).")
@click.option("--n", "num", type=click.IntRange(min=1), default=64, show_default=True, help="Number of samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples per batched network call (does not change the samples).")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--grid", "time_grid", type=click.Choice(GRID_CHOICES), default=None,
              help="Time grid (default: uniform; quadratic for gddim); quadratic is denser near the data, "
                   "log-sigma is uniform in the log noise level, edm is EDM's rho-schedule in it.")
@click.option("--backend", type=click.Choice(["mlx", "torch", "onnx"]), default="mlx", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch / onnxruntime.")
@click.option("--noise", type=click.Choice(["portable", "native"]), default="portable", show_default=True,
              help="portable: the same samples on every backend and batch size; native: the backend's RNG.")
@click.option("--substeps", type=click.IntRange(min=1), default=None, help="poisson-midpoint: fine steps per step (K).")
@click.option("--snr", type=float, default=None, help="ams: corrector signal-to-noise ratio.")
@click.option("--norms", type=click.Choice(["sample", "batch"]), default=None,
              help="ams: step-size norms per sample (default; batch-independent) or averaged over the batch "
                   "(score_sde; use it for low-dimensional data).")
@click.option("--order", type=click.IntRange(1, 3), default=None, help="gddim: multistep order (default 2).")
@click.option("--eta", type=float, default=None,
              help="gddim: stochasticity in [0, 1]; 0 the probability-flow ODE (default), 1 the reverse SDE.")
@click.option("--no-denoise", is_flag=True, help="Skip the final noise-free denoising step.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help=".png writes a grid (a scatter plot for 2-D data); .npz writes key 'samples', float32, "
                   "images (N, H, W, C) in [0, 1].")
@friendly_errors
def sample(checkpoint, steps, sampler, num, batch_size, seed, time_grid, backend, device, threads, noise,
           substeps, snr, norms, order, eta, no_denoise, out):
    """Draw samples from a trained model with the reverse-time SDE (or ODE)."""
    from tqdm import tqdm

    from .data import to_user_units
    from .runtime import draw_samples, load_runtime

    out = _check_out(out)
    runtime = load_runtime(checkpoint, backend, device=device, threads=threads)
    options = {"sampler": sampler, "steps": steps, "grid": time_grid, "noise": noise, "denoise": not no_denoise}
    if substeps is not None:
        options["substeps"] = substeps
    if snr is not None:
        options["snr"] = snr
    if norms is not None:
        options["norms"] = norms
    options.update(_gddim_options(sampler, order, eta))
    batches = -(-num // batch_size)
    adaptive = sampler.lower() in ("rk45",)
    with tqdm(total=None if adaptive else steps * batches, unit="step", desc=f"sampling ({backend})",
              disable=None, leave=False) as bar:
        samples, nfe = draw_samples(runtime, num, batch_size=batch_size, seed=seed, progress=bar.update, **options)
    user = to_user_units(samples, runtime.config["data"])
    write_samples(out, user, runtime.data_kind)
    click.echo(f"wrote {num} samples to {out} ({sampler}, {nfe} network calls per batch, backend {backend})")


# ----------------------------------------------------------------------------- train


def _parse_assignments(items, what: str) -> dict:
    """key=value pairs; values parsed as JSON when they can be (numbers, lists, true/false)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint=what)
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


_TRAIN_OPTION_FIELDS = {
    "dataset": "dataset", "data_dir": "data_dir", "image_size": "image_size", "sde": "sde", "net": "net",
    "steps": "steps", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "ema_decay": "ema_decay", "weighting": "weighting", "mixed_score": "mixed_score",
    "hflip": "hflip", "seed": "seed", "save_every": "save_every", "sample_every": "sample_every",
    "sample_steps": "sample_steps", "compile": "compile", "backend": "backend", "device": "device", "amp": "amp",
    "channels_last": "channels_last",
}


def _preview(trainer, step: int) -> str:
    """A 6x6 grid (or scatter plot) from the EMA weights, written into the run folder."""
    from .api import sample_full
    from .data import to_user_units
    from .images import save_samples_png

    score_fn, ops = trainer.ema_score_model()
    n = 36 if trainer.data.kind == "image" else 2000
    result = sample_full(trainer.sde, score_fn, (n, *trainer.data.shape), ops=ops, steps=trainer.cfg.sample_steps,
                         seed=trainer.cfg.seed)
    samples = to_user_units(ops.to_numpy(result.x), trainer.data.config())
    path = trainer.out / f"samples_{step:07d}.png"
    save_samples_png(path, samples, trainer.data.kind)
    return str(path)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run folder. If it holds a run, training resumes where it stopped (options you do not "
                   "give are taken from the run; --steps may be raised).")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist, digits, cifar10, checkerboard, swiss-roll, 8gaussians, rings, an image "
                   "folder, or a .npy file of points (N, d).")
@click.option("--data-dir", default=None, help="Folder of the dataset files (fashion-mnist default: "
                                                "/usr/share/datasets/fashion-mnist; mnist and cifar10 need it).")
@click.option("--image-size", type=int, default=None, help="Resize an image folder to this size.")
@click.option("--sde", type=click.Choice(["vp", "cld", "hold"]), default="hold", show_default=True)
@click.option("--order", type=click.IntRange(min=1), default=None, help="HOLD order n (default 3).")
@click.option("--sde-param", multiple=True, metavar="KEY=VALUE",
              help="SDE override, repeatable: e.g. T=5, L_inv=0.5, beta=4 (see hold_mlx.get_sde).")
@click.option("--net", default="fashion-mnist", show_default=True,
              help="Network preset: tiny, digits, fashion-mnist, cifar10, mlp, mlp-tiny.")
@click.option("--net-param", multiple=True, metavar="KEY=VALUE",
              help="Network override, repeatable: e.g. channels=64, channel_mult=[1,2,2].")
@click.option("--steps", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="> 0 uses AdamW.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--ema-decay", type=float, default=0.999, show_default=True)
@click.option("--weighting", type=click.Choice(["eps", "likelihood"]), default="eps", show_default=True)
@click.option("--mixed-score/--no-mixed-score", default=True, show_default=True)
@click.option("--hflip", is_flag=True, help="Random horizontal flips.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write a preview grid every N steps (0: only at the end).")
@click.option("--sample-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--compile/--no-compile", default=True, show_default=True,
              help="mx.compile the MLX step; torch.compile on CUDA.")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="torch only.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
              help="torch: mixed precision for the network (bf16 on CUDA or CPU; fp16 with loss scaling, CUDA).")
@click.option("--channels-last", is_flag=True, help="torch: channels_last memory format.")
@click.pass_context
@friendly_errors
def train(ctx, out, order, sde_param, net_param, **options):
    """Train a score model by block-coordinate score matching (resumable)."""
    from tqdm import tqdm

    from .checkpoint import STATE_FILE, read_config
    from .trainloop import TrainConfig

    given = {name for name in options
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    sde_params = _parse_assignments(sde_param, "--sde-param")
    if order is not None:
        sde_params["order"] = order
    net_params = _parse_assignments(net_param, "--net-param")
    resuming = (out / STATE_FILE).exists()
    if resuming:
        stored = TrainConfig.from_dict(read_config(out / STATE_FILE).get("train", {})).to_dict()
        values = {**stored, **{_TRAIN_OPTION_FIELDS[k]: options[k] for k in given}}
        if sde_params:
            values["sde_params"] = sde_params
        if net_params:
            values["net_params"] = net_params
    else:
        values = {_TRAIN_OPTION_FIELDS[k]: v for k, v in options.items()}
        values.update(sde_params=sde_params, net_params=net_params)
    cfg = TrainConfig.from_dict(values)
    if cfg.backend == "torch":
        try:
            from hold_export.torch_train import TorchTrainer as TrainerClass
        except ImportError as err:
            raise click.ClickException(f"--backend torch needs PyTorch ({err}); pip install 'hold-mlx[torch]'")
    else:
        if cfg.device != "cpu":
            raise click.BadParameter("the MLX backend picks its own device; --device is for --backend torch",
                                     param_hint="--device")
        from .train import Trainer as TrainerClass

    trainer = TrainerClass(cfg, out)
    if trainer.rank == 0:
        what = f"resuming at step {trainer.step}" if resuming else "new run"
        click.echo(f"{out}: {what}; {cfg.sde} order {trainer.sde.order} on {trainer.data.name} "
                   f"{trainer.data.shape}, {cfg.backend} backend, {trainer.world} process(es)")
    bar = tqdm(total=cfg.steps, initial=trainer.step, unit="step", disable=None if trainer.rank == 0 else True,
               dynamic_ncols=True)
    with bar:
        for info in trainer.run(preview=_preview):
            bar.update(1)
            bar.set_postfix(loss=f"{info.loss:.4f}", img_s=f"{info.images_per_s:.0f}", refresh=False)
            if info.preview:
                bar.write(f"step {info.step}: preview {info.preview}")
    if trainer.rank == 0:
        if trainer.interrupted:
            click.echo(f"stopped at step {trainer.step}; checkpoint saved. Run the same command to resume.")
        else:
            click.echo(f"done: step {trainer.step}; model in {out / 'model.safetensors'}")


# ----------------------------------------------------------------------------- export


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run folder or .safetensors file. Default: the model shipped in weights/.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("model.onnx"), show_default=True,
              help="The .onnx file to write; it carries the SDE, data and network config in its metadata.")
@click.option("--opset", type=click.IntRange(min=18), default=None,
              help="ONNX opset (default: the torch exporter's recommended one).")
@click.option("--fp16", is_flag=True, help="fp16 weights and activations (for GPU runtimes; on the CPU it is no "
                                           "faster, see docs/onnx.md). Inputs and outputs stay float32.")
@friendly_errors
def export(checkpoint, out, opset, fp16):
    """Export the score network to ONNX for onnxruntime (checked against torch before writing)."""
    _check_out(out, (".onnx",))
    try:
        from hold_export.onnx_export import export_onnx
    except ImportError as err:
        raise click.ClickException(f"export needs PyTorch and ONNX ({err}); pip install 'hold-mlx[torch,onnx]'")
    report = export_onnx(checkpoint, out, opset=opset, fp16=fp16)
    checks = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.errors.items())
    click.echo(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}, {report.precision}); "
               f"onnxruntime matches torch ({checks})")
    click.echo(f"sample with: hold-mlx sample --backend onnx --checkpoint {report.path}")


# ----------------------------------------------------------------------------- eval


def _test_data(data_cfg: dict, n: int, dataset, data_dir) -> tuple[np.ndarray, str]:
    """The first n test examples of the model's dataset, in user units."""
    from .data import load_dataset

    name = dataset or data_cfg.get("name")
    ds = load_dataset(name, data_dir=data_dir, split="test")
    if list(ds.shape) != list(data_cfg["shape"]):
        raise ValueError(f"dataset {name!r} has shape {ds.shape}, the model takes {tuple(data_cfg['shape'])}; "
                         "pass the model's --dataset")
    n = min(n, len(ds))
    return ds.to_user(ds.data[:n]), f"{ds.name} test (first {n})"


def _print_table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        click.echo(f"{name:<{width}}  {value:>12}  {note}")


@main.command(name="eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run folder or .safetensors file. Default: the Fashion-MNIST HOLD model shipped in weights/.")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--bpd", is_flag=True, help="Likelihood of test data: bits/dim (images) or nats (points).")
@click.option("--n-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="--bpd: test examples (the first N of the test split).")
@click.option("--estimator", type=click.Choice(["hutchinson", "exact"]), default="hutchinson", show_default=True,
              help="--bpd: trace estimator; exact costs d network passes per step (points only).")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="--bpd: RK45 relative tolerance.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="--bpd: RK45 absolute tolerance.")
@click.option("--quality", is_flag=True, help="Sample quality: FD/KD against the training data (FID/KID too "
                                              "with --fid-weights).")
@click.option("--n-samples", type=click.IntRange(min=2), default=1000, show_default=True,
              help="--quality: samples to draw.")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES, case_sensitive=False), default="lie-trotter",
              show_default=True, help="--quality: the sampler that draws the samples.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="--quality: sampler steps.")
@click.option("--grid", "time_grid", type=click.Choice(GRID_CHOICES), default=None,
              help="--quality: sampler time grid (default: uniform; quadratic for gddim).")
@click.option("--order", type=click.IntRange(1, 3), default=None, help="--quality, gddim: multistep order (2).")
@click.option("--eta", type=float, default=None, help="--quality, gddim: 0 the ODE (default), 1 the reverse SDE.")
@click.option("--samples", "samples_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="--quality: score these samples (.npz key 'samples', user units, as `sample --out` writes) "
                   "instead of drawing new ones.")
@click.option("--n-ref", type=click.IntRange(min=2), default=10000, show_default=True,
              help="--quality: reference images from the training split (a fixed random subset).")
@click.option("--classifier", type=click.Path(path_type=Path), default=None,
              help="Feature network for FD/KD-FMNIST-classifier. Default: weights/fmnist-classifier/.")
@click.option("--fid-weights", type=click.Path(path_type=Path), default=None,
              help="Path of pt_inception-2015-12-05-6726825d.pth (needs torch): adds real FID and KID.")
@click.option("--dataset", default=None, help="Dataset of the test/reference data (default: the checkpoint's).")
@click.option("--data-dir", default=None, help="Folder of the dataset files.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the report as JSON here.")
@friendly_errors
def eval_command(checkpoint, backend, device, threads, bpd, n_images, estimator, rtol, atol, quality, n_samples,
                 sampler, steps, time_grid, order, eta, samples_file, n_ref, classifier, fid_weights, dataset,
                 data_dir, batch_size, seed, out):
    """Measure a model: likelihood (--bpd) and/or sample quality (--quality).

    \b
    Examples:
      hold-mlx eval --bpd --n-images 256 --out bpd.json
      hold-mlx eval --quality --n-samples 10000 --sampler lie-trotter --steps 100
      hold-mlx eval --quality --fid-weights ~/pt_inception-2015-12-05-6726825d.pth
    """
    import time

    from tqdm import tqdm

    from .data import to_user_units
    from .runtime import draw_samples, load_runtime

    quality = quality or fid_weights is not None or samples_file is not None
    if not (bpd or quality):
        raise click.UsageError("nothing to measure: pass --bpd and/or --quality")
    if out is not None:
        _check_out(out, (".json",))
    runtime = load_runtime(checkpoint, backend, device=device, threads=threads)
    data_cfg = runtime.config["data"]
    from .checkpoint import default_checkpoint

    report = {"checkpoint": str(checkpoint or default_checkpoint()), "backend": backend, "sde": runtime.sde.to_config(),
              "data": data_cfg}
    rows = []
    fid_net = None
    if fid_weights is not None:  # fail on a missing or wrong file before any long computation
        try:
            from hold_export.fid_inception import load_fid_inception
        except ImportError as err:
            raise click.ClickException(f"--fid-weights needs PyTorch ({err}); pip install 'hold-mlx[torch]'")
        fid_net = load_fid_inception(fid_weights, device=device)
    classifier_net = None
    if quality and data_cfg["kind"] == "image":
        if tuple(data_cfg["shape"]) == (28, 28, 1):
            from .classifier import load_classifier

            classifier_net = load_classifier(classifier)[0]
        elif fid_net is None:
            raise ValueError(f"the offline metrics use a Fashion-MNIST classifier (28x28x1 images) and this model "
                             f"makes {tuple(data_cfg['shape'])}; pass --fid-weights for FID/KID")

    if bpd:
        from .likelihood import evaluate_likelihood

        data, source = _test_data(data_cfg, n_images, dataset, data_dir)
        start = time.time()
        with tqdm(total=len(data), unit="img", desc=f"likelihood ({backend})", disable=None, leave=False) as bar:
            def progress(done, t):
                bar.update(done - bar.n)
                bar.set_postfix(t=f"{t:.3g}", refresh=False)

            res = evaluate_likelihood(runtime.sde, runtime.score_fn, runtime.ops, data, data_cfg, seed=seed,
                                      batch_size=batch_size, estimator=estimator, rtol=rtol, atol=atol,
                                      progress=progress)
        report["likelihood"] = {"unit": res.unit, "mean": res.mean, "stderr": res.stderr, "n": len(res.values),
                                "data": source, "estimator": estimator, "rtol": rtol, "atol": atol,
                                "t0": runtime.sde.eps_loss, "nfe_per_batch": res.nfe, "seed": seed,
                                "wall_s": time.time() - start}
        rows.append((res.unit, f"{res.mean:.4f}", f"± {res.stderr:.4f} (s.e., {source}, "
                                                   f"NFE {int(np.mean(res.nfe))}/batch)"))

    if quality:
        from .quality import reference_images, sample_quality

        start = time.time()
        if samples_file is not None:
            with np.load(samples_file) as f:
                if "samples" not in f:
                    raise ValueError(f"{samples_file}: no 'samples' array (write it with hold-mlx sample --out x.npz)")
                samples = np.asarray(f["samples"], np.float32)
            if samples.shape[1:] != tuple(data_cfg["shape"]):
                raise ValueError(f"{samples_file}: samples of shape {samples.shape[1:]}, the model makes "
                                 f"{tuple(data_cfg['shape'])}")
            how = {"samples_file": str(samples_file)}
        else:
            from .samplers import resolve_sampler

            grid = time_grid or getattr(resolve_sampler(sampler)[1], "default_grid", "uniform")
            options = {"sampler": sampler, "steps": steps, "grid": grid, **_gddim_options(sampler, order, eta)}
            batches = -(-n_samples // batch_size)
            adaptive = sampler.lower() == "rk45"
            with tqdm(total=None if adaptive else steps * batches, unit="step", desc=f"sampling ({backend})",
                      disable=None, leave=False) as bar:
                drawn, nfe = draw_samples(runtime, n_samples, batch_size=batch_size, seed=seed,
                                          progress=bar.update, **options)
            samples = to_user_units(drawn, data_cfg)
            how = {**options, "nfe": nfe, "seed": seed}
        reference, ref_source = reference_images(data_cfg, n_ref, dataset=dataset, data_dir=data_dir, seed=seed)
        metrics = sample_quality(samples, reference, data_cfg, classifier=classifier_net, fid_net=fid_net, seed=seed)
        report["quality"] = {**how, "n_samples": len(samples), "reference": ref_source, "metrics": metrics,
                             "wall_s": time.time() - start}
        for name, value in metrics.items():
            if isinstance(value, dict):
                rows.append((name, f"{value['mean']:.5f}", f"± {value['std']:.5f} (std over {value['subsets']} "
                                                           f"subsets of {value['subset_size']})"))
            else:
                rows.append((name, f"{value:.4f}", f"({len(samples)} samples vs {ref_source})"))
        if "nfe" in how:
            rows.append(("NFE", str(how["nfe"]), f"({sampler}, {steps} steps)"))

    _print_table(rows)
    if out is not None:
        from .checkpoint import atomic_write

        atomic_write(out, (json.dumps(report, indent=1, default=float) + "\n").encode())
        click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------- doctor


@main.command()
def doctor():
    """Report versions, the BLAS MLX uses, the native CPU kernels (built here on first use),
    devices, datasets and shipped weights."""
    rows = [("hold-mlx", __version__), ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", f"{platform.system()} {platform.machine()}")]
    try:
        from ._mlx import BLAS, BLAS_NOTE, mx

        rows += [("mlx", f"{mx.__version__}, default device {mx.default_device()}"), ("mlx BLAS", f"{BLAS} ({BLAS_NOTE})")]
        from ._mlx import describe_cpu_tuning

        rows.append(("mlx CPU tuning", describe_cpu_tuning()))
        from . import fastops, native

        if fastops.enabled():
            built = native.status()
            rows.append(("mlx native kernels", ("built: " if built.available else "unavailable: ") + built.detail))
        else:
            rows.append(("mlx native kernels", "not used (MLX's own kernels are the fast ones here)"))
    except ImportError as err:
        rows.append(("mlx", f"not usable: {err}"))
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no CUDA"
        rows.append(("torch", f"{torch.__version__} ({cuda}, {torch.get_num_threads()} threads)"))
    except ImportError:
        rows.append(("torch", "not installed (pip install 'hold-mlx[torch]')"))
    try:
        import onnxruntime

        rows.append(("onnxruntime", f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"))
    except ImportError:
        rows.append(("onnxruntime", "not installed (pip install 'hold-mlx[onnx]')"))
    from .data import FASHION_MNIST_DIR

    fm = Path(FASHION_MNIST_DIR)
    rows.append(("fashion-mnist", str(fm) if fm.is_dir() else "missing: apt-get install dataset-fashion-mnist"))
    try:
        from .checkpoint import default_checkpoint

        rows.append(("shipped weights", str(default_checkpoint())))
    except ValueError as err:
        rows.append(("shipped weights", str(err)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="hold-mlx")

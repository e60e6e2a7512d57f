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
import warnings
from pathlib import Path

import click
import numpy as np

from . import __version__

from .machine import cpu_count, max_threads
from .model import DEFAULT_GUIDANCE
from .parameterisation import WEIGHTINGS
from .samplers import ALIASES, GRIDS, SAMPLERS, check_grid
from .sde import SDE_NAMES
from .trainloop import TrainConfig

#: The library's registries and defaults, not copies of them.
SAMPLER_CHOICES = (*SAMPLERS, *ALIASES)
GRID_METAVAR = "[" + "|".join(GRIDS) + "|power-R]"
_TRAIN = TrainConfig()


def _gddim_options(sampler: str, order, eta, corrector=None) -> dict:
    """--order/--eta/--corrector as sampler options; they belong to gddim only."""
    given = {k: v for k, v in (("order", order), ("eta", eta), ("corrector", corrector)) if v is not None}
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
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (CheckpointError, DatasetError, TrainingDiverged, ValueError, FileNotFoundError,
                PermissionError, RuntimeError, FloatingPointError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        except OSError as err:
            raise click.ClickException(f"{err.filename or ''}: {err.strerror or err}".lstrip(": ")) from err
        except MemoryError as err:
            raise click.ClickException("out of memory: use a smaller --batch-size, --n or network") from err

    return wrapper


# ----------------------------------------------------------------------------- option ranges

#: Most sampler steps: beyond this samples do not improve and the per-step arrays grow without use.
MAX_SAMPLE_STEPS = 100_000




def _check_threads(ctx, param, value):
    if value is not None and value > max_threads():
        raise click.BadParameter(f"at most {max_threads()} (4x the {cpu_count()} cores, at least 64): more "
                                 "threads than cores only add overhead", ctx=ctx, param=param)
    return value


def _positive_finite(ctx, param, value):
    if value is not None and not (np.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}", ctx=ctx, param=param)
    return value


def _time_grid(ctx, param, value):
    try:
        return None if value is None else check_grid(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def _check_sample_memory(model, num: int, batch_size: int) -> None:
    """Refuse --n / --batch-size that cannot fit in memory, before sampling starts."""
    from .netconfig import NetConfig
    from .machine import physical_memory_bytes
    from .trainloop import estimate_train_bytes

    have = physical_memory_bytes()
    size = int(np.prod(model.data_shape))
    held = 2 * 4.0 * num * size  # model-space samples and their user-unit copy
    if held > have / 2:
        raise click.BadParameter(f"{num} samples of {size} values need about {held / 2**30:.0f} GiB and this "
                                 f"machine has {have / 2**30:.0f} GiB; draw fewer per call (several --seed)",
                                 param_hint="--n")
    try:
        net_cfg = NetConfig.from_dict(model.config["net"])
    except (KeyError, TypeError, ValueError):
        return
    order = int(model.config["net"].get("order", 1))
    need = estimate_train_bytes(net_cfg, model.data_shape, min(batch_size, num), training=False) \
        + 4.0 * 8 * order * size * min(batch_size, num)  # sampler state and its temporaries
    if need > have / 2:
        raise click.BadParameter(f"a batch of {batch_size} needs at least {need / 2**30:.0f} GiB and this machine "
                                 f"has {have / 2**30:.0f} GiB; use a smaller --batch-size", param_hint="--batch-size")


def _check_finite_samples(samples: np.ndarray, checkpoint) -> None:
    from .evaluate import non_finite_rows

    bad = non_finite_rows(samples)
    if bad:
        raise click.ClickException(f"{bad} of {len(samples)} samples are NaN or Inf (checkpoint "
                                   f"{checkpoint or 'shipped'}); nothing was written: try more --steps or another "
                                   "--sampler, or retrain the model with a lower --lr")


def _print_version(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    try:
        from ._mlx import BLAS, mx

        mlx = f"mlx {mx.__version__}, BLAS: {BLAS}"
    except (ImportError, ValueError, OSError) as err:
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
    # The commands check the samples themselves and stop with one Error: line; the library's
    # warning for Python callers would only repeat it.
    warnings.filterwarnings("ignore", message=".*samples contain NaN or Inf", category=RuntimeWarning)


# ----------------------------------------------------------------------------- sample


def _check_out(path: Path, suffixes=(".png", ".npz")) -> Path:
    if path.suffix.lower() not in suffixes:
        raise click.BadParameter(f"must end in {' or '.join(suffixes)}, got {path.name!r}", param_hint="--out")
    if path.is_dir():
        raise click.BadParameter(f"{path} is a folder; give a file name", param_hint="--out")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(f"folder {parent} does not exist", param_hint="--out")
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"folder {parent} is not writable", param_hint="--out")
    return path


def write_samples(path: Path, samples_user: np.ndarray, kind: str, labels: np.ndarray | None = None,
                  ncols: int | None = None) -> None:
    """.npz: key ``samples`` (float32; images (N, H, W, C) in [0, 1]) and, for a class-conditional
    draw, ``labels`` (int64 (N,)); .png: a grid (``ncols`` columns) or scatter."""
    from .checkpoint import atomic_write
    from .images import save_samples_png

    if path.suffix.lower() == ".npz":
        import io

        buffer = io.BytesIO()
        extra = {} if labels is None else {"labels": np.asarray(labels, np.int64)}
        np.savez(buffer, samples=samples_user.astype(np.float32), **extra)
        atomic_write(path, buffer.getvalue())
    else:
        save_samples_png(path, samples_user, kind, ncols=ncols)


def class_labels(model, class_option: str | None, num: int) -> tuple[np.ndarray | None, int | None]:
    """``--class`` -> (per-sample labels or None, grid columns). Not given: class-balanced for a
    class-conditional model (sample i gets class i mod K; in the measurements this beats the
    "no label" class by far), nothing for an unconditional one; "none": the "no label" class;
    "all": one grid row per class with num // classes (at least 1) samples each; else one class
    (name or index) for all ``num`` samples."""
    if class_option is None:
        return (np.arange(num, dtype=np.int64) % model.num_classes, None) if model.num_classes else (None, None)
    if not model.num_classes:
        raise click.UsageError("--class: this model is unconditional (trained without --conditional); "
                               "sample it without --class and --guidance")
    option = class_option.strip()
    if option.lower() == "none":
        return None, None
    if option.lower() == "all":
        per_class = max(1, num // model.num_classes)
        return np.repeat(np.arange(model.num_classes), per_class), per_class
    return np.full(num, model.class_index(option), dtype=np.int64), None


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run folder, .safetensors file or (with --backend onnx) .onnx file. Default: the "
                   "Fashion-MNIST HOLD model shipped in weights/.")
@click.option("--steps", type=click.IntRange(min=1, max=MAX_SAMPLE_STEPS), default=100, show_default=True,
              help="Sampler steps (network calls: 1 per step for lie-trotter/strang/em/gddim, 2 for heun/exp-heun/ams, "
                   "1 to 2 for poisson-midpoint; +1 for the final denoising step; rk45 ignores it).")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES, case_sensitive=False), default="lie-trotter",
              show_default=True, help="Reverse-time integrator (see README: Samplers).")
@click.option("--n", "num", type=click.IntRange(min=1), default=64, show_default=True, help="Number of samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples per batched network call (does not change the samples).")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--grid", "time_grid", default=None, metavar=GRID_METAVAR, callback=_time_grid,
              help="Time grid (default: uniform; quadratic for gddim); quadratic is denser near the data, "
                   "power-R (R in [1, 10], e.g. power-2.5) more so, log-sigma is uniform in the log noise "
                   "level, edm is EDM's rho-schedule in it.")
@click.option("--backend", type=click.Choice(["mlx", "torch", "onnx"]), default="mlx", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=_check_threads,
              help="CPU threads (MLX streams, torch, onnxruntime).")
@click.option("--noise", type=click.Choice(["portable", "native"]), default="portable", show_default=True,
              help="portable: the same samples on every backend and batch size; native: the backend's RNG.")
@click.option("--substeps", type=click.IntRange(min=1, max=1000), default=None,
              help="poisson-midpoint: fine steps per step (K, at most 1000).")
@click.option("--snr", type=float, default=None, callback=_positive_finite, help="ams: corrector signal-to-noise ratio.")
@click.option("--norms", type=click.Choice(["sample", "batch"]), default=None,
              help="ams: step-size norms per sample (default; batch-independent) or averaged over the batch "
                   "(score_sde; use it for low-dimensional data).")
@click.option("--order", type=click.IntRange(1, 3), default=None, help="gddim: multistep order (default 2).")
@click.option("--eta", type=float, default=None,
              help="gddim: stochasticity in [0, 1]; 0 the probability-flow ODE (default), 1 the reverse SDE.")
@click.option("--corrector/--no-corrector", default=None,
              help="gddim: redo each step with the call made at its end (UniPC's corrector; no extra call, "
                   "one order more).")
@click.option("--no-denoise", is_flag=True, help="Skip the final noise-free denoising step.")
@click.option("--class", "class_option", default=None, metavar="NAME|INDEX|all|none",
              help="Class-conditional models: draw this class (a name such as 'Ankle boot', or an index); "
                   "'all': one grid row per class, --n // classes samples each; 'none': the 'no label' "
                   "(unconditional) score. Default: class-balanced (sample i gets class i mod classes).")
@click.option("--guidance", type=float, default=None, metavar="W",
              help="Classifier-free guidance weight w of a class-conditional model: score = (1 + w) s(u, t, class) "
                   "- w s(u, t); each network call then evaluates the network on twice the batch. 0: the plain "
                   f"conditional model. Default {DEFAULT_GUIDANCE:g} (measured: docs/results.md).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help=".png writes a grid (a scatter plot for 2-D data); .npz writes key 'samples', float32, "
                   "images (N, H, W, C) in [0, 1] (and 'labels' when a conditional model draws classes).")
@friendly_errors
def sample(checkpoint, steps, sampler, num, batch_size, seed, time_grid, backend, device, threads, noise,
           substeps, snr, norms, order, eta, corrector, no_denoise, class_option, guidance, out):
    """Draw samples from a trained model with the reverse-time SDE (or ODE)."""
    from tqdm import tqdm

    from .model import load

    out = _check_out(out)
    model = load(checkpoint, backend, device=device, threads=threads)
    labels, ncols = class_labels(model, class_option, num)
    if guidance is not None and labels is None:
        raise click.UsageError("--guidance needs class labels: a class-conditional model and a --class other "
                               "than 'none'")
    num = num if labels is None else len(labels)
    _check_sample_memory(model, num, batch_size)
    options = {"sampler": sampler, "steps": steps, "grid": time_grid, "noise": noise, "denoise": not no_denoise}
    if labels is not None:
        options.update(labels=labels, guidance=guidance)
    if substeps is not None:
        options["substeps"] = substeps
    if snr is not None:
        options["snr"] = snr
    if norms is not None:
        options["norms"] = norms
    options.update(_gddim_options(sampler, order, eta, corrector))
    batches = -(-num // batch_size)
    adaptive = sampler.lower() in ("rk45",)
    with tqdm(total=None if adaptive else steps * batches, unit="step", desc=f"sampling ({backend})",
              disable=None, leave=False) as bar:
        drawn = model.sample(num, batch_size=batch_size, seed=seed, callback=lambda *step: bar.update(1), **options)
    _check_finite_samples(drawn.x, checkpoint)
    write_samples(out, drawn.user_units(), model.data_kind, drawn.labels, ncols)
    conditioned = "" if labels is None else f", guidance {drawn.guidance:g}: each call runs the batch twice"
    click.echo(f"wrote {num} samples to {out} ({sampler}, {drawn.nfe} network calls per batch{conditioned}, "
               f"backend {backend})")


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




def _preview(trainer, step: int) -> str:
    """A 6x6 grid (or scatter plot) from the EMA weights, written into the run folder; a
    class-conditional model: one row of 6 per class (the first 10 classes), default guidance."""
    from .data import to_user_units
    from .images import save_samples_png

    model = trainer.ema_score_model()
    n = 36 if trainer.data.kind == "image" else 2000
    labels, ncols = None, None
    if model.num_classes and trainer.data.kind == "image":  # one row per class (at most 10), guided
        ncols = 6
        labels = np.repeat(np.arange(min(model.num_classes, 10)), ncols)
        n = len(labels)
    drawn = model.sample(n, batch_size=n, steps=trainer.cfg.sample_steps, seed=trainer.cfg.seed, labels=labels)
    samples = to_user_units(drawn.x, trainer.data.config())
    path = trainer.out / f"samples_{step:07d}.png"
    save_samples_png(path, samples, trainer.data.kind, ncols=ncols)
    return str(path)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run folder. If it holds a run, training resumes where it stopped (options you do not "
                   "give are taken from the run; --steps may be raised).")
@click.option("--dataset", default=_TRAIN.dataset, show_default=True,
              help="fashion-mnist, mnist, digits, cifar10, checkerboard, swiss-roll, 8gaussians, rings, an image "
                   "folder, or a .npy file of points (N, d).")
@click.option("--data-dir", default=None, help="Folder of the dataset files (fashion-mnist default: "
                                                "/usr/share/datasets/fashion-mnist; mnist and cifar10 need it).")
@click.option("--image-size", type=int, default=None, help="Resize an image folder to this size.")
@click.option("--sde", type=click.Choice(SDE_NAMES), default=_TRAIN.sde, show_default=True)
@click.option("--order", type=click.IntRange(min=1, max=8), default=None,
              help="HOLD order n (default 3; at most 8: the state holds n copies of the data).")
@click.option("--sde-param", multiple=True, metavar="KEY=VALUE",
              help="SDE override, repeatable: e.g. T=5, L_inv=0.5, beta=4 (see hold_mlx.get_sde).")
@click.option("--net", default=_TRAIN.net, show_default=True,
              help="Network preset: tiny, digits, fashion-mnist, cifar10, mlp, mlp-tiny; auto picks it from "
                   "the data: mlp for points, the preset of a known image set (fashion-mnist, mnist, digits, "
                   "cifar10), for an image folder digits (<= 16 px), fashion-mnist (<= 28 px) or cifar10.")
@click.option("--net-param", multiple=True, metavar="KEY=VALUE",
              help="Network override, repeatable: e.g. channels=64, channel_mult=[1,2,2].")
@click.option("--steps", type=click.IntRange(min=1), default=_TRAIN.steps, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_TRAIN.batch_size, show_default=True)
@click.option("--lr", type=float, default=_TRAIN.lr, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=_TRAIN.warmup, show_default=True)
@click.option("--weight-decay", type=float, default=_TRAIN.weight_decay, show_default=True, help="> 0 uses AdamW.")
@click.option("--grad-clip", type=float, default=_TRAIN.grad_clip, show_default=True)
@click.option("--ema-decay", type=float, default=_TRAIN.ema_decay, show_default=True)
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=_TRAIN.weighting, show_default=True)
@click.option("--mixed-score/--no-mixed-score", default=_TRAIN.mixed_score, show_default=True)
@click.option("--hflip", is_flag=True, help="Random horizontal flips.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=_TRAIN.seed, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=_TRAIN.save_every, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=0), default=_TRAIN.sample_every, show_default=True,
              help="Write a preview grid every N steps (0: only at the end).")
@click.option("--sample-steps", type=click.IntRange(min=1, max=MAX_SAMPLE_STEPS), default=_TRAIN.sample_steps,
              show_default=True)
@click.option("--compile/--no-compile", default=_TRAIN.compile, show_default=True,
              help="mx.compile the MLX step; torch.compile on CUDA.")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default=_TRAIN.backend, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_TRAIN.device, show_default=True,
              help="torch only.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default=_TRAIN.amp, show_default=True,
              help="torch: mixed precision for the network (bf16 on CUDA or CPU; fp16 with loss scaling, CUDA).")
@click.option("--channels-last", is_flag=True, help="torch: channels_last memory format.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Start a new run from the weights of this run folder or .safetensors file (raw and EMA "
                   "weights; fresh optimizer, step 0), e.g. to fine-tune a finished model.")
@click.option("--conditional", is_flag=True,
              help="Class-conditional network (labels from the dataset; an image folder: one sub-folder per class).")
@click.option("--label-dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=_TRAIN.label_dropout,
              show_default=True,
              help="--conditional: probability of training a sample with 'no label' (for classifier-free guidance).")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="A .npy file of integer class labels for a .npy file of points (one per point).")
@click.pass_context
@friendly_errors
def train(ctx, out, order, sde_param, net_param, **options):
    """Train a score model by block-coordinate score matching (resumable)."""
    from tqdm import tqdm

    from .checkpoint import STATE_FILE, read_config
    from .trainloop import TrainConfig

    if options.get("init_from") is not None:
        options["init_from"] = str(options["init_from"])
    given = {name for name in options
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    sde_params = _parse_assignments(sde_param, "--sde-param")
    if order is not None:
        sde_params["order"] = order
    net_params = _parse_assignments(net_param, "--net-param")
    resuming = (out / STATE_FILE).exists()
    if resuming:
        stored = TrainConfig.from_dict(read_config(out / STATE_FILE).get("train", {})).to_dict()
        values = {**stored, **{k: options[k] for k in given}}
        if sde_params:
            values["sde_params"] = sde_params
        if net_params:
            values["net_params"] = net_params
    else:
        values = dict(options)
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
            import signal

            # Scripts can tell an interrupted run from a finished one: 128 + the signal, as a shell does.
            ctx.exit(128 + int(trainer.stop_signal or signal.SIGINT))
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


def _eval_dataset(data_cfg: dict, dataset, data_dir) -> str:
    """The dataset eval reads: --dataset, or the checkpoint's if it is a known name. A path stored
    in a checkpoint is never opened unless the user names it."""
    from .data import DATASETS

    if dataset:
        return dataset
    name = str(data_cfg.get("name", ""))
    if name.lower() in DATASETS or name.lower() in ("fashion_mnist", "fmnist"):
        return name
    hint = f" (it was read from {data_cfg['source']})" if isinstance(data_cfg.get("source"), str) else ""
    raise click.UsageError(f"the model was trained on {name!r}{hint}, not a known dataset name; pass --dataset "
                           "with that file or folder (and --data-dir if needed)")


def _print_table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        click.echo(f"{name:<{width}}  {value:>12}  {note}")


@main.command(name="eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Run folder or .safetensors file. Default: the Fashion-MNIST HOLD model shipped in weights/.")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), default=None, callback=_check_threads,
              help="CPU threads: MLX streams or torch threads.")
@click.option("--bpd", is_flag=True, help="Likelihood of test data: bits/dim (images) or nats (points).")
@click.option("--n-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="--bpd: test examples (the first N of the test split).")
@click.option("--estimator", type=click.Choice(["hutchinson", "exact"]), default="hutchinson", show_default=True,
              help="--bpd: trace estimator; exact costs d network passes per step (points only).")
@click.option("--rtol", type=float, default=1e-5, show_default=True, callback=_positive_finite,
              help="--bpd: RK45 relative tolerance.")
@click.option("--atol", type=float, default=1e-5, show_default=True, callback=_positive_finite,
              help="--bpd: RK45 absolute tolerance.")
@click.option("--quality", is_flag=True, help="Sample quality: FD/KD against the training data (FID/KID too "
                                              "with --fid-weights).")
@click.option("--n-samples", type=click.IntRange(min=2), default=1000, show_default=True,
              help="--quality: samples to draw.")
@click.option("--sampler", type=click.Choice(SAMPLER_CHOICES, case_sensitive=False), default="lie-trotter",
              show_default=True, help="--quality: the sampler that draws the samples.")
@click.option("--steps", type=click.IntRange(min=1, max=MAX_SAMPLE_STEPS), default=100, show_default=True,
              help="--quality: sampler steps.")
@click.option("--grid", "time_grid", default=None, metavar=GRID_METAVAR, callback=_time_grid,
              help="--quality: sampler time grid (default: uniform; quadratic for gddim).")
@click.option("--order", type=click.IntRange(1, 3), default=None, help="--quality, gddim: multistep order (2).")
@click.option("--eta", type=float, default=None, help="--quality, gddim: 0 the ODE (default), 1 the reverse SDE.")
@click.option("--corrector/--no-corrector", default=None, help="--quality, gddim: UniPC's corrector (no extra call).")
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
                 sampler, steps, time_grid, order, eta, corrector, samples_file, n_ref, classifier, fid_weights, dataset,
                 data_dir, batch_size, seed, out):
    """Measure a model: likelihood (--bpd) and/or sample quality (--quality).

    \b
    Examples:
      hold-mlx eval --bpd --n-images 256 --out bpd.json
      hold-mlx eval --quality --n-samples 10000 --sampler lie-trotter --steps 100
      hold-mlx eval --quality --fid-weights ~/pt_inception-2015-12-05-6726825d.pth
    """
    from tqdm import tqdm

    from .checkpoint import default_checkpoint
    from .evaluate import likelihood_report, quality_classifier, quality_report
    from .model import load

    quality = quality or fid_weights is not None or samples_file is not None
    if not (bpd or quality):
        raise click.UsageError("nothing to measure: pass --bpd and/or --quality")
    if out is not None:
        _check_out(out, (".json",))
    model = load(checkpoint, backend, device=device, threads=threads)
    _check_sample_memory(model, n_samples if quality and samples_file is None else 1, batch_size)
    data_cfg = model.config["data"]
    dataset = _eval_dataset(data_cfg, dataset, data_dir)
    report = {"checkpoint": str(checkpoint or default_checkpoint()), "backend": backend, "sde": model.sde.to_config(),
              "data": data_cfg}
    rows = []
    fid_net = None
    if fid_weights is not None:  # fail on a missing or wrong file before any long computation
        try:
            from hold_export.fid_inception import load_fid_inception
        except ImportError as err:
            raise click.ClickException(f"--fid-weights needs PyTorch ({err}); pip install 'hold-mlx[torch]'")
        fid_net = load_fid_inception(fid_weights, device=device)
    classifier_net = quality_classifier(data_cfg, classifier, fid_net=fid_net) if quality else None

    if bpd:
        with tqdm(total=n_images, unit="img", desc=f"likelihood ({backend})", disable=None, leave=False) as bar:
            def progress(done, t):
                bar.update(done - bar.n)
                bar.set_postfix(t=f"{t:.3g}", refresh=False)

            lik = likelihood_report(model, n_images, dataset=dataset, data_dir=data_dir, seed=seed,
                                    batch_size=batch_size, estimator=estimator, rtol=rtol, atol=atol,
                                    progress=progress)
        report["likelihood"] = lik
        rows.append((lik["unit"], f"{lik['mean']:.4f}", f"± {lik['stderr']:.4f} (s.e., {lik['data']}, "
                                                         f"NFE {int(np.mean(lik['nfe_per_batch']))}/batch)"))

    if quality:
        adaptive = sampler.lower() == "rk45"
        with tqdm(total=None if adaptive else steps * -(-n_samples // batch_size), unit="step",
                  desc=f"sampling ({backend})", disable=True if samples_file else None, leave=False) as bar:
            q = quality_report(model, n_samples=n_samples, sampler=sampler, steps=steps, grid=time_grid,
                               samples_file=samples_file, n_ref=n_ref, dataset=dataset, data_dir=data_dir,
                               classifier=classifier_net, fid_net=fid_net, batch_size=batch_size, seed=seed,
                               progress=lambda *step: bar.update(1),
                               **_gddim_options(sampler, order, eta, corrector))
        report["quality"] = q
        for name, value in q["metrics"].items():
            if isinstance(value, dict):
                rows.append((name, f"{value['mean']:.5f}", f"± {value['std']:.5f} (std over {value['subsets']} "
                                                           f"subsets of {value['subset_size']})"))
            else:
                rows.append((name, f"{value:.4f}", f"({q['n_samples']} samples vs {q['reference']})"))
        if "nfe" in q:
            rows.append(("NFE", str(q["nfe"]), f"({sampler}, {steps} steps)"))

    _print_table(rows)
    if out is not None:
        from .checkpoint import atomic_write

        atomic_write(out, (json.dumps(report, indent=1, default=float) + "\n").encode())
        click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------- doctor


def _bad_environment() -> str:
    """HOLD_MLX_* variables whose values cannot be used, for doctor."""
    bad = []
    for name in ("HOLD_MLX_CACHE_MB", "HOLD_MLX_THREADS", "HOLD_MLX_BLAS_THREADS"):
        value = os.environ.get(name, "").strip()
        if value and not (value.isdigit() and int(value) < 2**40):
            bad.append(f"{name}={value[:40]!r} is not a sane non-negative integer")
    for name in ("HOLD_MLX_WEIGHTS", "HOLD_MLX_BLAS"):
        value = os.environ.get(name, "")
        if value and value.lower() != "none" and not os.path.isfile(value):
            bad.append(f"{name}={value[:80]} does not exist")
    return "; ".join(bad)


@main.command()
def doctor():
    """Report versions, the BLAS MLX uses, the native CPU kernels (built here on first use),
    devices, datasets and shipped weights."""
    rows = [("hold-mlx", __version__), ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", f"{platform.system()} {platform.machine()}")]
    bad_env = _bad_environment()
    if bad_env:
        rows.append(("environment", bad_env))
    try:
        from ._mlx import BLAS, BLAS_NOTE, mx

        rows += [("mlx", f"{mx.__version__}, default device {mx.default_device()}"), ("mlx BLAS", f"{BLAS} ({BLAS_NOTE})")]
        from ._mlx import configure_cpu, describe_cpu_tuning

        configure_cpu()  # the settings sampling and training use
        rows.append(("mlx CPU tuning", describe_cpu_tuning()))
        from . import fastops, native

        if fastops.enabled():
            built = native.status()
            rows.append(("mlx native kernels", ("built: " if built.available else "unavailable: ") + built.detail))
            if built.isa:
                rows.append(("native variant", f"{built.isa} ({built.why}; this CPU runs: "
                                               f"{', '.join(native.supported_variants())}; "
                                               "HOLD_MLX_NATIVE_ISA=avx512|avx2|portable forces one)"))
            if built.available:
                l1, l2 = native.load().cache_sizes()
                rows.append(("native blocking", f"for L1d {l1 // 1024} KiB, L2 {l2 // 1024} KiB (as the machine reports)"))
        else:
            rows.append(("mlx native kernels", "not used (MLX's own kernels are the fast ones here)"))
    except (ImportError, ValueError, OSError) as err:
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

"""The training loop shared by every backend: config, batches, schedule, checkpoints, resume.

A backend (MLX in ``train.py``, torch in ``hold_export.torch_train``) subclasses
:class:`TrainerBase` and supplies the network, one optimisation step, and its state as flat NumPy
tensors. Everything else lives here once: what a step sees (batch, times and float64 objective
coefficients are functions of (seed, step) only, so a resumed run repeats the uninterrupted one),
the learning-rate schedule, when to save, atomic checkpoints, NaN handling and SIGTERM.

Train-state tensors use one neutral format for every backend, so a run started on one backend
resumes on the other:
  raw/<key>, ema/<key>   network weights in the checkpoint layout (``checkpoint.LAYOUT``)
  adam_m/<key>, adam_v/<key>   Adam moments; adam_step: (1,) int64 (bias-corrected Adam on both backends)
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import (MODEL_FILE, STATE_FILE, CheckpointError, append_line, atomic_write, lock_run_folder,
                         make_config, read_config, read_tensors, resolve_model_file, validate_net_params,
                         validate_sde_params, write_tensors)
from .data import Dataset, load_dataset
from .machine import physical_memory_bytes
from .netconfig import NetConfig, net_preset
from .parameterisation import Coefficients, objective_coefficients, sample_times
from .sde import LinearSDE, get_sde

__all__ = ["TrainConfig", "TrainerBase", "StepInfo", "TrainingDiverged", "RESUMABLE_CHANGES", "auto_net",
           "estimate_train_bytes", "MAX_SEED", "MAX_WEIGHT"]

#: Seeds are 63-bit: MLX, torch and NumPy all take them.
MAX_SEED = 2**63 - 1
#: A weight larger than this in magnitude means the run diverged (trained weights stay O(1-100)):
#: such a state is never saved as the "last good" checkpoint.
MAX_WEIGHT = 1e6


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run folder keeps the last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored in its checkpoints."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int | None = None
    sde: str = "hold"
    sde_params: dict = field(default_factory=dict)
    net: str = "auto"  # "auto": chosen from the data (see auto_net)
    net_params: dict = field(default_factory=dict)
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weighting: str = "eps"
    mixed_score: bool = True
    hflip: bool = False
    seed: int = 0
    save_every: int = 500
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 50
    compile: bool = True
    backend: str = "mlx"
    device: str = "cpu"
    amp: str = "none"  # torch on CUDA: "bf16" | "fp16" | "none"
    channels_last: bool = False
    init_from: str | None = None  # a new run starts from these weights (raw = EMA), fresh optimizer
    conditional: bool = False  # class-conditional network (the dataset must have labels)
    label_dropout: float = 0.1  # probability that a sample's label is replaced by "no label"
    labels: str | None = None  # .npy file of labels for a .npy file of points


    def __post_init__(self):
        def number(name, ok, what):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

        for name in ("steps", "batch_size", "save_every", "sample_steps"):
            number(name, lambda v: v == int(v) and v >= 1, "an integer >= 1")
        for name in ("warmup", "sample_every"):
            number(name, lambda v: v == int(v) and v >= 0, "an integer >= 0")
        number("seed", lambda v: v == int(v) and 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")
        number("lr", lambda v: v > 0, "a finite number > 0")
        number("ema_decay", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        number("grad_clip", lambda v: v >= 0, "a finite number >= 0 (0: no clipping)")
        number("weight_decay", lambda v: v >= 0, "a finite number >= 0 (0: Adam, > 0: AdamW)")
        number("label_dropout", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        if self.image_size is not None:
            number("image_size", lambda v: v == int(v) and 4 <= v <= 1024, "an integer from 4 to 1024")
        if not isinstance(self.sde_params, dict) or not isinstance(self.net_params, dict):
            raise ValueError("sde_params and net_params must be mappings")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: Settings a resumed run may change: the budget, the cadence of saves and previews, how the same
#: computation is executed (where the data lives, the backend and its speed options), and the
#: optimizer's knobs, so a diverged run can resume from its last good checkpoint with a lower
#: learning rate, and the EMA decay, which weighs only the steps still to come (a change is
#: recorded in log.jsonl).
RESUMABLE_CHANGES = frozenset({"steps", "save_every", "sample_every", "sample_steps", "data_dir", "compile",
                               "backend", "device", "amp", "channels_last", "lr", "warmup", "grad_clip",
                               "weight_decay", "ema_decay"})
#: Of those, the ones that change the trained weights: logged when they change.
_LOGGED_CHANGES = ("lr", "warmup", "grad_clip", "weight_decay", "ema_decay")


def auto_net(data: Dataset) -> str:
    """The network preset for data: an MLP for points, the preset of a known image set, else a
    U-Net preset by image size."""
    if data.kind == "points":
        return "mlp"
    if data.name in ("fashion-mnist", "mnist"):
        return "fashion-mnist"
    if data.name in ("digits", "cifar10"):
        return data.name
    size = data.shape[0]
    return "digits" if size <= 16 else "fashion-mnist" if size <= 28 else "cifar10"


def estimate_train_bytes(net_cfg: NetConfig, data_shape, batch_size: int, *, training: bool = True) -> float:
    """A rough lower estimate of the memory a network needs: parameters (with EMA, gradients and
    Adam moments when training) plus the main activations of one batch. Only meant to refuse
    sizes that surely cannot fit, before anything is allocated."""
    c = net_cfg
    if c.kind == "mlp":
        width_in = c.order * c.data_channels
        params = width_in * c.hidden + (c.depth + 2) * c.hidden * c.hidden + c.hidden * c.data_channels
        activations = batch_size * c.hidden * (c.depth + 4)
    else:
        params, activations, res = 0.0, 0.0, float(c.image_size)
        for mult in c.channel_mult:
            ch = float(c.channels * mult)
            blocks = 3 * c.num_res_blocks + 1  # down blocks, up blocks (one more), sampling conv
            params += blocks * 2 * 9 * ch * ch
            activations += batch_size * res * res * ch * blocks * 4
            if int(res) in c.attn_resolutions:
                activations += batch_size * (res * res) ** 2 * 2
            res = max(1.0, res / 2)
    per_param = 5 if training else 1  # raw, EMA, gradient and two Adam moments
    return 4.0 * (params * per_param + activations)


@dataclass
class StepInfo:
    step: int  # steps done so far
    loss: float
    lr: float
    images_per_s: float
    saved: bool = False
    preview: str | None = None


@dataclass
class Batch:
    """What one optimisation step consumes; NumPy, float32 except the seeds."""

    x0: np.ndarray  # (b, *data_shape) this rank's data
    t: np.ndarray  # (b,)
    mean: np.ndarray  # (b, n)
    chol: np.ndarray  # (b, n, n)
    mixed: np.ndarray  # (b,)
    weight: np.ndarray  # (b,)
    noise_seed: tuple[int, int]  # (seed, step): keys the Gaussian noise of the step
    lr: float
    rows: tuple[int, int]  # this rank's rows [lo, hi) of the global batch
    global_batch: int  # noise is drawn for the global batch and sliced, so N ranks train like 1
    labels: np.ndarray | None = None  # (b,) int64 class labels, "no label" where dropped (conditional runs)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (step counts from 0)."""
    if cfg.warmup <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)


class TrainerBase:
    """The backend-neutral trainer. Subclasses implement the ``_backend_*`` hooks below.

    ``run()`` is a generator yielding :class:`StepInfo` per step; it never prints.
    """

    backend = "abstract"

    def __init__(self, config: TrainConfig, out: str | Path, *, dataset: Dataset | None = None):
        self.cfg = config
        self.out = Path(out)
        self.rank, self.world = self._backend_distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch size {config.batch_size} is not divisible by {self.world} ranks")
        # Rank 0 owns the folder for the whole run: a second trainer on it stops here, and a
        # folder it cannot write is found now, not at the first save.
        self._lock = lock_run_folder(self.out) if self.rank == 0 else None
        if self.rank == 0:
            self._check_writable()
        self._resumed_from = self._check_resume_config()
        self.data = dataset if dataset is not None else load_dataset(
            config.dataset, data_dir=config.data_dir, image_size=config.image_size, seed=config.seed,
            **({"labels": config.labels} if config.labels else {}))
        validate_sde_params(dict(config.sde_params))
        try:
            self.sde: LinearSDE = get_sde(config.sde, **config.sde_params)
        except (TypeError, ArithmeticError, np.linalg.LinAlgError) as err:
            raise ValueError(f"--sde-param: {err}") from err
        self.net_cfg = self._net_config()
        self._check_memory()
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in steps, summed over every session of the run
        self._since_save: list[float] = []  # losses since the last save, for log.jsonl
        self.interrupted = False
        self.stop_signal: int | None = None  # SIGINT / SIGTERM that stopped the last run()
        data_config = self.data.config()
        if self.net_cfg.num_classes:
            data_config["classes"] = list(self.data.class_names)
        self.model_config = make_config(
            self.sde, self.net_cfg, data_config, mixed_score=config.mixed_score,
            weighting=config.weighting, extra={"train": config.to_dict()})
        self._backend_build()
        if (self.out / STATE_FILE).exists():
            self._load_state()
            self._log_changes()
        elif config.init_from:
            self._init_from(config.init_from)

    # -- backend hooks ----------------------------------------------------------------------------

    def _backend_distributed(self) -> tuple[int, int]:
        """(rank, world size); (0, 1) when not launched data-parallel."""
        return 0, 1

    def _backend_build(self) -> None:
        """Create network, EMA copy and optimizer from self.net_cfg (seeded by cfg.seed)."""
        raise NotImplementedError

    def _backend_step(self, batch: Batch):
        """One optimisation step; returns the loss as a backend scalar (read after the step)."""
        raise NotImplementedError

    def _backend_state(self) -> dict[str, np.ndarray]:
        """raw/, ema/, adam_m/, adam_v/ and adam_step tensors in the checkpoint layout."""
        raise NotImplementedError

    def _backend_load_state(self, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _backend_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (data-parallel runs only)."""
        return flag

    def ema_score_model(self):
        """The EMA weights as a ``hold_mlx.model.Model`` (previews sample from it)."""
        raise NotImplementedError

    # -- configuration ----------------------------------------------------------------------------

    def _net_config(self) -> NetConfig:
        shape = self.data.shape
        overrides = dict(validate_net_params(dict(self.cfg.net_params)))
        overrides.setdefault("order", self.sde.order)
        overrides.setdefault("data_channels", shape[-1])
        if self.data.kind == "image":
            if shape[0] != shape[1]:
                raise ValueError(f"images must be square, got {shape[:2]}")
            overrides.setdefault("image_size", shape[0])
        if self.cfg.conditional:
            if self.data.labels is None:
                raise ValueError(f"--conditional needs class labels and {self.data.name} has none; use a labelled "
                                 "dataset, an image folder with one sub-folder per class, or --labels FILE.npy "
                                 "for points")
            overrides.setdefault("num_classes", len(self.data.class_names))
        name = auto_net(self.data) if self.cfg.net == "auto" else self.cfg.net
        net_cfg = net_preset(name, **overrides)
        if self.cfg.conditional and self.data.labels.max() >= net_cfg.num_classes:
            raise ValueError(f"the data has labels up to {int(self.data.labels.max())}, the network "
                             f"{net_cfg.num_classes} classes")
        if (net_cfg.kind == "mlp") != (self.data.kind == "points"):
            raise ValueError(f"network {self.cfg.net!r} ({net_cfg.kind}) does not fit {self.data.kind} data; "
                             "use an mlp preset for points and a U-Net preset for images")
        if net_cfg.order != self.sde.order:
            raise ValueError(f"network order {net_cfg.order} != SDE order {self.sde.order}")
        return net_cfg

    def _check_writable(self) -> None:
        log = self.out / "log.jsonl"
        if log.is_symlink():
            raise CheckpointError(f"{log} is a symbolic link; hold-mlx does not write through links: remove it "
                                  "or use another --out")
        if not os.access(self.out, os.W_OK):
            raise CheckpointError(f"{self.out} is not writable: fix its permissions or choose another --out")

    def _check_resume_config(self) -> TrainConfig | None:
        """The stored config of the run being resumed (None for a new run), after checking that
        the settings that define the run did not change."""
        state_file = self.out / STATE_FILE
        if not state_file.exists():
            if (self.out / MODEL_FILE).exists() and not self.cfg.init_from:
                raise CheckpointError(
                    f"{self.out} holds a trained {MODEL_FILE} but no {STATE_FILE}, so it cannot be resumed and "
                    f"training would overwrite it: use a new --out, or --init-from {self.out} --out NEW to "
                    "fine-tune from those weights")
            return None
        old = TrainConfig.from_dict(read_config(state_file).get("train", {}))
        diffs = [f.name for f in fields(TrainConfig)
                 if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(self.cfg, f.name)]
        if diffs:
            raise CheckpointError(
                f"{state_file}: the run was started with different settings ({', '.join(diffs)}); "
                "use the same options to resume, or a new --out")
        return old

    def _log_changes(self) -> None:
        old = self._resumed_from
        changed = {k: [getattr(old, k), getattr(self.cfg, k)] for k in _LOGGED_CHANGES
                   if old is not None and getattr(old, k) != getattr(self.cfg, k)}
        if changed and self.rank == 0:
            append_line(self.out / "log.jsonl", json.dumps({"step": self.step, "changed": changed,
                                                            "time": time.time()}))

    def _check_memory(self) -> None:
        need = estimate_train_bytes(self.net_cfg, self.data.shape, self.cfg.batch_size // self.world)
        have = physical_memory_bytes()
        if need > have:
            raise ValueError(f"--net-param/--batch-size: training this network needs at least {need / 2**30:.0f} GiB "
                             f"(batch {self.cfg.batch_size}) and this machine has {have / 2**30:.0f} GiB; use a "
                             "smaller network (channels, hidden, depth) or --batch-size")

    def _init_from(self, source: str) -> None:
        """A new run that starts from a trained model: raw and EMA weights from its model file,
        a fresh optimizer, step 0. Recorded in the run's config (train.init_from) and log."""
        path = resolve_model_file(source)
        weights, _ = read_tensors(path)
        state = self._backend_state()
        for key in [k for k in state if k.startswith(("raw/", "ema/"))]:
            name = key.split("/", 1)[1]
            if name not in weights:
                raise CheckpointError(f"--init-from {path}: no weight {name!r}; it was trained with another "
                                      "network (use the same --net and --net-param)")
            if tuple(weights[name].shape) != tuple(state[key].shape):
                raise CheckpointError(f"--init-from {path}: {name} has shape {tuple(weights[name].shape)}, this "
                                      f"network expects {tuple(state[key].shape)} (use the same --net and --net-param)")
            state[key] = weights[name].astype(state[key].dtype)
        self._backend_load_state(state)
        if self.rank == 0:
            append_line(self.out / "log.jsonl", json.dumps({"step": 0, "init_from": str(path), "time": time.time()}))

    # -- state ------------------------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.out / STATE_FILE
        tensors, config = read_tensors(path)
        try:
            self._backend_load_state(tensors)
        except KeyError as err:
            raise CheckpointError(f"{path}: train state lacks {err}; it is not a hold-mlx run folder") from err
        self.step = int(config["step"])
        self.train_seconds = float(config.get("train_seconds", 0.0))

    def save(self) -> None:
        """Write train_state, then model (both atomic), rank 0 only: the model file never runs
        ahead of the state a resume starts from."""
        if self.rank != 0:
            return
        state = self._backend_state()
        self._check_state_sane(state)
        config = {**self.model_config, "step": self.step, "train_seconds": round(self.train_seconds, 3)}
        write_tensors(self.out / STATE_FILE, state, config)
        ema = {k[len("ema/"):]: v for k, v in state.items() if k.startswith("ema/")}
        write_tensors(self.out / MODEL_FILE, ema, config)
        atomic_write(self.out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if self._since_save:  # one line per save: the loss curve of the run
            record = {"step": self.step, "loss": float(np.mean(self._since_save)),
                      "train_seconds": round(self.train_seconds, 3), "time": time.time()}
            append_line(self.out / "log.jsonl", json.dumps(record))
            self._since_save = []

    def _check_state_sane(self, state: dict[str, np.ndarray]) -> None:
        """A state with non-finite or exploded weights is never saved: the last good checkpoint
        stays. (The loss can stay finite for a step or two after the weights blew up.)"""
        for key, value in state.items():
            if not key.startswith(("raw/", "ema/")) or value.dtype.kind != "f":
                continue
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            if not math.isfinite(peak) or peak > MAX_WEIGHT:
                raise TrainingDiverged(f"weights diverged by step {self.step} ({key} reaches {peak:.3g}); "
                                       + self._divergence_advice())

    def _divergence_advice(self) -> str:
        has_state = (self.out / STATE_FILE).exists()
        lower = f"--lr {min(self.cfg.lr / 10, 2e-4):.3g}"
        if has_state:
            step = read_config(self.out / STATE_FILE).get("step", 0)
            return (f"{self.out} keeps the checkpoint of step {step}; resume from it with a lower learning rate: "
                    f"hold-mlx train --out {self.out} {lower}")
        return f"nothing was saved; start again with a lower learning rate ({lower}) or a longer --warmup"

    # -- the loop ---------------------------------------------------------------------------------

    def _stop_requested(self, stop: dict) -> bool:
        """A signal seen by any rank stops every rank before the same step (no rank waits forever
        in a collective the others never reach)."""
        if self.world > 1:
            stop["now"] = self._backend_any(stop["now"])
        return stop["now"]

    def batch(self, step: int) -> Batch:
        cfg = self.cfg
        x0 = self.data.batch(step, cfg.batch_size, cfg.seed, rank=self.rank, world=self.world, hflip=cfg.hflip)
        mine = np.array_split(np.arange(cfg.batch_size), self.world)[self.rank]
        t = sample_times(self.sde, np.random.default_rng([cfg.seed, step, 5]), cfg.batch_size)[mine]
        c: Coefficients = objective_coefficients(self.sde, t, mixed_score=cfg.mixed_score, weighting=cfg.weighting)
        f = c.as_float32()
        return Batch(x0, f["t"], f["mean"], f["chol"], f["mixed"], f["weight"], (cfg.seed, step), lr_at(cfg, step),
                     (int(mine[0]), int(mine[-1]) + 1), cfg.batch_size, self.batch_labels(step))

    def batch_labels(self, step: int) -> np.ndarray | None:
        """This rank's labels of a step (None: unconditional), each replaced by "no label" with
        probability label_dropout: a function of (seed, step), drawn for the global batch."""
        if not self.net_cfg.num_classes:
            return None
        cfg = self.cfg
        labels = self.data.batch_labels(step, cfg.batch_size, cfg.seed, rank=self.rank, world=self.world)
        mine = np.array_split(np.arange(cfg.batch_size), self.world)[self.rank]
        dropped = np.random.default_rng([cfg.seed, step, 13]).random(cfg.batch_size)[mine] < cfg.label_dropout
        return np.where(dropped, self.net_cfg.null_label, labels).astype(np.int64)

    def run(self, preview: Callable | None = None) -> Iterator[StepInfo]:
        """Train up to cfg.steps, yielding StepInfo; saves every save_every steps, at the end and on
        SIGTERM / KeyboardInterrupt. ``preview(trainer, step) -> path`` draws sample grids."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.interrupted = False
        stop = {"now": False}
        last_good = self.step
        with _graceful_stop(stop):
            while self.step < cfg.steps and not self._stop_requested(stop):
                start = time.perf_counter()
                batch = self.batch(self.step)
                value = float(self._backend_step(batch))
                if not math.isfinite(value):
                    raise TrainingDiverged(f"loss is {value} at step {self.step + 1}; " + self._divergence_advice())
                self.step += 1
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                self._since_save.append(value)
                info = StepInfo(self.step, value, batch.lr, cfg.batch_size / max(elapsed, 1e-9))
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                    last_good = self.step
                    info.saved = True
                if preview is not None and self.rank == 0 and (
                        (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == cfg.steps):
                    info.preview = preview(self, self.step)
                yield info
        if stop["now"]:
            self.interrupted = True
            self.stop_signal = stop.get("signal")
            if self.step > last_good:
                self.save()


class _graceful_stop:
    """SIGINT / SIGTERM set ``flag["now"]``: the step in flight finishes and the loop saves and
    returns, so a checkpoint is never taken of half-updated weights. A second Ctrl-C kills."""

    def __init__(self, flag: dict):
        self.flag, self.saved = flag, {}

    def _handler(self, signum, frame):
        self.flag["now"] = True
        self.flag["signal"] = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.saved[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False

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
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .checkpoint import (MODEL_FILE, STATE_FILE, CheckpointError, atomic_write, make_config, read_config,
                         read_tensors, write_tensors)
from .data import Dataset, load_dataset
from .netconfig import NetConfig, net_preset
from .parameterisation import Coefficients, objective_coefficients, sample_times
from .sde import LinearSDE, get_sde

__all__ = ["TrainConfig", "TrainerBase", "StepInfo", "TrainingDiverged", "RESUMABLE_CHANGES"]


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
    net: str = "fashion-mnist"
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
    conditional: bool = False  # class-conditional network (the dataset must have labels)
    label_dropout: float = 0.1  # probability that a sample's label is replaced by "no label"
    labels: str | None = None  # .npy file of labels for a .npy file of points

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.warmup < 0 or self.sample_every < 0 or self.grad_clip < 0:
            raise ValueError("warmup, sample_every and grad_clip must be >= 0")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: Settings a resumed run may change: the budget, the cadence of saves and previews, and how the
#: same computation is executed (where the data lives, the backend and its speed options).
RESUMABLE_CHANGES = frozenset({"steps", "save_every", "sample_every", "sample_steps", "data_dir", "compile",
                               "backend", "device", "amp", "channels_last"})


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
        self._check_resume_config()
        self.data = dataset if dataset is not None else load_dataset(
            config.dataset, data_dir=config.data_dir, image_size=config.image_size, seed=config.seed,
            **({"labels": config.labels} if config.labels else {}))
        self.sde: LinearSDE = get_sde(config.sde, **config.sde_params)
        self.net_cfg = self._net_config()
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in steps, summed over every session of the run
        self._since_save: list[float] = []  # losses since the last save, for log.jsonl
        self.interrupted = False
        data_config = self.data.config()
        if self.net_cfg.num_classes:
            data_config["classes"] = list(self.data.class_names)
        self.model_config = make_config(
            self.sde, self.net_cfg, data_config, mixed_score=config.mixed_score,
            weighting=config.weighting, extra={"train": config.to_dict()})
        self._backend_build()
        if (self.out / STATE_FILE).exists():
            self._load_state()

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
        overrides = dict(self.cfg.net_params)
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
        net_cfg = net_preset(self.cfg.net, **overrides)
        if self.cfg.conditional and self.data.labels.max() >= net_cfg.num_classes:
            raise ValueError(f"the data has labels up to {int(self.data.labels.max())}, the network "
                             f"{net_cfg.num_classes} classes")
        if (net_cfg.kind == "mlp") != (self.data.kind == "points"):
            raise ValueError(f"network {self.cfg.net!r} ({net_cfg.kind}) does not fit {self.data.kind} data; "
                             "use an mlp preset for points and a U-Net preset for images")
        if net_cfg.order != self.sde.order:
            raise ValueError(f"network order {net_cfg.order} != SDE order {self.sde.order}")
        return net_cfg

    def _check_resume_config(self) -> None:
        state_file = self.out / STATE_FILE
        if not state_file.exists():
            return
        old = TrainConfig.from_dict(read_config(state_file).get("train", {}))
        diffs = [f.name for f in fields(TrainConfig)
                 if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(self.cfg, f.name)]
        if diffs:
            raise CheckpointError(
                f"{state_file}: the run was started with different settings ({', '.join(diffs)}); "
                "use the same options to resume, or a new --out")

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
        config = {**self.model_config, "step": self.step, "train_seconds": round(self.train_seconds, 3)}
        write_tensors(self.out / STATE_FILE, state, config)
        ema = {k[len("ema/"):]: v for k, v in state.items() if k.startswith("ema/")}
        write_tensors(self.out / MODEL_FILE, ema, config)
        atomic_write(self.out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if self._since_save:  # one line per save: the loss curve of the run
            record = {"step": self.step, "loss": float(np.mean(self._since_save)),
                      "train_seconds": round(self.train_seconds, 3), "time": time.time()}
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self._since_save = []

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
                    raise TrainingDiverged(
                        f"loss is {value} at step {self.step + 1}; {self.out} keeps the checkpoint of step "
                        f"{last_good}. Lower --lr or raise --warmup, then resume")
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
            if self.step > last_good:
                self.save()


class _graceful_stop:
    """SIGINT / SIGTERM set ``flag["now"]``: the step in flight finishes and the loop saves and
    returns, so a checkpoint is never taken of half-updated weights. A second Ctrl-C kills."""

    def __init__(self, flag: dict):
        self.flag, self.saved = flag, {}

    def _handler(self, signum, frame):
        self.flag["now"] = True
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

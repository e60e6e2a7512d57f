"""MLX training: block-coordinate score matching with a compiled step, EMA and resumable runs.

``Trainer(config).run()`` is a generator that yields a :class:`StepInfo` per step (the CLI draws
the progress bar); it never prints. Everything random in step k is a function of (seed, k): the
batch (``Dataset.batch``), the times (NumPy, float64 coefficients from the SDE module) and the
Gaussian noise (an MLX key derived from (seed, k) and passed into the compiled step). A resumed
run therefore reproduces the uninterrupted one exactly.

Data-parallel: launched with ``mlx.launch -n N ...`` every rank takes its slice of the global
batch and gradients are averaged with ``mx.distributed`` (rank 0 writes the run folder).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ._mlx import mx, nn, optim
from .checkpoint import (MODEL_FILE, STATE_FILE, CheckpointError, read_tensors, write_tensors)
from .data import Dataset, load_dataset
from .model import ScoreModel, flat_params, make_config, set_flat_params
from .nets import NetConfig, build_net, net_preset
from .objective import objective_coefficients, perturb, residual, sample_times
from .sde import get_sde

__all__ = ["TrainConfig", "Trainer", "StepInfo", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run folder keeps the last good checkpoint."""


@dataclass
class TrainConfig:
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class StepInfo:
    step: int  # steps done so far
    loss: float
    lr: float
    images_per_s: float
    saved: bool = False
    preview: str | None = None


def _key_for(seed: int, step: int):
    """An MLX PRNG key that depends only on (seed, step)."""
    bits = np.random.default_rng([seed, step, 3]).integers(0, 2**32, size=2, dtype=np.uint32)
    return mx.array(bits)


class Trainer:
    """Builds data, SDE, network and optimizer from a :class:`TrainConfig`; resumes from ``out``."""

    def __init__(self, config: TrainConfig, out: str | Path, *, dataset: Dataset | None = None):
        self.cfg = config
        self.out = Path(out)
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.world = self.group.size() if self.group is not None else 1
        if config.batch_size % self.world:
            raise ValueError(f"batch size {config.batch_size} is not divisible by {self.world} ranks")

        self._check_resume_config()
        self.data = dataset if dataset is not None else load_dataset(
            config.dataset, data_dir=config.data_dir, image_size=config.image_size, seed=config.seed)
        self.sde = get_sde(config.sde, **config.sde_params)
        shape = self.data.shape
        overrides = dict(config.net_params)
        overrides.setdefault("order", self.sde.order)
        overrides.setdefault("data_channels", shape[-1])
        if self.data.kind == "image":
            overrides.setdefault("image_size", shape[0])
            if shape[0] != shape[1]:
                raise ValueError(f"images must be square, got {shape[:2]}")
        self.net_cfg = net_preset(config.net, **overrides)
        if (self.net_cfg.kind == "mlp") != (self.data.kind == "points"):
            raise ValueError(f"network {config.net!r} ({self.net_cfg.kind}) does not fit {self.data.kind} data; "
                             "use an mlp preset for points and a U-Net preset for images")
        mx.random.seed(config.seed)
        self.net = build_net(self.net_cfg)
        self.ema = {k: v for k, v in flat_params(self.net.parameters()).items()}
        self.ema = _tree(self.ema)
        schedule = optim.linear_schedule(0.0, config.lr, max(config.warmup, 1))
        schedule = optim.join_schedules([schedule, optim.linear_schedule(config.lr, config.lr, 1)],
                                        [max(config.warmup, 1)])
        self.optimizer = (optim.AdamW(schedule, weight_decay=config.weight_decay) if config.weight_decay
                          else optim.Adam(schedule))
        self.optimizer.init(self.net.trainable_parameters())
        self.step = 0
        self.model_config = make_config(
            self.sde, self.net_cfg, self.data.config(), mixed_score=config.mixed_score,
            weighting=config.weighting, extra={"train": config.to_dict()})
        if (self.out / STATE_FILE).exists():
            self._load_state()
        self._step_fn = self._make_step()

    # -- the compiled step ------------------------------------------------------------------------

    def _make_step(self):
        net, opt, cfg = self.net, self.optimizer, self.cfg
        n = self.sde.order
        decay = cfg.ema_decay
        group = self.group if self.world > 1 else None

        def loss_fn(model, x0, key, t, mean, chol, mixed, weight):
            shape = (-1,) + (1,) * (x0.ndim - 1)
            per_sample = lambda col: col.reshape(shape)  # noqa: E731
            eps = mx.random.normal((n,) + x0.shape, key=key)
            blocks = perturb(x0, [eps[i] for i in range(n)], mean, chol, per_sample)
            u = blocks[0] if n == 1 else mx.concatenate(blocks, axis=-1)
            alpha = model(u, t)
            r = residual(alpha, blocks[-1], eps[-1], mixed, per_sample)
            per_example = (r * r).reshape(r.shape[0], -1).sum(axis=1) / r[0].size
            return (weight * per_example).mean()

        grad_fn = nn.value_and_grad(net, loss_fn)
        state = [net.state, opt.state, self.ema]

        def step(x0, key, t, mean, chol, mixed, weight):
            loss, grads = grad_fn(net, x0, key, t, mean, chol, mixed, weight)
            if group is not None:
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / self.world
            if cfg.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            opt.update(net, grads)
            new_ema = _ema_update(self.ema, net.parameters(), decay)
            _assign(self.ema, new_ema)
            return loss

        return mx.compile(step, inputs=state, outputs=state) if cfg.compile else step

    # -- resumable state --------------------------------------------------------------------------

    def _check_resume_config(self):
        state_file = self.out / STATE_FILE
        if not state_file.exists():
            return
        _, config = read_tensors(state_file)
        old = TrainConfig.from_dict(config.get("train", {}))
        # What may change between sessions: the total step budget and the cadence of saves/previews.
        free = {"steps", "save_every", "sample_every", "sample_steps", "data_dir", "compile"}
        diffs = [f.name for f in fields(TrainConfig)
                 if f.name not in free and getattr(old, f.name) != getattr(self.cfg, f.name)]
        if diffs:
            raise CheckpointError(
                f"{state_file}: the run was started with different settings ({', '.join(diffs)}); "
                "use the same options to resume, or a new --out")

    def _load_state(self):
        path = self.out / STATE_FILE
        tensors, config = read_tensors(path)
        take = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        set_flat_params(self.net, take("raw/"), source=str(path))
        ema_flat = take("ema/")
        if set(ema_flat) != set(flat_params(self.ema)):
            raise CheckpointError(f"{path}: EMA weights do not match the network")
        _assign(self.ema, _tree({k: mx.array(v) for k, v in ema_flat.items()}))
        opt_flat = take("opt/")
        from mlx.utils import tree_unflatten

        self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in opt_flat.items()])
        self.step = int(config["step"])

    def save(self):
        """Write train_state then model (both atomic); rank 0 only."""
        if self.rank != 0:
            return
        tensors = {}
        tensors.update({f"raw/{k}": v for k, v in flat_params(self.net.parameters()).items()})
        tensors.update({f"ema/{k}": v for k, v in flat_params(self.ema).items()})
        tensors.update({f"opt/{k}": v for k, v in flat_params(self.optimizer.state).items()})
        state_cfg = {**self.model_config, "step": self.step}
        write_tensors(self.out / STATE_FILE, tensors, state_cfg)
        write_tensors(self.out / MODEL_FILE, flat_params(self.ema), state_cfg)
        if self.out.joinpath("config.json").exists() is False:
            (self.out / "config.json").write_text(json.dumps(state_cfg, indent=2, sort_keys=True))

    def ema_model(self) -> ScoreModel:
        net = build_net(self.net_cfg)
        net.update(self.ema)
        net.eval()
        return ScoreModel(net, self.sde, {**self.model_config, "step": self.step})

    # -- the loop ---------------------------------------------------------------------------------

    def batch_inputs(self, step: int):
        cfg = self.cfg
        x0 = self.data.batch(step, cfg.batch_size, cfg.seed, rank=self.rank, world=self.world,
                             hflip=cfg.hflip)
        rng = np.random.default_rng([cfg.seed, step, 5])
        t = sample_times(self.sde, rng, cfg.batch_size)
        t = np.array_split(t, self.world)[self.rank]
        c = objective_coefficients(self.sde, t, mixed_score=cfg.mixed_score,
                                   weighting=cfg.weighting).as_float32()
        return (mx.array(x0), _key_for(cfg.seed, step), mx.array(c["t"]), mx.array(c["mean"]),
                mx.array(c["chol"]), mx.array(c["mixed"]), mx.array(c["weight"]))

    def run(self, preview=None):
        """Train up to cfg.steps, yielding StepInfo; saves every save_every steps, at the end and
        on SIGTERM/KeyboardInterrupt. ``preview(trainer, step) -> path`` draws sample grids."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        stop = {"now": False}
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        except ValueError:  # not in the main thread
            pass
        self.net.train()
        last_good = self.step
        try:
            while self.step < cfg.steps and not stop["now"]:
                start = time.perf_counter()
                inputs = self.batch_inputs(self.step)
                loss = self._step_fn(*inputs)
                mx.eval(loss, self.net.parameters(), self.optimizer.state, self.ema)
                value = float(loss.item())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss is {value} at step {self.step + 1}; {self.out} keeps the checkpoint of step "
                        f"{last_good}. Lower --lr or raise --warmup and resume")
                self.step += 1
                info = StepInfo(self.step, value, float(self.optimizer.learning_rate.item()),
                                cfg.batch_size / max(time.perf_counter() - start, 1e-9))
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                    last_good = self.step
                    info.saved = True
                if preview is not None and self.rank == 0 and (
                        (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == cfg.steps):
                    info.preview = preview(self, self.step)
                yield info
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if stop["now"]:
            self.save()


def _tree(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(k, mx.array(v) if isinstance(v, np.ndarray) else v) for k, v in flat.items()])


def _ema_update(ema, params, decay: float):
    from mlx.utils import tree_map

    return tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _assign(target, source):
    """In-place update of a nested dict/list tree (so compiled-state references stay valid)."""
    if isinstance(target, dict):
        for k in source:
            if isinstance(target[k], (dict, list)):
                _assign(target[k], source[k])
            else:
                target[k] = source[k]
    else:
        for i, v in enumerate(source):
            if isinstance(target[i], (dict, list)):
                _assign(target[i], v)
            else:
                target[i] = v

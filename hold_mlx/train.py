"""MLX training: block-coordinate score matching with a compiled step and EMA.

The loop, schedule, checkpoints and resume logic are shared with the torch backend
(``trainloop.TrainerBase``); this file holds what is MLX-specific: the network, the compiled step
(model, optimizer, EMA and random state captured by ``mx.compile``) and the conversion of that
state to the neutral checkpoint tensors.

Data-parallel: launched with ``mlx.launch -n N ...`` every rank takes its slice of the global
batch and gradients are averaged with ``mx.distributed`` (rank 0 writes the run folder).
"""

from __future__ import annotations

import numpy as np

from ._mlx import mx, nn, optim, split_batch
from .backends import MLXBackend
from .model import Model, flat_params, set_flat_params
from .nets import build_net
from .parameterisation import ScoreParameterisation
from .trainloop import Batch, StepInfo, TrainConfig, TrainerBase, TrainingDiverged

__all__ = ["Trainer", "TrainConfig", "StepInfo", "TrainingDiverged"]


def _noise_key(seed: tuple[int, int]):
    """An MLX PRNG key that depends only on (seed, step)."""
    bits = np.random.default_rng([*seed, 3]).integers(0, 2**32, size=2, dtype=np.uint32)
    return mx.array(bits)


def score_matching_loss(model, n: int, x0, key, t, mean, chol, mixed, weight, rows=None, global_batch=None,
                        labels=None):
    """Block-coordinate score matching on the last block (``ScoreParameterisation.weighted_errors``),
    MLX arrays.

    The noise is drawn for the global batch and this rank's ``rows`` are kept, so data-parallel
    training sees exactly the numbers one process would; the rank's batch is then split across
    the CPU streams (``_mlx.split_batch``; one piece on a GPU), which leaves the loss unchanged.
    ``labels``: a class-conditional model's labels (B,) for this rank.
    """
    backend = MLXBackend()
    lo, hi = rows if rows is not None else (0, x0.shape[0])
    eps = mx.random.normal((n, global_batch or x0.shape[0]) + x0.shape[1:], key=key)[:, lo:hi]
    eps = eps.swapaxes(0, 1)  # batch first, for the split

    def piece(x0, eps, t, mean, chol, mixed, weight, *labels):
        eps_blocks = [eps[:, i] for i in range(n)]
        return ScoreParameterisation.weighted_errors(model, backend, x0, eps_blocks, t, mean, chol, mixed,
                                                     weight, *labels).sum()

    parts = split_batch(piece, x0, eps, t, mean, chol, mixed, weight, *(() if labels is None else (labels,)))
    return (parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])) / x0.shape[0]


class Trainer(TrainerBase):
    """MLX backend of :class:`TrainerBase`."""

    backend = "mlx"

    def _backend_distributed(self):
        if not mx.distributed.is_available():
            self.group = None
            return 0, 1
        self.group = mx.distributed.init()
        return self.group.rank(), self.group.size()

    def _backend_any(self, flag: bool) -> bool:
        return mx.distributed.all_sum(mx.array(int(flag)), group=self.group).item() > 0

    def _backend_build(self):
        self.backend = MLXBackend().configure()
        mine = np.array_split(np.arange(self.cfg.batch_size), self.world)[self.rank]
        self._rows = ((int(mine[0]), int(mine[-1]) + 1), self.cfg.batch_size)  # static: part of the compiled step
        mx.random.seed(self.cfg.seed)
        self.net = build_net(self.net_cfg)
        mx.eval(self.net.parameters())
        self.ema = _copy_tree(self.net.parameters())
        kwargs = dict(learning_rate=self.cfg.lr, bias_correction=True)  # the same Adam as torch
        self.optimizer = (optim.AdamW(weight_decay=self.cfg.weight_decay, **kwargs) if self.cfg.weight_decay
                          else optim.Adam(**kwargs))
        self.optimizer.init(self.net.trainable_parameters())
        self._step_fn = self._make_step()

    def _make_step(self):
        net, opt, cfg, n = self.net, self.optimizer, self.cfg, self.sde.order
        group = self.group if self.world > 1 else None
        rows, global_batch = self._rows
        grad_fn = nn.value_and_grad(net, lambda model, *args, labels=None: score_matching_loss(
            model, n, *args, rows, global_batch, labels=labels))
        # The global random state is captured too: dropout draws from it, and each step reseeds it
        # from (seed, step) so a resumed run draws the same masks.
        state = [net.state, opt.state, self.ema, mx.random.state]

        def step(x0, key, t, mean, chol, mixed, weight, *labels):
            loss, grads = grad_fn(net, x0, key, t, mean, chol, mixed, weight, labels=labels[0] if labels else None)
            if group is not None:
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / group.size()
            if cfg.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            opt.update(net, grads)
            _assign(self.ema, _ema_update(self.ema, net.parameters(), cfg.ema_decay))
            return loss

        return mx.compile(step, inputs=state, outputs=state) if cfg.compile else step

    def _backend_step(self, batch: Batch):
        self.net.train()
        self.optimizer.learning_rate = batch.lr
        mx.random.seed(int(np.random.default_rng([*batch.noise_seed, self.rank, 4]).integers(2**63)))
        labels = () if batch.labels is None else (mx.array(batch.labels.astype(np.int32)),)
        loss = self._step_fn(mx.array(batch.x0), _noise_key(batch.noise_seed), mx.array(batch.t),
                             mx.array(batch.mean), mx.array(batch.chol), mx.array(batch.mixed),
                             mx.array(batch.weight), *labels)
        mx.eval(loss, self.net.parameters(), self.optimizer.state, self.ema)
        return loss.item()

    # -- neutral state ----------------------------------------------------------------------------

    def _backend_state(self) -> dict[str, np.ndarray]:
        tensors = {f"raw/{k}": v for k, v in flat_params(self.net.parameters()).items()}
        tensors.update({f"ema/{k}": v for k, v in flat_params(self.ema).items()})
        for k, v in flat_params(self.optimizer.state).items():
            if k.endswith(".m") or k.endswith(".v"):
                tensors[f"adam_{k[-1]}/{k[:-2]}"] = v
        tensors["adam_step"] = np.array([int(self.optimizer.state["step"].item())], dtype=np.int64)
        return tensors

    def _backend_load_state(self, tensors):
        from mlx.utils import tree_flatten, tree_unflatten

        def take(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        source = str(self.out)
        set_flat_params(self.net, take("raw/"), source=source)
        ema_net = build_net(self.net_cfg)
        set_flat_params(ema_net, take("ema/"), source=source)
        _assign(self.ema, ema_net.parameters())
        moments = []
        for key, _ in tree_flatten(self.net.trainable_parameters()):
            moments += [(f"{key}.m", mx.array(tensors[f"adam_m/{key}"])), (f"{key}.v", mx.array(tensors[f"adam_v/{key}"]))]
        state = tree_unflatten(moments)
        state["step"] = mx.array(int(tensors["adam_step"].reshape(-1)[0]), dtype=mx.uint64)
        state["learning_rate"] = mx.array(self.cfg.lr)
        self.optimizer.state = state
        self._step_fn = self._make_step()  # the compiled step captured the old state objects

    def ema_score_model(self) -> Model:
        net = build_net(self.net_cfg)
        net.update(_copy_tree(self.ema))
        net.eval()
        config = {**self.model_config, "step": self.step}
        return Model(self.backend, self.backend.network_fn(net), self.sde, config, net=net)


def _copy_tree(tree):
    from mlx.utils import tree_map

    return tree_map(lambda x: mx.array(x), tree)


def _ema_update(ema, params, decay: float):
    from mlx.utils import tree_map

    return tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def _assign(target, source):
    """In-place update of a nested dict/list tree (so compiled-state references stay valid)."""
    keys = source.keys() if isinstance(source, dict) else range(len(source))
    for k in keys:
        if isinstance(target[k], (dict, list)):
            _assign(target[k], source[k])
        else:
            target[k] = source[k]

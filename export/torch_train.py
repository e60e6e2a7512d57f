"""The torch backend of the shared training loop: CPU or CUDA, AMP, channels_last, compile, DDP.

Same objective (``hold_mlx.parameterisation``), same batches, schedule, checkpoints and resume logic
(``hold_mlx.trainloop``) as MLX; a run folder moves between the two backends in both directions.

- Data stay channels-last (NHWC) as on MLX: the perturbation, the noise and the loss are computed
  on NHWC tensors and the network sees their NCHW view, which is torch's channels_last memory
  format for free.
- ``amp="bf16"`` (CUDA or CPU) / ``"fp16"`` (CUDA, with a GradScaler) autocasts the network only:
  the time embedding runs in fp32 inside it, and the perturbation, the loss and every SDE
  coefficient (float64 in the SDE module, handed over as fp32) stay in fp32.
- ``compile``: torch.compile of the network (wrapped in DDP when data-parallel), on CUDA only; on
  the CPU inductor's compile time outweighs its gain for these small models.
- Adam is the fused CUDA kernel on CUDA; its moments are stored in the neutral checkpoint format.
- Data-parallel: launched by ``torchrun --nproc_per_node N``, each rank trains on its slice of the
  global batch with DistributedDataParallel (NCCL on CUDA, gloo on the CPU); rank 0 writes. The
  noise of a step is drawn for the whole global batch and sliced, so N ranks compute the same
  gradient as one process on the full batch (up to the order of float sums).
- Reproducible: the noise and the dropout masks of step k depend on (seed, step) only, so a run
  resumed after a kill repeats the uninterrupted one (bitwise on the CPU).
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch

from hold_mlx.backends import TorchBackend
from hold_mlx.model import Model
from hold_mlx.parameterisation import ScoreParameterisation
from hold_mlx.trainloop import Batch, TrainConfig, TrainerBase

from .layout import checkpoint_to_torch, conv_weight_keys, torch_to_checkpoint
from .torch_model import apply_channels_last, checkpoint_tensors, load_weights, resolve_device
from .torch_nets import build_net

__all__ = ["TorchTrainer", "TrainConfig", "score_matching_loss", "AMP_DTYPES"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(parts, stream: int) -> int:
    """A 62-bit torch seed that depends only on ``parts`` and the stream number."""
    return int(np.random.default_rng([*parts, stream]).integers(2**62))


def score_matching_loss(net, x0, eps, t, mean, chol, mixed, weight, *, amp_dtype=None,
                        memory_format=torch.contiguous_format, labels=None):
    """Block-coordinate score matching on the last block (``ScoreParameterisation.weighted_errors``),
    in fp32.

    x0 (b, *data_shape) channels-last data, eps (n, b, *data_shape) standard normal noise, t / mixed
    / weight (b,), mean (b, n), chol (b, n, n), labels (b,) int64 for a class-conditional net.
    Only the network runs under autocast."""

    def network(u, t):
        with torch.autocast(device_type=x0.device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            return apply_channels_last(net, u, t, labels=labels, memory_format=memory_format).float()

    eps_blocks = [eps[i] for i in range(eps.shape[0])]
    return ScoreParameterisation.weighted_errors(network, TorchBackend(x0.device), x0, eps_blocks, t, mean, chol,
                                                 mixed, weight).mean()


class TorchTrainer(TrainerBase):
    """torch backend of :class:`TrainerBase`."""

    backend = "torch"

    def _backend_distributed(self):
        self.device = resolve_device(self.cfg.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1
        import torch.distributed as dist

        if self.device.type == "cuda":
            self.device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            if self.device.type == "cuda":
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
            atexit.register(_destroy_process_group)
        return dist.get_rank(), dist.get_world_size()

    def _backend_any(self, flag: bool) -> bool:
        import torch.distributed as dist

        flag_tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(flag_tensor)
        return bool(flag_tensor.item())

    def _backend_build(self):
        cfg = self.cfg
        if cfg.amp not in AMP_DTYPES:
            raise ValueError(f"unknown --amp {cfg.amp!r}; choose none, bf16 or fp16")
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("--amp fp16 needs --device cuda; on the CPU use --amp bf16 or none")
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.net = build_net(self.net_cfg).to(self.device)
        self.image = self.net_cfg.kind == "unet"
        self.memory_format = torch.channels_last if (cfg.channels_last and self.image) else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        self.conv_keys = conv_weight_keys(self.net)
        self._live = self.net.state_dict()  # views of the parameters and buffers, updated in place
        self._init_ema({k: v.detach().clone().float() for k, v in self._live.items()})
        self._params = {k: p for k, p in self.net.named_parameters() if p.requires_grad}
        opt_cls = torch.optim.AdamW if cfg.weight_decay else torch.optim.Adam
        self.optimizer = opt_cls(self._params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True if self.device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.model = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model)

    def _init_ema(self, ema: dict[str, torch.Tensor]) -> None:
        self.ema = ema
        self._ema_list = [ema[k] for k in self._live]
        self._live_list = list(self._live.values())

    def _to_device(self, a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

    def _noise(self, batch: Batch, data_shape: tuple[int, ...]):
        """The step's N(0, 1) noise, (n, b, *data_shape) for this rank: drawn for the whole global
        batch from a generator keyed by (seed, step), then sliced like the data."""
        generator = torch.Generator(device=self.device).manual_seed(_seed(batch.noise_seed, 3))
        full = torch.randn((self.sde.order, batch.global_batch, *data_shape), generator=generator, device=self.device)
        lo, hi = batch.rows
        return full[:, lo:hi]

    def _backend_step(self, batch: Batch):
        cfg = self.cfg
        self.net.train()
        torch.manual_seed(_seed((*batch.noise_seed, self.rank), 4))  # dropout masks: a function of the step
        for group in self.optimizer.param_groups:
            group["lr"] = batch.lr
        x0 = self._to_device(batch.x0)
        eps = self._noise(batch, tuple(x0.shape[1:]))
        loss = score_matching_loss(self.model, x0, eps, self._to_device(batch.t), self._to_device(batch.mean),
                                   self._to_device(batch.chol), self._to_device(batch.mixed),
                                   self._to_device(batch.weight), amp_dtype=self.amp_dtype,
                                   memory_format=self.memory_format,
                                   labels=None if batch.labels is None else self._to_device(batch.labels))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params.values(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_list, self._live_list, 1.0 - cfg.ema_decay)
        loss = loss.detach()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss)
            loss = loss / self.world
        return loss.item()

    # -- neutral state ----------------------------------------------------------------------------

    def _backend_state(self) -> dict[str, np.ndarray]:
        tensors = {f"raw/{k}": v for k, v in checkpoint_tensors(self.net).items()}
        ema = torch_to_checkpoint({k: v.cpu().numpy() for k, v in self.ema.items()}, self.conv_keys)
        tensors.update({f"ema/{k}": v for k, v in ema.items()})
        moments_m, moments_v, step = {}, {}, 0
        for key, p in self._params.items():
            state = self.optimizer.state.get(p)
            if not state:  # no step taken yet: zero moments, as a fresh optimizer has
                moments_m[key] = np.zeros(tuple(p.shape), np.float32)
                moments_v[key] = np.zeros(tuple(p.shape), np.float32)
                continue
            moments_m[key] = state["exp_avg"].detach().float().cpu().numpy()
            moments_v[key] = state["exp_avg_sq"].detach().float().cpu().numpy()
            step = int(state["step"])
        tensors.update({f"adam_m/{k}": v for k, v in torch_to_checkpoint(moments_m, self.conv_keys).items()})
        tensors.update({f"adam_v/{k}": v for k, v in torch_to_checkpoint(moments_v, self.conv_keys).items()})
        tensors["adam_step"] = np.array([step], dtype=np.int64)
        return tensors

    def _backend_load_state(self, tensors):
        def take(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        load_weights(self.net, take("raw/"), source=str(self.out))
        ema_net = build_net(self.net_cfg)
        load_weights(ema_net, take("ema/"), source=str(self.out))
        self._init_ema({k: v.detach().float().to(self.device) for k, v in ema_net.state_dict().items()})
        m = checkpoint_to_torch(take("adam_m/"), self.conv_keys)
        v = checkpoint_to_torch(take("adam_v/"), self.conv_keys)
        step = int(tensors["adam_step"].reshape(-1)[0])
        self.optimizer.state.clear()
        if step == 0:
            return
        # Adam keeps "step" on the device for the fused kernel, as a CPU scalar otherwise
        step_device = self.device if self.device.type == "cuda" else "cpu"
        for name, p in self._params.items():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=step_device),
                "exp_avg": torch.empty_like(p).copy_(torch.from_numpy(m[name])),  # p's memory format
                "exp_avg_sq": torch.empty_like(p).copy_(torch.from_numpy(v[name])),
            }

    def ema_score_model(self) -> Model:
        net = build_net(self.net_cfg)
        net.load_state_dict({k: v.cpu() for k, v in self.ema.items()})
        net = net.to(self.device).eval()
        backend = TorchBackend(self.device)
        return Model(backend, backend.network_fn(net), self.sde, {**self.model_config, "step": self.step}, net=net)


def _destroy_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

"""The torch backend of the shared training loop: CPU or CUDA, AMP, channels_last, DDP.

Same objective (``hold_mlx.objective``), same batches, schedule, checkpoints and resume logic
(``hold_mlx.trainloop``) as MLX; a run folder moves between the two backends in both directions.

- CUDA: ``--amp bf16|fp16`` autocasts the network; the time embedding, the loss and every SDE
  coefficient stay in fp32 (coefficients are computed in float64 by the SDE module).
- ``compile``: torch.compile of the network, on CUDA only (on the CPU inductor's compile time
  outweighs its gain for these small models).
- Data-parallel: launched by ``torchrun --nproc_per_node N``, each rank trains on its slice of the
  global batch with DistributedDataParallel (NCCL on CUDA, gloo on the CPU); rank 0 writes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hold_mlx.objective import perturb, residual
from hold_mlx.trainloop import Batch, TrainConfig, TrainerBase

from .layout import checkpoint_to_torch, conv_weight_keys, torch_to_checkpoint
from .torch_model import TorchScoreModel, checkpoint_tensors, load_weights, resolve_device
from .torch_nets import build_net

__all__ = ["TorchTrainer", "TrainConfig", "score_matching_loss"]

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def score_matching_loss(net, n: int, x0, generator, t, mean, chol, mixed, weight, amp_dtype=None):
    """Block-coordinate score matching on the last block (objective.py); NCHW tensors."""
    shape = (-1,) + (1,) * (x0.ndim - 1)

    def per_sample(col):
        return col.reshape(shape)

    eps = torch.randn((n,) + tuple(x0.shape), generator=generator, device=x0.device)
    blocks = perturb(x0, [eps[i] for i in range(n)], mean, chol, per_sample)
    u = torch.cat(blocks, dim=1)
    with torch.autocast(device_type=x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        alpha = net(u, t)
    r = residual(alpha.float(), blocks[-1], eps[-1], mixed, per_sample)
    per_example = (r * r).reshape(r.shape[0], -1).mean(dim=1)
    return (weight * per_example).mean()


class TorchTrainer(TrainerBase):
    """torch backend of :class:`TrainerBase`."""

    backend = "torch"

    def _backend_distributed(self):
        self.device = resolve_device(self.cfg.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        return dist.get_rank(), dist.get_world_size()

    def _backend_build(self):
        cfg = self.cfg
        if cfg.amp not in _AMP:
            raise ValueError(f"unknown --amp {cfg.amp!r}; choose none, bf16 or fp16")
        self.amp_dtype = _AMP[cfg.amp] if self.device.type == "cuda" else None
        torch.manual_seed(cfg.seed)
        self.net = build_net(self.net_cfg).to(self.device)
        self.memory_format = torch.channels_last if (cfg.channels_last and self.net_cfg.kind == "unet") else None
        if self.memory_format is not None:
            self.net = self.net.to(memory_format=self.memory_format)
        self.conv_keys = conv_weight_keys(self.net)
        self.ema = {k: v.detach().clone().float() for k, v in self.net.state_dict().items()}
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.weight_decay else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=self.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.model = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model)
        self._param_names = {id(p): k for k, p in self.net.named_parameters()}

    def _to_device(self, a: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)

    def _backend_step(self, batch: Batch):
        cfg = self.cfg
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = batch.lr
        x0 = self._to_device(batch.x0)
        if x0.ndim == 4:  # NHWC batch -> NCHW
            x0 = x0.permute(0, 3, 1, 2)
            x0 = x0.contiguous(memory_format=self.memory_format or torch.contiguous_format)
        generator = torch.Generator(device=self.device).manual_seed(int(np.random.default_rng([*batch.noise_seed, 3]).integers(2**62)))
        loss = score_matching_loss(self.model, self.sde.order, x0, generator, self._to_device(batch.t),
                                   self._to_device(batch.mean), self._to_device(batch.chol),
                                   self._to_device(batch.mixed), self._to_device(batch.weight), self.amp_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                self.ema[k].lerp_(v.float(), 1.0 - cfg.ema_decay)
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
        for p, state in self.optimizer.state.items():
            key = self._param_names[id(p)]
            moments_m[key] = state["exp_avg"].detach().float().cpu().numpy()
            moments_v[key] = state["exp_avg_sq"].detach().float().cpu().numpy()
            step = int(state["step"])
        if not moments_m:  # no step taken yet: zero moments, as a fresh optimizer has
            moments_m = {k: np.zeros(tuple(p.shape), np.float32) for k, p in self.net.named_parameters() if p.requires_grad}
            moments_v = {k: v.copy() for k, v in moments_m.items()}
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
        self.ema = {k: v.detach().float().to(self.device) for k, v in ema_net.state_dict().items()}
        m = checkpoint_to_torch(take("adam_m/"), self.conv_keys)
        v = checkpoint_to_torch(take("adam_v/"), self.conv_keys)
        step = int(tensors["adam_step"].reshape(-1)[0])
        if step > 0:
            for name, p in self.net.named_parameters():
                if p.requires_grad:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step), device=self.device if self.device.type == "cuda" else "cpu"),
                        "exp_avg": torch.from_numpy(np.array(m[name])).to(self.device, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.from_numpy(np.array(v[name])).to(self.device),
                    }

    def ema_score_model(self):
        from hold_mlx.backends import TorchOps

        net = build_net(self.net_cfg)
        net.load_state_dict({k: v.cpu() for k, v in self.ema.items()})
        net = net.to(self.device).eval()
        return TorchScoreModel(net, self.sde, {**self.model_config, "step": self.step}), TorchOps(self.device)



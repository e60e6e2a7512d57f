"""One Backend per framework: MLX, torch, and NumPy (which onnxruntime uses).

A backend owns everything that differs between frameworks: the few array operations the samplers
need beyond arithmetic (+, -, * with Python floats, which all three share), its native random
generator, the VJP probe the likelihood needs, loading a checkpoint's network, and its CPU tuning
(``configure``, explicit and idempotent). Everything above it (the samplers, the score
parameterisation, ``hold_mlx.load``) is written once. ``BACKENDS`` maps names to classes; MLX,
torch and onnxruntime are imported only when their backend is created.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

__all__ = ["Backend", "NumpyBackend", "MLXBackend", "TorchBackend", "OnnxBackend", "BACKENDS",
           "get_backend", "array_framework"]


class Backend:
    """The operations a sampler needs beyond arithmetic, and the framework's own services.

    Arrays have the batch on axis 0.
    """

    name = "abstract"
    #: The module prefix of this backend's array type (see :func:`array_framework`).
    array_module = ""

    # -- set-up ----------------------------------------------------------------------------------

    def configure(self, threads: int | None = None) -> "Backend":
        """Apply this framework's CPU settings (idempotent); returns the backend."""
        return self

    def load_network(self, path) -> tuple[object, Callable, dict]:
        """(network, network_fn, config) from a checkpoint: the framework's network object, its
        output as a function of (u, t) on this backend's arrays (of (u, t, labels) too, for a
        class-conditional network: labels from :meth:`asindex`), and the checkpoint config."""
        raise ValueError(f"the {self.name} backend runs a given score function; it cannot load a checkpoint")

    def inference(self):
        """Context for evaluating the score without gradients (torch: ``no_grad``)."""
        return contextlib.nullcontext()

    # -- arrays ----------------------------------------------------------------------------------

    def asarray(self, x: np.ndarray):  # numpy -> backend float32
        raise NotImplementedError

    def to_numpy(self, x) -> np.ndarray:
        raise NotImplementedError

    def asindex(self, x: np.ndarray):  # numpy integers -> backend integer array (class labels)
        raise NotImplementedError

    def concat(self, xs: list):  # along the last axis
        raise NotImplementedError

    def sqrt(self, x):
        raise NotImplementedError

    def where(self, cond, a, b):
        raise NotImplementedError

    def abs(self, x):
        return abs(x)

    def maximum(self, a, b):
        raise NotImplementedError

    def concat_batch(self, xs: list):  # along axis 0
        raise NotImplementedError

    def per_sample_mask(self, mask: np.ndarray, ndim: int):
        """(B,) bool NumPy mask -> backend bool array (B, 1, ..., 1) for ``where``."""
        return np.asarray(mask, dtype=bool).reshape((-1,) + (1,) * (ndim - 1))

    def eval(self, *xs) -> None:
        """Force computation (MLX is lazy); keeps the graph small between sampler steps."""

    def per_sample(self, values: np.ndarray, ndim: int):
        """(B,) float64 NumPy values -> backend array shaped (B, 1, ..., 1) to scale a batch."""
        return self.asarray(np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1)))

    def sum_squares(self, x) -> np.ndarray:
        """Per-sample sum of squares, as float64 NumPy (B,)."""
        flat = x.reshape(x.shape[0], -1)
        return self.to_numpy((flat * flat).sum(axis=1)).astype(np.float64)

    def all_finite(self, x) -> bool:
        return bool(np.isfinite(self.to_numpy(x)).all())

    # -- randomness and autodiff -----------------------------------------------------------------

    def native_normal(self, seed: int) -> Callable:
        """draw(shape) -> N(0, 1) backend array from the framework's own generator, seeded once."""
        raise NotImplementedError

    def vjp_probe(self, score_fn: Callable, width: int) -> Callable:
        """(u, t, z) -> (s, q): the score s(u, t) and q = z.(ds/du_n) z per sample, shape (B,).

        ``width`` is the size of one block on the last axis; z is shaped like one block. A
        reverse-mode VJP z^T (ds/du_n) (MLX has no forward-mode rule for convolutions).
        """
        raise ValueError(f"the likelihood needs autodiff through the score network: use the mlx or torch "
                         f"backend, not {self.name}")



def _model_file(path):
    """The .safetensors file of a checkpoint (None: the shipped model); an .onnx file is refused."""
    from .checkpoint import default_checkpoint, resolve_model_file

    if path is not None and str(path).lower().endswith(".onnx"):
        raise ValueError(f"{path}: an ONNX model runs with --backend onnx (MLX and torch read the "
                         ".safetensors checkpoint it was exported from)")
    return resolve_model_file(path if path is not None else default_checkpoint())


class NumpyBackend(Backend):
    name = "numpy"
    array_module = "numpy"

    def __init__(self, dtype=np.float32, device: str | None = None):
        self.dtype = dtype

    def asarray(self, x):
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def asindex(self, x):
        return np.asarray(x, dtype=np.int64)

    def concat(self, xs):
        return np.concatenate(xs, axis=-1)

    def sqrt(self, x):
        return np.sqrt(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def concat_batch(self, xs):
        return np.concatenate(xs, axis=0)

    def native_normal(self, seed):
        rng = np.random.default_rng(seed)
        return lambda shape: rng.standard_normal(shape).astype(self.dtype)


class OnnxBackend(NumpyBackend):
    """NumPy arrays; the network is an exported .onnx graph run by onnxruntime."""

    name = "onnx"

    def __init__(self, dtype=np.float32, device: str | None = None):
        super().__init__(dtype)
        self.threads = None
        self.session_options: dict = {}

    def configure(self, threads=None, **session_options):
        """``threads``: onnxruntime intra-op threads of sessions made afterwards (None: its default);
        ``session_options``: ``optimization``, ``sequential``, ``providers`` (see ``make_session``)."""
        self.threads = threads
        self.session_options = session_options
        return self

    def load_network(self, path):
        try:
            from hold_export.onnx_runtime import open_onnx_network
        except ImportError as err:
            raise RuntimeError(f"--backend onnx needs onnxruntime: pip install 'hold-mlx[onnx]' ({err})") from err
        network, config = open_onnx_network(path, threads=self.threads, **self.session_options)
        return network, network, config


class MLXBackend(Backend):
    name = "mlx"
    array_module = "mlx"

    def __init__(self, device: str | None = None):
        from ._mlx import mx

        self.mx = mx

    def configure(self, threads=None):
        """Buffer cache, CPU streams and BLAS threads (``_mlx.configure_cpu``)."""
        from ._mlx import configure_cpu

        configure_cpu(threads)
        return self

    def load_network(self, path, *, compile: bool = True, parallel: bool = True):
        from .checkpoint import net_config_from, read_tensors
        from .model import set_flat_params
        from .nets import build_net

        path = _model_file(path)
        tensors, config = read_tensors(path)
        net = build_net(net_config_from(config, path))
        set_flat_params(net, tensors, source=str(path))
        net.eval()
        return net, self.network_fn(net, compile=compile, parallel=parallel), config

    def network_fn(self, net, *, compile: bool = True, parallel: bool = True) -> Callable:
        """net(u, t) compiled, with the batch split across the CPU streams (``_mlx.split_batch``).

        Compiled: element-wise chains fuse into single loops (the fast CPU ops rely on it). The
        network's arrays are declared inputs, so updated weights are seen.
        """
        from ._mlx import split_batch

        mx = self.mx
        call = mx.compile(net.__call__, inputs=[net]) if compile else net.__call__

        def network(u, t, labels=None):
            inputs = (u, t) if labels is None else (u, t, labels)
            pieces = split_batch(call, *inputs) if parallel else [call(*inputs)]
            return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)

        return network

    def asarray(self, x):
        return self.mx.array(np.asarray(x, dtype=np.float32))

    def asindex(self, x):
        return self.mx.array(np.asarray(x, dtype=np.int32))

    def to_numpy(self, x):
        return np.array(x)

    def concat(self, xs):
        return self.mx.concatenate(xs, axis=-1)

    def sqrt(self, x):
        return self.mx.sqrt(x)

    def where(self, cond, a, b):
        return self.mx.where(cond if not isinstance(cond, np.ndarray) else self.mx.array(cond), a, b)

    def maximum(self, a, b):
        return self.mx.maximum(a, b)

    def concat_batch(self, xs):
        return self.mx.concatenate(xs, axis=0)

    def eval(self, *xs):
        self.mx.eval(*xs)

    def sum_squares(self, x):
        flat = x.reshape(x.shape[0], -1)
        return np.array((flat * flat).sum(axis=1)).astype(np.float64)

    def native_normal(self, seed):
        mx = self.mx
        key = [mx.random.key(seed)]

        def draw(shape):
            key[0], sub = mx.random.split(key[0])
            return mx.random.normal(shape, key=sub)

        return draw

    def vjp_probe(self, score_fn, width):
        mx = self.mx

        def probe(u, t, z):
            rest, last = u[..., :-width], u[..., -width:]

            def score_of_last(v):
                return score_fn(mx.concatenate([rest, v], axis=-1) if rest.shape[-1] else v, t)

            (s,), (zj,) = mx.vjp(score_of_last, [last], [z])
            return s, (zj * z).reshape(z.shape[0], -1).sum(axis=1)

        return probe


class TorchBackend(Backend):
    name = "torch"
    array_module = "torch"

    def __init__(self, device="cpu", *, amp_dtype=None, memory_format=None):
        try:
            import torch
        except ImportError as err:
            raise RuntimeError("--backend torch needs PyTorch: pip install 'hold-mlx[torch]' "
                               "(on Linux: pip install torch==2.13.0 first)") from err
        self.torch = torch
        if isinstance(device, str):
            from hold_export.torch_model import resolve_device

            device = resolve_device(device)
        self.device = torch.device(device)
        # e.g. torch.bfloat16 on CUDA: the network autocast, its time embedding, the score and the
        # sampler in fp32 (None: fp32 throughout, the setting the parity tests hold to MLX)
        self.amp_dtype = amp_dtype

    def configure(self, threads=None):
        """``threads``: torch's intra-op CPU threads (None: leave torch's default)."""
        if threads and self.torch.get_num_threads() != int(threads):
            self.torch.set_num_threads(int(threads))
        return self

    def load_network(self, path):
        from hold_export.torch_model import load_weights
        from hold_export.torch_nets import build_net

        from .checkpoint import net_config_from, read_tensors

        path = _model_file(path)
        tensors, config = read_tensors(path)
        net = build_net(net_config_from(config, path))
        load_weights(net, tensors, source=str(path))
        net = net.to(self.device).eval()
        return net, self.network_fn(net), config

    def network_fn(self, net) -> Callable:
        """The network output, channels-last like u, in u's dtype (autocast to ``amp_dtype``)."""
        from hold_export.torch_model import apply_channels_last

        torch = self.torch

        def network(u, t, labels=None):
            with torch.autocast(device_type=u.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None), self._full_fp32(u.device):
                return apply_channels_last(net, u, t.to(u.dtype), labels=labels).to(u.dtype)

        return network

    @contextlib.contextmanager
    def _full_fp32(self, device):
        """fp32 on CUDA without TF32 (torch's default for convolutions rounds inputs to 10 bits):
        measured on an H200, TF32 moved 10-step samples of the shipped model by 3.7e-3 from the
        CPU's, against the 1e-4 the portable-noise promise holds MLX, torch and onnxruntime to."""
        if device.type != "cuda" or self.amp_dtype is not None:
            yield
            return
        backends = self.torch.backends
        saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved

    def inference(self):
        return self.torch.no_grad()

    def asarray(self, x):
        return self.torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def asindex(self, x):
        return self.torch.as_tensor(np.asarray(x, dtype=np.int64), device=self.device)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def concat(self, xs):
        return self.torch.cat(xs, dim=-1)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def where(self, cond, a, b):
        if isinstance(cond, np.ndarray):
            cond = self.torch.as_tensor(cond, device=self.device)
        return self.torch.where(cond, a, b)

    def maximum(self, a, b):
        return self.torch.maximum(a, b)

    def concat_batch(self, xs):
        return self.torch.cat(xs, dim=0)

    def sum_squares(self, x):
        flat = x.reshape(x.shape[0], -1)
        return (flat * flat).sum(dim=1).double().cpu().numpy()

    def native_normal(self, seed):
        generator = self.torch.Generator(device=self.device).manual_seed(seed)
        return lambda shape: self.torch.randn(shape, generator=generator, device=self.device)

    def vjp_probe(self, score_fn, width):
        torch = self.torch
        fn = getattr(score_fn, "score", score_fn)  # a Model's __call__ runs without gradients

        def probe(u, t, z):
            with torch.enable_grad():
                last = u[..., -width:].detach().requires_grad_(True)
                v = torch.cat([u[..., :-width].detach(), last], dim=-1) if u.shape[-1] > width else last
                s = fn(v, t)
                (zj,) = torch.autograd.grad(s, last, grad_outputs=z)
            return s.detach(), (zj * z).reshape(z.shape[0], -1).sum(dim=1)

        return probe


#: Backend classes by name ("numpy" and "onnx" both compute on NumPy arrays).
BACKENDS: dict[str, type[Backend]] = {"mlx": MLXBackend, "torch": TorchBackend, "onnx": OnnxBackend,
                                      "numpy": NumpyBackend}


def get_backend(name: str, **kwargs) -> Backend:
    """A backend by name: "mlx", "torch" (device=...), "onnx" or "numpy"."""
    try:
        cls = BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    return cls(**kwargs)


def array_framework(x) -> str:
    """"numpy", "mlx" or "torch": the framework of an array (by its type's module)."""
    return "numpy" if isinstance(x, np.ndarray) else type(x).__module__.split(".")[0]

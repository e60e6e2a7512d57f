"""Export a checkpoint's score network to one self-contained .onnx file, checked against torch.

The graph is (u, t) -> alpha: u the channels-last extended state (B, ..., n*C), t the forward
times (B,), alpha the network output (B, ..., C), with a dynamic batch axis; a class-conditional
model's graph is (u, t, labels) -> alpha, labels int64 (B,) (num_classes: "no label"), and its
class names travel in the metadata (the data section, and ``hold_mlx.classes``). The NCHW transposes
live inside the graph, so the samplers hand over their NumPy state as it is (onnxruntime folds
the transposes into its own conv layout). The score is NOT in the graph: its coefficients a(t),
b(t) need expm and a Cholesky factor in float64, which ``hold_export.onnx_runtime`` computes with
``hold_mlx.sde`` from the SDE stored in the file's metadata (docs/onnx.md).

Before anything is written, onnxruntime must reproduce torch on random inputs at several batch
sizes; a mismatch raises :class:`OnnxExportError`. Needs torch, onnx, onnxscript and onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from hold_mlx import __version__
from hold_mlx.checkpoint import atomic_write, default_checkpoint, resolve_model_file
from hold_mlx.model import load

from .onnx_runtime import GraphInfo, OnnxNetwork, _config_from_props, make_session, onnx_metadata

__all__ = ["OnnxExportError", "ExportReport", "export_onnx", "export_graph", "CHECK_BATCHES", "TOLERANCE"]

#: Batch sizes the exporter checks onnxruntime against torch at (1 and an odd size: the batch axis
#: really is dynamic, though the graph was traced at batch 2).
CHECK_BATCHES = (1, 2, 7)
#: Largest allowed max|onnxruntime - torch| / max(1, max|torch|), by precision. fp32 graphs land
#: near 1e-6 (summation order), fp16 near 1e-3 (time features kept in fp32).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class OnnxExportError(RuntimeError):
    """The export failed or its output does not match torch; nothing was written."""


@dataclass
class ExportReport:
    path: Path
    opset: int
    precision: str
    size_bytes: int
    errors: dict[int, float] = field(default_factory=dict)  # batch size -> relative max error


class ChannelsLast(torch.nn.Module):
    """The U-Net with the samplers' layout at its boundary: NHWC in, NHWC out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, u, t):
        return self.net(u.permute(0, 3, 1, 2), t).permute(0, 2, 3, 1)


class ChannelsLastLabelled(torch.nn.Module):
    """A class-conditional U-Net with the samplers' layout at its boundary: (u NHWC, t, labels)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, u, t, labels):
        return self.net(u.permute(0, 3, 1, 2), t, labels).permute(0, 2, 3, 1)


class Labelled(torch.nn.Module):
    """A class-conditional MLP: (u, t, labels) -> alpha."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, u, t, labels):
        return self.net(u, t, labels)


def _random_labels(config: dict, batch: int, rng: np.random.Generator) -> np.ndarray | None:
    """Labels for a conditional model's checks, "no label" included; None when unconditional."""
    classes = int(config["net"].get("num_classes", 0))
    return rng.integers(0, classes + 1, batch).astype(np.int64) if classes else None


def _random_inputs(sde, state_shape: tuple[int, ...], batch: int, rng: np.random.Generator):
    """u ~ N(0, 1) and t log-uniform on [eps_sample, T] (log t feeds the time embedding)."""
    u = rng.standard_normal((batch, *state_shape)).astype(np.float32)
    t = np.exp(rng.uniform(np.log(sde.eps_sample), np.log(sde.T), batch)).astype(np.float32)
    return u, t


def export_graph(module: torch.nn.Module, example: tuple, input_names, output_names, *, opset=None,
                 batched=None):
    """torch.onnx.export (dynamo) of ``module`` to an in-memory ModelProto, quietly.

    The exporter's progress lines, warnings and logs are captured; on failure their first line is
    part of the error. Axis 0 of the inputs named in ``batched`` (default: all) is one dynamic
    "batch" dimension.
    """
    batch = torch.export.Dim("batch")
    batched = set(input_names if batched is None else batched)
    dynamic = {name: ({0: batch} if name in batched else None) for name in input_names}
    captured = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, example, dynamo=True, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=dynamic,
                                        opset_version=opset, external_data=False, verbose=False)
            return program.model_proto
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OnnxExportError(f"torch.onnx.export failed: {first[:300]}") from err
    finally:
        quiet.setLevel(level)


class HalfPrecision(torch.nn.Module):
    """The network in fp16 behind float32 inputs and outputs; the Fourier time features stay fp32.

    Their phases 2 pi w log t reach ~1e3 rad, where fp16 spacing (~0.5) would scramble sin/cos,
    so t, log t and W never pass through fp16 (an ONNX-level fp16 conversion rounds t and W).
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        fourier = net.time_features
        self.net = copy.deepcopy(net).half()
        self.net.time_features = _Fp16Features(copy.deepcopy(fourier).float())

    def forward(self, u, t, labels=None):
        return self.net(u.half(), t, *(() if labels is None else (labels,))).float()


class _Fp16Features(torch.nn.Module):
    def __init__(self, fourier: torch.nn.Module):
        super().__init__()
        self.fourier = fourier

    def forward(self, t):
        return self.fourier(t.float()).half()


def export_onnx(checkpoint=None, out="model.onnx", *, opset: int | None = None, fp16: bool = False,
                check_batches=CHECK_BATCHES, seed: int = 0) -> ExportReport:
    """Export ``checkpoint`` (run folder or .safetensors; None: the shipped model) to ``out``.

    The file is written only after onnxruntime matched torch at every batch size in
    ``check_batches``; otherwise :class:`OnnxExportError` names the batch and the error.
    """
    if checkpoint is not None and str(checkpoint).lower().endswith(".onnx"):
        raise ValueError(f"{checkpoint} is already an ONNX model; export reads a run folder or .safetensors file")
    source = resolve_model_file(checkpoint if checkpoint is not None else default_checkpoint())
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out must end in .onnx, got {out.name!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 18 <= opset <= newest:
        raise ValueError(f"--opset {opset}: choose 18 to {newest} (the newest opset this onnx package knows)")
    torch_model = load(source, "torch", device="cpu")
    sde, config = torch_model.sde, torch_model.config
    net = HalfPrecision(torch_model.net) if fp16 else torch_model.net
    conditional = bool(config["net"].get("num_classes", 0))
    if conditional:
        module = (ChannelsLastLabelled(net) if config["net"]["kind"] == "unet" else Labelled(net)).eval()
    else:
        module = (ChannelsLast(net) if config["net"]["kind"] == "unet" else net).eval()
    data_shape = tuple(int(s) for s in config["data"]["shape"])
    state_shape = data_shape[:-1] + (sde.order * data_shape[-1],)
    rng = np.random.default_rng(seed)

    u, t = _random_inputs(sde, state_shape, 2, rng)  # batch >= 2: the exporter keeps axis 0 dynamic
    example, names = (torch.from_numpy(u), torch.from_numpy(t)), ["u", "t"]
    if conditional:
        example, names = (*example, torch.from_numpy(_random_labels(config, 2, rng))), [*names, "labels"]
    with torch.no_grad():
        model = export_graph(module, example, names, ["alpha"], opset=opset)
    precision = "fp16" if fp16 else "fp32"
    opset_used = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph = GraphInfo(precision=precision, opset=int(opset_used))
    for key, value in onnx_metadata(config, graph).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "hold-mlx", __version__
    model.doc_string = (f"hold-mlx score network alpha(u, t) from {source.name}; score = a(t) alpha + b(t) u_n "
                        "(see the hold_mlx.* metadata)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise OnnxExportError(f"the exported graph is not valid ONNX: {str(err).splitlines()[0]}") from err
    data = model.SerializeToString()

    errors = check_against_torch(data, torch_model, sde, state_shape, check_batches, precision, rng, out)
    atomic_write(out, data)
    return ExportReport(out, int(opset_used), precision, len(data), errors)


def check_against_torch(data: bytes, torch_model, sde, state_shape, batches, precision, rng, out) -> dict[int, float]:
    """Run the serialized graph in onnxruntime (through the same loader ``sample`` uses) and torch
    on random inputs; raise if any batch size differs by more than TOLERANCE[precision]."""
    try:
        session = make_session(data)
    except Exception as err:  # onnxruntime's own exception types; e.g. an opset it does not know yet
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OnnxExportError(f"onnxruntime cannot load the exported graph ({first[:200]}); "
                              f"try a lower --opset; {out} was not written") from err
    config, graph = _config_from_props(session.get_modelmeta().custom_metadata_map, out)
    ort_network = OnnxNetwork(session, config, graph, source=out)
    errors = {}
    for batch in batches:
        u, t = _random_inputs(sde, state_shape, batch, rng)
        labels = _random_labels(config, batch, rng)
        with torch.no_grad():
            ref = torch_model.alpha(torch.from_numpy(u), torch.from_numpy(t),
                                    None if labels is None else torch.from_numpy(labels)).numpy()
        got = ort_network(u, t, labels)
        if got.shape != ref.shape:
            raise OnnxExportError(f"onnxruntime returned shape {got.shape} at batch {batch}, torch {ref.shape}; "
                                  f"{out} was not written")
        err = float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))
        if not err <= TOLERANCE[precision]:  # also catches NaN
            raise OnnxExportError(f"onnxruntime differs from torch at batch {batch}: relative max error {err:.2e} "
                                  f"> {TOLERANCE[precision]:.0e} ({precision}); {out} was not written")
        errors[batch] = err
    return errors

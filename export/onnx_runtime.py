"""Sampling from an exported .onnx file with onnxruntime and NumPy alone (no torch, no MLX).

The graph computes alpha(u, t), the network output, for a channels-last extended state u
(B, ..., n*C) and forward times t (B,); a class-conditional model's graph also takes int64
labels (B,) (the label equal to the net section's "num_classes" is "no label").
``hold_mlx.load("model.onnx", backend="onnx")`` wraps it in the same ``Model`` as MLX and torch:
the score a(t) alpha + b(t) u_n is assembled by ``hold_mlx.parameterisation.ScoreParameterisation``
in float64 from the SDE stored in the file's metadata (one source of truth for the math; see
docs/onnx.md). Everything a deployment needs is in the .onnx file's metadata_props
(``onnx_metadata``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hold_mlx.checkpoint import CheckpointError, validate_config

__all__ = ["ONNX_FORMAT", "CONFIG_PREFIX", "GRAPH_KEY", "CLASSES_KEY", "GraphInfo", "OnnxNetwork", "open_onnx_network",
           "make_session", "onnx_metadata", "OPT_LEVELS"]

#: Version of the graph contract (inputs u, t; output alpha; metadata keys below).
ONNX_FORMAT = 1
#: metadata_props keys: one JSON value per section of the checkpoint config, plus the graph's own.
CONFIG_PREFIX = "hold_mlx.config."
GRAPH_KEY = "hold_mlx.graph"
#: A class-conditional model's class names (JSON list), for deployments that read no config.
CLASSES_KEY = "hold_mlx.classes"

#: onnxruntime graph optimisation levels by name (docs/onnx.md has the measurements).
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class GraphInfo:
    """What the graph computes and how it is laid out (the ``hold_mlx.graph`` metadata)."""

    format: int = ONNX_FORMAT
    output: str = "alpha"  # the network output; the score is assembled by the runtime
    io_layout: str = "channels-last"  # u (B, ..., n*C) and alpha (B, ..., C), like the samplers
    precision: str = "fp32"  # fp32 | fp16 (weights and activations; inputs/outputs stay float32)
    opset: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def onnx_metadata(config: dict, graph: GraphInfo) -> dict[str, str]:
    """The metadata_props an exported model carries: each config section as JSON, and the graph."""
    props = {CONFIG_PREFIX + key: json.dumps(value, sort_keys=True) for key, value in config.items()}
    props[GRAPH_KEY] = graph.to_json()
    if config.get("net", {}).get("num_classes"):
        classes = config["data"].get("classes") or [str(i) for i in range(int(config["net"]["num_classes"]))]
        props[CLASSES_KEY] = json.dumps(list(classes))
    return props


def _config_from_props(props: dict[str, str], path) -> tuple[dict, GraphInfo]:
    if GRAPH_KEY not in props or CONFIG_PREFIX + "format_version" not in props:
        raise CheckpointError(f"{path}: ONNX model without hold-mlx metadata; "
                              "export it with `hold-mlx export --checkpoint RUN --out model.onnx`")
    try:
        config = {k[len(CONFIG_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(CONFIG_PREFIX)}
        graph_fields = json.loads(props[GRAPH_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupted hold-mlx metadata in the ONNX model ({err}); re-export it") from err
    validate_config(config, path)
    if not isinstance(graph_fields, dict) or graph_fields.get("format") != ONNX_FORMAT:
        found = graph_fields.get("format") if isinstance(graph_fields, dict) else graph_fields
        raise CheckpointError(f"{path}: ONNX graph format {found!r}, this hold-mlx reads {ONNX_FORMAT}; "
                              "upgrade hold-mlx or re-export the model")
    try:
        graph = GraphInfo(**graph_fields)
    except TypeError as err:
        raise CheckpointError(f"{path}: unknown fields in the hold-mlx graph metadata ({err}); "
                              "upgrade hold-mlx or re-export") from err
    if graph.output != "alpha" or graph.io_layout != "channels-last":
        raise CheckpointError(f"{path}: graph computes {graph.output!r} in layout {graph.io_layout!r}; "
                              "this hold-mlx runs 'alpha' graphs in 'channels-last' layout")
    return config, graph


def make_session(model, *, threads: int | None = None, optimization: str = "all", sequential: bool = True,
                 providers=None):
    """An onnxruntime InferenceSession for a path or serialized model, with our session options.

    ``threads`` sets the intra-op thread pool (None: onnxruntime's default, one per physical core);
    inter-op parallelism is off (``sequential``): the U-Net is a chain, and it measured no faster.
    """
    import onnxruntime as ort

    if optimization not in OPT_LEVELS:
        raise ValueError(f"unknown optimisation level {optimization!r}; choose one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1 if sequential else int(threads)
    options.log_severity_level = 3  # errors only: library code does not print
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


def _open(path, **session_kw):
    if path is None:
        raise CheckpointError("--backend onnx needs --checkpoint model.onnx "
                              "(make one with `hold-mlx export --checkpoint RUN --out model.onnx`)")
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path}: a hold-mlx checkpoint, not an ONNX model; export it first with "
                              f"`hold-mlx export --checkpoint {path} --out model.onnx`")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model file")
    try:
        return make_session(str(path), **session_kw)
    except Exception as err:  # onnxruntime raises its own exception types, often multi-line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({first[:200]}); "
                              "it may be truncated or corrupted: re-export it") from err


class OnnxNetwork:
    """alpha(u, t) for NumPy float32 u (B, ..., n*C) channels-last and t (B,): the graph's output,
    with the shapes checked against the metadata first."""

    def __init__(self, session, config: dict, graph: GraphInfo, source="model.onnx"):
        self.session, self.config, self.graph = session, config, graph
        self.source = str(source)
        self.order = int(config["net"]["order"])
        data_shape = tuple(int(s) for s in config["data"]["shape"])
        self.state_shape = data_shape[:-1] + (self.order * data_shape[-1],)
        self.num_classes = int(config["net"].get("num_classes", 0))
        self._check_graph_inputs()

    def _check_graph_inputs(self) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        expected = {"u", "t", "labels"} if self.num_classes else {"u", "t"}
        if set(inputs) != expected:
            raise CheckpointError(f"{self.source}: graph inputs {sorted(inputs)}, expected {sorted(expected)}; "
                                  "re-export the model with hold-mlx export")
        declared = tuple(inputs["u"][1:])
        if declared != self.state_shape:
            raise CheckpointError(f"{self.source}: graph input u is {list(inputs['u'])} but the metadata "
                                  f"describes a state (batch, {', '.join(map(str, self.state_shape))}); "
                                  "the file was altered: re-export it")

    def _check(self, u: np.ndarray, t: np.ndarray) -> None:
        if tuple(u.shape[1:]) != self.state_shape or u.ndim != len(self.state_shape) + 1:
            raise ValueError(f"{self.source}: u has shape {tuple(u.shape)}, the model expects "
                             f"(batch, {', '.join(map(str, self.state_shape))}) "
                             f"({self.order} blocks of data shape {list(self.config['data']['shape'])})")
        if t.shape != (u.shape[0],):
            raise ValueError(f"{self.source}: t has shape {tuple(t.shape)}, expected ({u.shape[0]},): "
                             "one time per sample of u")

    def __call__(self, u, t, labels=None) -> np.ndarray:
        u = np.ascontiguousarray(u, dtype=np.float32)
        t = np.ascontiguousarray(t, dtype=np.float32)
        self._check(u, t)
        feed = {"u": u, "t": t}
        if self.num_classes:  # no labels: the "no label" class, the unconditional model
            labels = np.full(u.shape[0], self.num_classes) if labels is None else labels
            feed["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
            if feed["labels"].shape != (u.shape[0],):
                raise ValueError(f"{self.source}: labels have shape {feed['labels'].shape}, expected ({u.shape[0]},)")
        elif labels is not None:
            raise ValueError(f"{self.source}: this model is unconditional; it takes no class labels")
        return self.session.run(None, feed)[0]


def open_onnx_network(path, threads: int | None = None, *, optimization: str = "all", sequential: bool = True,
                      providers=None) -> tuple[OnnxNetwork, dict]:
    """(network, config) from an .onnx file written by ``hold-mlx export``.

    Needs onnxruntime and NumPy only. ``threads``: intra-op threads (None: onnxruntime's default).
    """
    session = _open(path, threads=threads, optimization=optimization, sequential=sequential, providers=providers)
    config, graph = _config_from_props(session.get_modelmeta().custom_metadata_map, path)
    return OnnxNetwork(session, config, graph, source=path), config

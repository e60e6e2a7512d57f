"""ONNX export and the onnxruntime backend: the exported file samples on its own, like MLX and torch.

One tiny U-Net checkpoint (random weights, conv_out included, so the output is not trivially zero)
is exported once through the CLI; the tests read that file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from click.testing import CliRunner  # noqa: E402

from hold_mlx.checkpoint import make_config, read_config, write_tensors  # noqa: E402
from hold_mlx.cli import main  # noqa: E402
from hold_mlx.netconfig import net_preset  # noqa: E402
from hold_mlx.sde import get_sde  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, net: str = "tiny", sde: str = "hold", *, data_shape=(8, 8, 1), seed: int = 0,
                    mixed_score: bool = True) -> Path:
    """A checkpoint with random weights (every tensor perturbed, so alpha is far from zero)."""
    from hold_export.torch_model import checkpoint_tensors
    from hold_export.torch_nets import build_net

    sde_obj = get_sde(sde)
    image = len(data_shape) == 3
    overrides = dict(data_channels=data_shape[-1], order=sde_obj.order)
    if image:
        overrides["image_size"] = data_shape[0]
    cfg = net_preset(net, **overrides)
    torch.manual_seed(seed)
    model = build_net(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = ({"name": "tiny", "kind": "image", "shape": list(data_shape), "shift": 0.5, "scale": 0.5} if image
            else {"name": "toy", "kind": "points", "shape": list(data_shape), "shift": [0.0] * data_shape[0],
                  "scale": [1.0] * data_shape[0]})
    write_tensors(path, checkpoint_tensors(model), make_config(sde_obj, cfg, data, mixed_score=mixed_score))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, model.onnx, CLI output): `hold-mlx export` with the default checkpoint."""
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(folder / "tiny.safetensors")
    out = folder / "tiny.onnx"
    result = CliRunner().invoke(main, ["export", "--out", str(out)], env={"HOLD_MLX_WEIGHTS": str(ckpt)})
    assert result.exit_code == 0, result.output
    return ckpt, out, result.output


def _reexport(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    edit(props, model)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst


# ----------------------------------------------------------------------------- export


def test_export_reports_checks_at_three_batch_sizes(exported):
    _, out, output = exported
    assert out.is_file()
    line = output.splitlines()[0]
    assert "onnxruntime matches torch" in line
    errors = {int(b): float(e) for b, e in
              (part.split(": ") for part in line.split("(batch ")[1].rstrip(")").split(", batch "))}
    assert sorted(errors) == [1, 2, 7]
    assert all(0 <= e < 1e-4 for e in errors.values())


def test_export_metadata_carries_the_checkpoint_config(exported):
    ckpt, out, _ = exported
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    config = {k[len("hold_mlx.config."):]: json.loads(v) for k, v in props.items() if k.startswith("hold_mlx.config.")}
    assert config == read_config(ckpt)
    graph = json.loads(props["hold_mlx.graph"])
    assert graph["output"] == "alpha" and graph["io_layout"] == "channels-last" and graph["format"] == 1
    assert graph["precision"] == "fp32" and graph["opset"] >= 18
    (u, t) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in u.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [8, 8, 3]  # dynamic batch, NHWC with n*C channels
    assert t.type.tensor_type.shape.dim[0].dim_param == dims[0]


def test_onnx_alpha_matches_torch_and_score_matches_torch(exported):
    from hold_mlx.model import load

    ckpt, out, _ = exported
    ort_model = load(out, "onnx", threads=1)
    sde, config = ort_model.sde, ort_model.config
    torch_model = load(ckpt, "torch")
    rng = np.random.default_rng(3)
    u = rng.standard_normal((5, 8, 8, 3)).astype(np.float32)
    t = np.array([1e-3, 0.01, 0.5, 2.0, 5.0], np.float32)
    with torch.no_grad():
        ref_alpha = torch_model.alpha(torch.from_numpy(u), torch.from_numpy(t)).numpy()
        ref_score = torch_model(torch.from_numpy(u), torch.from_numpy(t)).numpy()
    assert np.abs(ref_alpha).max() > 0.1  # the weights are not trivially zero
    np.testing.assert_allclose(ort_model.alpha(u, t), ref_alpha, atol=1e-5, rtol=1e-4)
    score = ort_model(u, t)
    assert score.dtype == np.float32 and score.shape == (5, 8, 8, 1)
    np.testing.assert_allclose(score, ref_score, atol=1e-4 * np.abs(ref_score).max(), rtol=1e-4)
    assert config == read_config(ckpt) and sde.order == 3


def test_export_mismatch_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    """A graph that differs from torch (here: a sabotaged trace) fails the exporter's own check."""
    from hold_export import onnx_export

    ckpt = make_checkpoint(tmp_path / "mlp.safetensors", net="mlp-tiny", sde="vp", data_shape=(2,))
    real = onnx_export.export_graph

    def sabotaged(module, example, *args, **kwargs):
        class Off(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, u, t):
                return self.inner(u, t) + 0.01

        return real(Off(), example, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph", sabotaged)
    out = tmp_path / "bad.onnx"
    with pytest.raises(onnx_export.OnnxExportError, match=r"differs from torch at batch 1: .*not written"):
        onnx_export.export_onnx(ckpt, out)
    assert not out.exists()


@pytest.mark.slow
def test_fp16_export_stays_close_to_torch(tmp_path):
    """fp16 graph (time features in fp32): within 2e-2 of torch fp32, and samples close to fp32."""
    from hold_export.onnx_export import export_onnx
    from hold_mlx.model import load

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    report = export_onnx(ckpt, tmp_path / "tiny16.onnx", fp16=True)
    assert report.precision == "fp16" and all(e < 2e-2 for e in report.errors.values())
    export_onnx(ckpt, tmp_path / "tiny32.onnx")
    x16 = load(tmp_path / "tiny16.onnx", "onnx", threads=1).sample(4, steps=10, seed=1).x
    x32 = load(tmp_path / "tiny32.onnx", "onnx", threads=1).sample(4, steps=10, seed=1).x
    assert 0 < np.abs(x16 - x32).max() < 0.05 * np.abs(x32).max()


# ----------------------------------------------------------------------------- same samples everywhere


@pytest.mark.parametrize("sampler", [{}, {"sampler": "gddim", "order": 3, "eta": 0.5},
                                     {"sampler": "gddim", "corrector": True, "grid": "power-2.5"}])
def test_same_seed_same_samples_on_onnx_mlx_and_torch(exported, sampler):
    pytest.importorskip("mlx.core")
    from hold_mlx.model import load

    ckpt, out, _ = exported
    options = dict(steps=8, seed=11, batch_size=3, **sampler)
    drawn = load(out, "onnx", threads=1).sample(5, **options)
    x_onnx, nfe = drawn.x, drawn.nfe
    x_mlx = load(ckpt, "mlx").sample(5, **options).x
    x_torch = load(ckpt, "torch", threads=1).sample(5, **options).x
    assert x_onnx.shape == (5, 8, 8, 1) and nfe == 9
    assert np.abs(x_onnx).max() > 0.1
    np.testing.assert_allclose(x_onnx, x_torch, atol=1e-3)
    np.testing.assert_allclose(x_onnx, x_mlx, atol=1e-3)


_BLOCKED_RUN = textwrap.dedent("""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlx", "torch", "onnx", "onnxscript"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocked())
    from hold_mlx.cli import main

    try:
        main(sys.argv[1:])
    finally:
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"mlx", "torch", "onnx", "onnxscript"})
        print("LOADED", loaded)
""")


def test_onnx_sampling_needs_neither_torch_nor_mlx(exported, tmp_path):
    from hold_mlx.data import to_user_units
    from hold_mlx.model import load

    _, model, _ = exported
    out = tmp_path / "s.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, "sample", "--backend", "onnx", "--checkpoint",
                           str(model), "--steps", "6", "--n", "4", "--seed", "5", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "LOADED []" in proc.stdout
    loaded = load(model, "onnx", threads=1)
    expected = loaded.sample(4, steps=6, seed=5).x
    np.testing.assert_allclose(np.load(out)["samples"], to_user_units(expected, loaded.config["data"]), atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _sample_error(model, *extra) -> str:
    result = CliRunner().invoke(main, ["sample", "--backend", "onnx", "--checkpoint", str(model), "--steps", "2",
                                       "--n", "2", "--out", str(Path(model).with_suffix(".npz")), *extra])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_corrupted_onnx_is_a_one_line_error(exported, tmp_path):
    _, model, _ = exported
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert "not a readable ONNX model" in _sample_error(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model\n" * 10)
    assert "not a readable ONNX model" in _sample_error(garbage)


def test_onnx_without_our_metadata_is_rejected(exported, tmp_path):
    _, model, _ = exported
    bare = _reexport(model, tmp_path / "bare.onnx", lambda props, m: props.clear())
    assert "without hold-mlx metadata" in _sample_error(bare)


def test_wrong_format_versions_are_rejected(exported, tmp_path):
    _, model, _ = exported
    newer = _reexport(model, tmp_path / "v99.onnx",
                      lambda props, m: props.update({"hold_mlx.config.format_version": "99"}))
    assert "checkpoint format 99" in _sample_error(newer)

    def graph_v2(props, m):
        graph = json.loads(props["hold_mlx.graph"])
        props["hold_mlx.graph"] = json.dumps({**graph, "format": 2})

    assert "ONNX graph format 2" in _sample_error(_reexport(model, tmp_path / "g2.onnx", graph_v2))


def test_shape_mismatches_are_rejected(exported, tmp_path):
    from hold_mlx.model import load

    _, model, _ = exported

    def other_shape(props, m):
        data = json.loads(props["hold_mlx.config.data"])
        props["hold_mlx.config.data"] = json.dumps({**data, "shape": [9, 9, 1]})

    # The config schema catches a data shape the network config does not fit ...
    assert "does not fit images of shape [9, 9, 1]" in _sample_error(
        _reexport(model, tmp_path / "shape9.onnx", other_shape))

    def consistent_but_not_the_graph(props, m):
        data, net = json.loads(props["hold_mlx.config.data"]), json.loads(props["hold_mlx.config.net"])
        props["hold_mlx.config.data"] = json.dumps({**data, "shape": [16, 16, 1]})
        props["hold_mlx.config.net"] = json.dumps({**net, "image_size": 16})

    # ... and the graph check one that the config agrees with but the graph does not.
    assert "graph input u is" in _sample_error(
        _reexport(model, tmp_path / "shape.onnx", consistent_but_not_the_graph))

    score_fn = load(model, "onnx", threads=1)
    t = np.full(2, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"u has shape \(2, 8, 8, 1\), the model expects \(batch, 8, 8, 3\)"):
        score_fn(np.zeros((2, 8, 8, 1), np.float32), t)
    with pytest.raises(ValueError, match=r"t has shape \(3,\), expected \(2,\)"):
        score_fn(np.zeros((2, 8, 8, 3), np.float32), np.full(3, 0.5, np.float32))


def test_wrong_kind_of_file_for_the_backend(exported, tmp_path):
    ckpt, model, _ = exported
    assert "not an ONNX model; export it first" in _sample_error(ckpt)
    result = CliRunner().invoke(main, ["sample", "--backend", "mlx", "--checkpoint", str(model), "--n", "1",
                                       "--out", str(tmp_path / "x.npz")])
    assert result.exit_code != 0 and "runs with --backend onnx" in result.output
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code != 0 and "must end in .onnx" in result.output


def test_opset_outside_what_onnx_knows_is_rejected(exported, tmp_path):
    ckpt, _, _ = exported
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx"),
                                       "--opset", "99"])
    assert result.exit_code != 0 and "--opset 99: choose 18 to" in result.output
    assert not (tmp_path / "x.onnx").exists()

"""tools/quality_vs_nfe.py on a tiny configuration: cells cached, resumed without resampling, rendered."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "quality_vs_nfe.py"


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("mlx.core")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("quality_vs_nfe", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~5-15 s: loads the shipped model and classifier, samples 24 images
def test_tiny_table_is_cached_resumed_and_rendered(tmp_path, tool, monkeypatch):
    from hold_mlx.model import Model

    calls = []
    real_sample = Model.sample

    def counting_sample(self, *args, **kwargs):
        calls.append((kwargs["sampler"], kwargs["steps"]))
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Model, "sample", counting_sample)
    out, cache, png = tmp_path / "table.md", tmp_path / "cache.json", tmp_path / "plot.png"
    out.write_text("# Samplers\n\nhand-written text\n")
    argv = ["--samples", "6", "--seeds", "2", "--nfe", "3", "--configs", "gddim-2,lie-trotter", "--n-ref", "30",
            "--batch-size", "6", "--cache", str(cache), "--out", str(out), "--plot", str(png)]
    tool.main(argv[:3] + ["1"] + argv[4:])  # one seed first: an interrupted run
    assert calls == [("gddim", 2), ("lie-trotter", 2)]
    tool.main(argv)  # resumes: only the second seed is drawn
    assert calls[2:] == [("gddim", 2), ("lie-trotter", 2)]
    cells = json.loads(cache.read_text())["cells"]
    assert set(cells) == {"floor|6|0", "floor|6|1", "gddim-2|3|0", "gddim-2|3|1", "lie-trotter|3|0",
                          "lie-trotter|3|1"}
    assert cells["gddim-2|3|0"]["nfe"] == 3 and cells["lie-trotter|3|1"]["nfe"] == 3
    assert all(c["fd"] > 0 for c in cells.values())
    # a few-step sampler is far from the data; real images are much closer
    assert cells["floor|6|0"]["fd"] < cells["lie-trotter|3|0"]["fd"]
    tool.main(argv)  # nothing left to do
    assert len(calls) == 4
    copy = tmp_path / "same-weights"  # the same weights at another path: the cells stand
    shutil.copytree(Path(tool.REPO) / tool.SHIPPED, copy)
    tool.main(argv + ["--checkpoint", str(copy)])
    assert len(calls) == 4
    text = out.read_text()
    assert text.startswith("# Samplers\n\nhand-written text\n") and tool.BEGIN in text and tool.END in text
    assert "| gddim-2 |" in text and "| lie-trotter |" in text and "[" not in text.split(tool.BEGIN)[1].split("|---")[1]
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        tool.main(argv[:1] + ["7"] + argv[2:])  # another sample count needs another cache
    # the cache names the weights it measured: other weights at the same path are refused
    setup = json.loads(cache.read_text())["setup"]
    assert setup["weights"] == tool_digest(setup["checkpoint"])
    data = json.loads(cache.read_text())
    data["setup"]["weights"] = "0" * 16
    cache.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="made with"):
        tool.main(argv)


def tool_digest(checkpoint):
    from hold_mlx.checkpoint import weights_digest

    path = Path(checkpoint)
    return weights_digest(path if path.exists() else Path(__file__).resolve().parents[1] / path)

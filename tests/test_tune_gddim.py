"""tools/tune_gddim.py: the search scores seeds the benchmark does not use, one row per setting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "tune_gddim.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("tune_gddim", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_search_rows_and_seeds(tool, capsys, monkeypatch):
    seen = []
    real = tool.bench.run_point

    def recording(problem, sde, spec, steps, grid, seed, extra=None):
        seen.append((spec.options["corrector"], grid, steps, seed))
        return real(problem, sde, spec, steps, grid, seed, extra)

    monkeypatch.setattr(tool.bench, "run_point", recording)
    tool.main(["--targets", "vp:4", "--grids", "power-2.5", "--orders", "2", "--etas", "0", "--seeds", "2",
               "--n", "100"])
    assert seen == [(False, "power-2.5", 3, 5), (False, "power-2.5", 3, 6),
                    (True, "power-2.5", 3, 5), (True, "power-2.5", 3, 6)]  # seeds 5.., never the benchmark's 0..4
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| power-2.5")]
    assert [r[3].strip() for r in rows] == ["off", "on"]
    for row in rows:
        mmd, sw = (float(cell.split("±")[0]) for cell in row[4:6])
        assert np.isfinite(mmd) and 0 < sw < 10


def test_bad_grid_is_a_usage_error(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--grids", "cubic"])
    assert "unknown time grid 'cubic'" in capsys.readouterr().err

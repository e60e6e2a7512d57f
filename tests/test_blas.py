"""Which BLAS MLX uses on Linux, and every fallback path (each in a fresh interpreter).

The proof that MLX's matmul really calls the preloaded library is the dynamic linker's own
record: with LD_DEBUG=bindings it reports which file ``cblas_sgemm`` was bound to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")

PROBE = """
import json, sys
{prelude}
import hold_mlx._mlx as m
m.configure_cpu()
mx = m.mx
a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
ok = mx.allclose(a @ a.T, mx.array([[14., 38., 62.], [38., 126., 214.], [62., 214., 366.]])).item()
print(json.dumps({{"blas": m.BLAS, "note": m.BLAS_NOTE, "threads": m.BLAS_THREADS, "ok": ok,
                  "streams": len(m.cpu_streams()), "cpus": m.cpu_count()}}))
"""


def probe(env_extra=None, prelude="", ld_debug=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLD_MLX_")}
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if ld_debug:
        env["LD_DEBUG"] = "bindings"
    proc = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], "matmul gave a wrong answer"
    if ld_debug:
        bound = [line for line in proc.stderr.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line]
        result["sgemm_from"] = bound[-1].split(" to ")[1].split(" [")[0] if bound else None
    return result


def _system_openblas():
    from hold_mlx import _mlx

    return next((p for p in _mlx._CANDIDATES if os.path.exists(p)), None)


def test_default_preloads_system_openblas_and_mlx_calls_it():
    path = _system_openblas()
    if path is None:
        pytest.skip("no system OpenBLAS here (apt-get install libopenblas0-pthread)")
    r = probe(ld_debug=True)
    assert r["blas"] == path
    assert r["sgemm_from"] == path


def test_none_keeps_the_bundled_blas():
    r = probe({"HOLD_MLX_BLAS": "none"}, ld_debug=True)
    assert r["blas"] == "bundled" and "HOLD_MLX_BLAS=none" in r["note"]
    assert r["sgemm_from"] is not None and "mlx" in r["sgemm_from"]  # the wheel's own libblas
    assert r["threads"] is None  # nothing to tune


def test_missing_library_falls_back_with_a_note():
    r = probe({"HOLD_MLX_BLAS": "/nonexistent/libopenblas.so"})
    assert r["blas"] == "bundled" and "does not exist" in r["note"]


def test_unloadable_library_falls_back(tmp_path):
    bogus = tmp_path / "libblas.so.3"
    bogus.write_bytes(b"not an ELF file")
    r = probe({"HOLD_MLX_BLAS": str(bogus)})
    assert r["blas"] == "bundled" and "could not load" in r["note"]


def test_mlx_imported_first_is_reported():
    r = probe(prelude="import mlx.core")
    assert r["blas"] == "bundled" and "imported before hold_mlx" in r["note"]


def test_thread_settings():
    if _system_openblas() is None:
        pytest.skip("no system OpenBLAS here")
    r = probe({"HOLD_MLX_THREADS": "1"})
    assert r["streams"] == 0 and r["threads"] == r["cpus"]  # one MLX stream: BLAS gets the cores
    r = probe({"HOLD_MLX_THREADS": "2"})
    assert r["streams"] == 2 and r["threads"] == 1  # the batch is split: one BLAS thread per call
    r = probe({"HOLD_MLX_THREADS": "2", "HOLD_MLX_BLAS_THREADS": "3"})
    assert r["threads"] == 3


def test_cli_reports_the_blas():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLD_MLX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "hold_mlx.cli", "--version"], env=env, capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:  # the CLI module may need its entry point; fall back to click's runner
        from click.testing import CliRunner

        from hold_mlx.cli import main

        text = CliRunner().invoke(main, ["--version"]).output
    else:
        text = out.stdout
    assert "BLAS:" in text


CACHE_PROBE = """
import json
{imports}
import mlx.core as mx

def cache_limit():
    limit = mx.set_cache_limit(0)  # the setter is the only getter MLX has
    mx.set_cache_limit(limit)
    return limit

out = {{"imported": cache_limit()}}
if {configure}:
    import hold_mlx._mlx as m
    from hold_mlx.backends import MLXBackend

    out["blas_threads_before"] = m.BLAS_THREADS
    MLXBackend().configure()
    out["configured"] = cache_limit()
    out["blas_threads"] = m.BLAS_THREADS
    MLXBackend().configure()
    out["again"] = cache_limit()
print(json.dumps(out))
"""


def _cache_probe(imports: str, configure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLD_MLX_")}
    env.update(HOLD_MLX_CACHE_MB="96", HOLD_MLX_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CACHE_PROBE.format(imports=imports, configure=configure)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_changes_no_mlx_state_until_the_backend_is_configured():
    """Importing hold_mlx's MLX modules leaves MLX's buffer cache at MLX's own default; configuring
    the MLX backend sets it (HOLD_MLX_CACHE_MB) and the BLAS threads, and again changes nothing."""
    default = _cache_probe("", configure=False)["imported"]
    r = _cache_probe("import hold_mlx.nets, hold_mlx.model, hold_mlx.train", configure=True)
    assert r["imported"] == default != 96 * 2**20
    assert r["blas_threads_before"] is None
    assert r["configured"] == r["again"] == 96 * 2**20
    if _system_openblas() is not None:
        assert r["blas_threads"] == 1  # two MLX streams: one BLAS thread per call

"""Native MLX CPU primitives (hold_mlx/csrc), compiled on first use, one build per instruction set.

MLX takes custom CPU kernels only as C++ primitives (``mx.fast`` has Metal and CUDA kernels
only). hold-mlx ships the source and builds it the way ``mx.compile`` builds its own CPU code:
with the machine's C++ compiler, once, into a cache directory keyed by everything the binary
depends on. The Python binding uses nanobind in MLX's nanobind domain, so the extension takes
and returns ``mx.array`` directly.

The kernels are compiled per instruction-set *variant* (``VARIANTS``: AVX-512, AVX2+FMA, and a
portable build that is SSE2 on x86-64 and NEON on ARM64), each a separate module, and the
variant is chosen at run time from what the CPU reports (``/proc/cpuinfo``), so a cache
directory shared between machines, or a machine that migrates, never runs an instruction its
CPU lacks. ``HOLD_MLX_NATIVE_ISA=avx512|avx2|portable`` forces a variant (refused when this CPU
cannot run it). Cache blocking is chosen inside the kernels from the L2 size the machine
reports.

``load()`` never raises: if anything is missing (no compiler, no nanobind, headers that do not
match) it returns None, ``status()`` says why, and callers keep their pure-MLX path.
``HOLD_MLX_NATIVE=0`` turns the native kernels off; ``=1`` makes a failed build an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ._mlx import mx, nn

_SOURCE_DIR = Path(__file__).parent / "csrc"
_SOURCES = ("hold_native.cpp", "conv3x3.h", "group_norm.h", "cpu_cache.h")
_MODULE = "_hold_native"


@dataclass(frozen=True)
class Status:
    available: bool
    detail: str  # the library's path, or why there is none
    isa: str = ""  # the variant chosen (or refused)
    why: str = ""  # why that variant


_status: Status | None = None
_module = None
_variants: dict[str, tuple[object | None, Status]] = {}  # isa -> load_variant's answer, per process

# Variant -> (compiler flags, CPU flags it needs). x86-64-v4 is AVX-512 F/BW/CD/DQ/VL on top of
# v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE); the kernels use 16 and 8 float lanes respectively.
_X86_V3 = ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm")
_VARIANT_SPECS = {
    "avx512": (("-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"),
               _X86_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    "avx2": (("-march=x86-64-v3", "-mtune=generic"), _X86_V3),
    "portable": ((), ()),  # the architecture's baseline: SSE2 on x86-64, NEON on ARM64
}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


VARIANTS = ("avx512", "avx2", "portable") if _is_x86() else ("portable",)


def _choice() -> str:
    choice = os.environ.get("HOLD_MLX_NATIVE", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "yes": "on",
            "0": "off", "false": "off", "off": "off", "no": "off"}.get(choice, "auto")


def cache_dir() -> Path:
    if os.environ.get("HOLD_MLX_NATIVE_DIR"):
        return Path(os.environ["HOLD_MLX_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hold-mlx" / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports for CPU 0 (empty where there is no /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_variants() -> list[str]:
    """The variants this CPU can run, fastest first."""
    flags = cpu_flags()
    return [isa for isa in VARIANTS if all(f in flags for f in _VARIANT_SPECS[isa][1])]


def choose_variant() -> tuple[str, str]:
    """(variant, why): HOLD_MLX_NATIVE_ISA if set, else the widest one this CPU runs.
    Raises ValueError for a forced variant that is unknown or that this CPU cannot run."""
    forced = os.environ.get("HOLD_MLX_NATIVE_ISA", "").strip().lower()
    supported = supported_variants()
    if forced and forced != "auto":
        if forced not in VARIANTS:
            raise ValueError(f"HOLD_MLX_NATIVE_ISA={forced} is not one of {', '.join(VARIANTS)} (or auto)")
        if forced not in supported:
            missing = sorted(set(_VARIANT_SPECS[forced][1]) - cpu_flags())
            raise ValueError(f"HOLD_MLX_NATIVE_ISA={forced} but this CPU lacks {' '.join(missing)}; "
                             f"it runs: {', '.join(supported)}")
        return forced, f"forced by HOLD_MLX_NATIVE_ISA={forced}"
    isa = supported[0]
    why = {"avx512": "the CPU has AVX-512 (F/BW/CD/DQ/VL)",
           "avx2": "the CPU has AVX2 and FMA but not AVX-512",
           "portable": (f"{platform.machine()}: the baseline vector unit (NEON on ARM64)" if not _is_x86()
                        else "the CPU has neither AVX2+FMA nor AVX-512" if cpu_flags()
                        else "the CPU's instruction sets are unknown (no /proc/cpuinfo)")}[isa]
    return isa, why


def _defines() -> list[str]:
    """Constants the C++ takes from Python, so each has one source: SiLU's tanh coefficients."""
    from .fastops import _TANH_P, _TANH_Q

    def c_array(values):
        return "{" + ", ".join(f"{v!r}f" for v in values) + "}"

    return [f"-DHOLD_TANH_P={c_array(_TANH_P)}", f"-DHOLD_TANH_Q={c_array(_TANH_Q)}"]


def _module_name(isa: str) -> str:
    return f"{_MODULE}_{isa}"


def _build_key(cxx: str, nanobind_version: str, isa: str) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_SOURCE_DIR / name).read_bytes())
    for part in (mx.__version__, nanobind_version, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 cxx, platform.machine(), isa, *_VARIANT_SPECS[isa][0], *_defines()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile(cxx: str, target: Path, isa: str) -> None:
    import nanobind

    mlx_dir = Path(mx.__file__).parent
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    cmd = [cxx, "-O3", *_VARIANT_SPECS[isa][0], "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
           "-fno-strict-aliasing", "-DNDEBUG", "-DNB_DOMAIN=mlx",  # MLX's nanobind domain: shared array type
           f"-DHOLD_MODULE={_module_name(isa)}", f'-DHOLD_ISA="{isa}"', *_defines(),
           f"-I{nanobind.include_dir()}", f"-I{Path(nanobind.source_dir()).parent / 'ext' / 'robin_map' / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}",
           str(_SOURCE_DIR / "hold_native.cpp"), str(Path(nanobind.source_dir()) / "nb_combined.cpp"),
           f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{Path(cxx).name} failed ({done.returncode}): {tail}")
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
    finally:
        tmp.unlink(missing_ok=True)


def _import(path: Path, isa: str):
    spec = importlib.util.spec_from_file_location(f"hold_mlx.{_module_name(isa)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_check(module) -> None:
    """The binding must accept MLX's arrays (same nanobind ABI) and agree with MLX's own ops."""
    with mx.stream(mx.cpu):
        x = mx.random.normal((2, 5, 7, 4), key=mx.random.key(0))
        w = mx.random.normal((17, 3, 3, 4), key=mx.random.key(1))
        b = mx.random.normal((17,), key=mx.random.key(2))
        errors = {
            "conv3x3": mx.abs(module.conv3x3(x, w, b) - (mx.conv2d(x, w, padding=1) + b)).max().item(),
            "conv3x3 stride 2": mx.abs(module.conv3x3(x[:, :4, :6], w, b, stride=2)
                                       - (mx.conv2d(x[:, :4, :6], w, stride=2, padding=1) + b)).max().item(),
            "upsample_conv3x3": mx.abs(module.upsample_conv3x3(x, w, b) - (mx.conv2d(
                mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2), w, padding=1) + b)).max().item(),
            "conv3x3_weight_grad": mx.abs(module.conv3x3_weight_grad(x, x[..., :1] * b[:16]) - mx.grad(
                lambda w: (mx.conv2d(x, w, padding=1) * x[..., :1] * b[:16]).sum())(w[:16])).max().item(),
            "group_norm": mx.abs(module.group_norm(x, b[:4], w[0, 0, 0], 2, 1e-6)
                                 - nn.GroupNorm(2, 4, pytorch_compatible=True, eps=1e-6).update(
                                     {"weight": b[:4], "bias": w[0, 0, 0]})(x)).max().item(),
            "group_norm_backward": mx.abs(module.group_norm_backward(x, b[:4], w[0, 0, 0], x, 2, 1e-6)[0] - mx.grad(
                lambda x_: (nn.GroupNorm(2, 4, pytorch_compatible=True, eps=1e-6).update(
                    {"weight": b[:4], "bias": w[0, 0, 0]})(x_) * x).sum())(x)).max().item(),
        }
    for name, err in errors.items():
        if not err < 1e-4:
            raise RuntimeError(f"self-check failed: {name} differs from MLX's own op by {err:.3g}")


def _build_and_load(isa: str) -> tuple[object | None, Status]:
    if sys.platform == "win32":
        return None, Status(False, "not supported on Windows")
    try:
        import nanobind
    except ImportError:
        return None, Status(False, "nanobind is not installed (pip install nanobind)")
    cxx = _compiler()
    if cxx is None:
        return None, Status(False, "no C++ compiler found (install g++, or set CXX)")
    import fcntl  # POSIX only: imported after the platform check

    directory = cache_dir()
    key = _build_key(cxx, nanobind.__version__, isa)
    stem = f"{_module_name(isa)}-{key}"
    target = directory / f"{stem}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    failed = directory / f"{stem}.failed"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and load it
            if failed.exists():  # do not retry a build that failed with these exact inputs
                return None, Status(False, failed.read_text().strip() + f" (cached; delete {failed} to retry)")
            if not target.exists():
                try:
                    _compile(cxx, target, isa)
                except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
                    failed.write_text(f"build failed: {err}\n")
                    return None, Status(False, f"build failed: {err}")
        module = _import(target, isa)
        _self_check(module)
    except Exception as err:  # noqa: BLE001 - any failure means: use the pure-MLX path
        return None, Status(False, f"{type(err).__name__}: {err}")
    return module, Status(True, str(target))


def load_variant(isa: str):
    """(module or None, Status) of one variant, built on first use; the caller checks that this
    CPU runs it (``supported_variants()``)."""
    if isa not in _variants:
        module, built = _build_and_load(isa)
        _variants[isa] = module, Status(built.available, built.detail, isa)
    module, status = _variants[isa]
    return module, status


def load():
    """The native module of the chosen variant, or None (see ``status()``). Built on the first
    call of a process."""
    global _module, _status
    if _status is None:
        if _choice() == "off":
            _status = Status(False, "off (HOLD_MLX_NATIVE=0)")
        else:
            try:
                isa, why = choose_variant()
            except ValueError as err:
                _module, _status = None, Status(False, str(err), "", "")
            else:
                _module, built = load_variant(isa)
                _status = Status(built.available, built.detail, isa, why)
            if _module is None and _choice() == "on":
                raise RuntimeError(f"HOLD_MLX_NATIVE=1 but the native kernels are unavailable: {_status.detail}")
    return _module


def status() -> Status:
    load()
    return _status

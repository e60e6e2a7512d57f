"""What this machine offers a process: cores and memory (standard library only, no MLX)."""

from __future__ import annotations

import os

__all__ = ["cpu_count", "max_threads", "physical_memory_bytes"]


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """More threads than 4x the cores (at least 64) only add overhead; many more exhaust memory."""
    return max(64, 4 * cpu_count())


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 64 * 2**30

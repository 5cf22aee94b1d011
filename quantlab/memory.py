"""Peak-memory probes for per-layer profiling: host resident set (Linux) and accelerator allocations."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def host_rss_mb() -> float | None:
    """Current resident set size of this process in MiB (None where /proc is unavailable)."""
    return _status_field("VmRSS")


def host_peak_mb() -> float | None:
    """Peak resident set size (VmHWM) since the last reset_peaks() in MiB; None off Linux."""
    return _status_field("VmHWM")


def device_peak_mb(device: torch.device) -> float | None:
    """Peak bytes allocated by torch on a CUDA device since the last reset_peaks(), in MiB; None for CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peaks(device: torch.device) -> None:
    """Restart both peak counters: VmHWM (by writing 5 to /proc/self/clear_refs) and torch's CUDA peak."""
    # Off Linux (or not permitted) the host peak then covers the whole process lifetime.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _status_field(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None

"""A small autotuner keyed by (format, M bucket, N, K, group, dtypes): times candidates once, on CUDA.

triton.autotune cannot choose between launch plans that need different host work (a split-K
workspace plus a reduce launch, or dequantize + cuBLAS), so the weight-only GEMMs tune here.
The cache lives in one Tuner object per format; it is filled on the first call of each key and
never during CUDA-graph capture (a capture uses the cached plan, else the first candidate), so
warm up once before capturing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

# Decode (M = 1..4), small batches and prefill need different kernels; inside a bucket the best
# plan barely moves, so tuning once per power-of-two bucket keeps tuning to ~13 keys per shape.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# plans timed within this fraction of the fastest get a second, 5x longer timing
REFINE = 0.05


_FLUSH: dict[int, torch.Tensor] = {}
# GPU cycles the timer spins after each flush (~100 us at H100 clocks), so the host has queued the
# timed call before the GPU reaches it: otherwise host-side launch work (Python, ctypes) of small
# calls lands between the start event and the kernel and is timed with it.
HOST_SLACK_CYCLES = 200_000


def _flush_l2(device: torch.device) -> None:
    """Read a buffer of twice the L2 size, so the next call finds its operands in DRAM and L2
    holds clean lines (a zero-filling flush, as triton's do_bench does, leaves the L2 full of
    dirty lines whose write-back then competes with the timed kernel's reads), then spin for
    HOST_SLACK_CYCLES. The buffer (100 MB on an H100) is kept per device for the process."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLUSH.get(idx)
    if buf is None:
        l2 = int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 2**25)
        buf = torch.ones(max(2 * l2, 2**26) // 4, dtype=torch.float32, device=device)
        _FLUSH[idx] = buf
    buf.sum()
    spin = getattr(torch.cuda, "_sleep", None)  # a private torch API: skip the spin without it
    if spin is not None:
        spin(HOST_SLACK_CYCLES)


def _time_ms(fn: Callable[[], object], rep: float) -> float:
    """Median ms of fn over about rep ms of flushed calls (CUDA events around fn alone)."""
    device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(3):
        fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(5):
        _flush_l2(device)
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    n = max(5, min(1000, int(rep / max(ev[0].elapsed_time(ev[1]) / 5, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _flush_l2(device)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))
    return times[len(times) // 2]


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the last bucket catches everything larger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


@dataclass(frozen=True)
class Plan:
    """One way to run a GEMM: a backend name and its launch parameters (hashable)."""

    backend: str
    cfg: tuple[tuple[str, int], ...] = ()

    def get(self, key: str) -> int:
        """Value of one launch parameter."""
        return dict(self.cfg)[key]

    def __str__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.cfg)
        return f"{self.backend}({inner})"


def plan(backend: str, **cfg: int) -> Plan:
    """Build a Plan from keyword launch parameters."""
    return Plan(backend, tuple(sorted(cfg.items())))


@dataclass
class Tuner:
    """Per-process cache of the fastest Plan for each key."""

    name: str
    cache: dict[Hashable, Plan] = field(default_factory=dict)
    timings: dict[Hashable, list[tuple[str, float]]] = field(default_factory=dict)

    def pick(
        self, key: Hashable, candidates: Sequence[Plan], run: Callable[[Plan], object]
    ) -> Plan:
        """Return the cached plan for key, else time every candidate (median, ms) and cache the best."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if len(candidates) == 1:  # nothing to time; cached so callers can see the plan
            self.cache[key] = candidates[0]
            return candidates[0]
        if (
            not torch.cuda.is_available()
            or torch.cuda.is_current_stream_capturing()
            or os.environ.get("QUANTLAB_KERNELS_NO_TUNE") == "1"
        ):
            return candidates[0]

        def bench(c: Plan, rep: int) -> float:
            # L2 is flushed before each call, so weights stream from DRAM as in decode.
            return _time_ms(lambda: run(c), rep)

        results: list[tuple[str, float]] = []
        timed: list[tuple[float, int, Plan]] = []
        for i, c in enumerate(candidates):
            try:
                ms = bench(c, 20)
            except Exception as err:  # a config that does not compile/fit is skipped, not fatal
                results.append((f"{c} failed: {type(err).__name__}", float("inf")))
                continue
            results.append((str(c), ms))
            timed.append((ms, i, c))
        if not timed:
            best = candidates[0]
        else:
            # a second, longer look at every plan within REFINE of the first pass's best: one
            # 20 ms pass misorders plans a few % apart (seen in the benchmark at M >= 1024)
            top = min(t[0] for t in timed)
            close = [t for t in timed if t[0] <= top * (1 + REFINE)]
            if len(close) > 1:
                close = [(bench(c, 100), i, c) for _, i, c in close]
                results += [(f"{c} (refined)", ms) for ms, _, c in close]
            best = min(close, key=lambda t: (t[0], t[1]))[2]
        self.cache[key] = best
        self.timings[key] = results
        return best

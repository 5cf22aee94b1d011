"""Host time per call of an eager engine step's ops on the GPU (what a host-bound step pays).

Run 9 found the eager mixed step host-bound (47.9 ms wall over 20.8 ms of kernels). This times
each op's host cost alone: the GPU is first given a long `torch.cuda._sleep`, then N calls are
queued behind it and timed on the host only, so the figure is the cost of issuing a call, not of
its kernel. A row is marked `gpu_bound` when the queued work outlasted the sleep (then the host
waited and the figure is too high). Llama-2-7B shapes, fp16, RANDOM weights.
Usage (device): python3 benchmarks/host_launch_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from quantlab.kernels import bind_w4a16, fused_ops, linear_w4a16, ops, packing

SHAPES = {"dense 4096x4096": (4096, 4096), "gate_up 22016x4096": (22016, 4096)}


def host_us(fn: Callable[[], object], calls: int, sleep_ms: float = 300.0) -> dict[str, float]:
    """Host microseconds per call of fn, queued behind a sleep_ms GPU sleep."""
    for _ in range(3):  # warm-up: tuning, compilation, caches
        fn()
    torch.cuda.synchronize()
    cycles = int(sleep_ms * 2e6)  # at most 2 GHz on an H100 / H200: the sleep lasts >= sleep_ms
    done = torch.cuda.Event()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    done.record()
    gpu_bound = done.query()  # the sleep and every kernel had already finished: not host-only
    torch.cuda.synchronize()
    return {"host_us_per_call": host / calls * 1e6, "calls": calls, "gpu_bound": float(gpu_bound)}


def w4_weights(n: int, k: int, g: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Random symmetric int4 weights in the Hopper layout: (qweight uint8 [N, K/2], scales [N, K/G])."""
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    qw, s, _ = packing.w4_from_codes(codes, torch.rand(n, k // g).half() * 0.01 + 1e-3)
    return packing.to_wgmma_layout(qw.cuda()), s.cuda()


def main() -> None:
    """Write host_launch.jsonl under --out: one row per (op, shape, M)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []

    def record(op: str, fn: Callable[[], object], **kw: object) -> None:
        row = {"op": op, **kw, **host_us(fn, args.calls)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, (n, k) in SHAPES.items():
        qw, s = w4_weights(n, k)
        for m in (1, 32, 559):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            for via_op in (False, True):
                ops._DISPATCH_ALWAYS = via_op

                def call(x: torch.Tensor = x, qw: torch.Tensor = qw, s: torch.Tensor = s) -> object:
                    return linear_w4a16(x, qw, s, None, 128)

                record("linear_w4a16", call, shape=name, m=m, via_dispatcher=via_op)
            ops._DISPATCH_ALWAYS = False
            bound = bind_w4a16(x, qw, s, None, 128)  # after the calls above: tuned already
            same = torch.equal(bound(x), linear_w4a16(x, qw, s, None, 128))
            record("bind_w4a16", lambda b=bound, x=x: b(x), shape=name, m=m, equal_to_call=same)
            if not same:
                raise SystemExit(f"bind_w4a16 differs from linear_w4a16 on {name}, M={m}")
    t = 559
    h = torch.randn(t, 4096, dtype=torch.float16, device="cuda")
    w = torch.ones(4096, dtype=torch.float16, device="cuda")
    gu = torch.randn(t, 22016, dtype=torch.float16, device="cuda")
    record("fused rms_norm", lambda: fused_ops.rms_norm(h, w, 1e-5), m=t)
    record("fused rms_norm + residual", lambda: fused_ops.rms_norm(h, w, 1e-5, h), m=t)
    record("fused silu_mul", lambda: fused_ops.silu_mul(gu), m=t)
    record("torch add", lambda: h + h, m=t)
    record("torch index_select", lambda: h.index_select(0, torch.arange(8, device="cuda")), m=t)
    (out / "host_launch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()

"""Build, check and time every kernel format in one go: `python -m quantlab.kernels.bench --out DIR`.

1. fp64 correctness over every benchmark shape and M (poisoned outputs, norm-wise relative error
   against x.double() @ W.double()^T of the same dequantized weights; limit 1e-2, no NaN).
2. Timing: median per-call time from CUDA-graph replays that rotate through >= 8 weight copies
   (more when needed so the copies together exceed 3x the L2), random weights (never zeros).
   Baselines measured in the same run: cuBLAS bf16 (F.linear) and torch's int4 tinygemm
   (aten._weight_int4pack_mm, g128). Effective GB/s counts weights + scales + x + output.
Writes bench.json and bench.md under --out (default $OUT or ./bench_out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from quantlab.kernels import cuda_gemv, cuda_mma, cutlass_w4, cutlass_w8, packing, reference
from quantlab.kernels.fp8 import fp8_scaled_mm

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (28672, 8192), (8192, 28672)]
MS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
TOL = 1e-2


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of y against an fp64 reference (inf if y holds NaN/inf)."""
    if not bool(torch.isfinite(y).all()):
        return math.inf
    return float((y.double() - ref).norm() / ref.norm())


def make_w4(n: int, k: int, g: int, asym: bool, dtype: torch.dtype, dev: str) -> dict[str, Any]:
    """Random W4 tensors: codes uniform over the int4 range, scales ~1e-2 (weights of a real LM)."""
    scale = (torch.rand(n, k // g, device=dev) * 0.02 + 0.005).to(dtype)
    if asym:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        zero = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, device=dev)
    else:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        zero = None
    qw, s, z = packing.w4_from_codes(codes, scale, zero)
    return {"qweight": qw, "scales": s, "zeros": z}


def make_w8(n: int, k: int, dtype: torch.dtype, dev: str) -> dict[str, Any]:
    """Random W8 per-channel tensors."""
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    return {"qweight": q, "scales": (torch.rand(n, device=dev) * 0.002 + 0.0005).to(dtype)}


def make_fp8(n: int, k: int, dev: str) -> dict[str, Any]:
    """Random e4m3 weight with per-row scales."""
    w = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {"weight": w, "weight_scale": torch.rand(n, device=dev) * 1e-4 + 1e-5}


def nbytes(*ts: torch.Tensor | None) -> int:
    """Total bytes of the given tensors."""
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def time_rotating(fn: Callable[..., object], copies: int, est_ms: float) -> float:
    """Median per-call ms of fn(i) over i = 0..copies-1, replayed from a CUDA graph."""
    for i in range(copies):  # compile / tune / warm every copy outside the capture
        fn(i)
    torch.cuda.synchronize()
    per_graph = max(copies, math.ceil(2.0 / max(est_ms, 1e-3) / copies) * copies)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
        with torch.cuda.graph(graph, stream=stream):
            for j in range(per_graph):
                fn(j % copies)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    del graph
    times.sort()
    return times[len(times) // 2]


def quick_ms(fn: Callable[..., object]) -> float:
    """Rough per-call ms (eager, 5 calls) used to size a graph."""
    fn(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        fn(0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 5 * 1e3


def cublas_us(x: torch.Tensor, wb: list[torch.Tensor]) -> float:
    """Graph-replayed us per call of cuBLAS bf16 F.linear(x [M, K], wb[i] [N, K]) over the
    rotating weight copies wb: the baseline of every ratio."""

    def fb(i: int) -> torch.Tensor:
        return F.linear(x, wb[i])

    return time_rotating(fb, len(wb), quick_ms(fb)) * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        b.copy_(a)
    ev[1].record()
    ev[1].synchronize()
    return 2 * a.numel() * 10 / (ev[0].elapsed_time(ev[1]) * 1e-3) / 1e9


def check_all(
    shapes: list[tuple[int, int]], ms: list[int], log: Callable[[str], None], dev: str = "cuda"
) -> list[dict]:
    """fp64 correctness of every format/path over shapes x ms; returns one record per check."""
    from quantlab.kernels import triton_w4a16 as t4
    from quantlab.kernels import triton_w8a16 as t8

    recs: list[dict[str, Any]] = []

    def record(fmt: str, path: str, n: int, k: int, m: int, y: torch.Tensor, ref: torch.Tensor):
        err = rel_err(y, ref)
        ok = err < TOL and not bool(torch.isnan(y).any())
        recs.append({"fmt": fmt, "path": path, "N": n, "K": k, "M": m, "rel_err": err, "ok": ok})
        if not ok:
            log(f"FAIL {fmt} {path} N={n} K={k} M={m} rel_err={err:.3e}")

    for n, k in shapes:
        w4 = make_w4(n, k, 128, False, torch.bfloat16, dev)
        w4a = make_w4(n, k, 128, True, torch.float16, dev)
        w8 = make_w8(n, k, torch.bfloat16, dev)
        f8 = make_fp8(n, k, dev)
        wd4 = reference.dequant_w4(w4["qweight"], w4["scales"], None, 128, torch.float64)
        wd4a = reference.dequant_w4(w4a["qweight"], w4a["scales"], w4a["zeros"], 128, torch.float64)
        wd8 = reference.dequant_w8(w8["qweight"], w8["scales"], torch.float64)
        w4n = packing.to_mma_layout(w4["qweight"])
        w4an = packing.to_mma_layout(w4a["qweight"])
        hopper = cutlass_w4.available(torch.device(dev))
        w4h = packing.to_wgmma_layout(w4["qweight"]) if hopper else None
        w4ah = packing.to_wgmma_layout(w4a["qweight"]) if hopper else None
        for m in ms:
            xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xh = torch.randn(m, k, device=dev, dtype=torch.float16)
            bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
            ref = xb.double() @ wd4.t()
            y = t4.w4a16_gemm(
                xb, w4["qweight"], w4["scales"], None, 128, None, "auto", fill=math.nan
            )
            record("w4a16_g128_sym_bf16", "auto", n, k, m, y, ref)
            ref = xh.double() @ wd4a.t()
            y = t4.w4a16_gemm(
                xh, w4a["qweight"], w4a["scales"], w4a["zeros"], 128, None, "auto", fill=math.nan
            )
            record("w4a16_g128_asym_fp16", "auto", n, k, m, y, ref)
            ref = xb.double() @ wd8.t()
            y = t8.w8a16_gemm(xb, w8["qweight"], w8["scales"], None, "auto", fill=math.nan)
            record("w8a16_bf16", "auto", n, k, m, y, ref)
            if cutlass_w8.available(torch.device(dev)):
                y = t8.w8a16_gemm(xb, w8["qweight"], w8["scales"], None, "cutlass", fill=math.nan)
                record("w8a16_bf16", "cutlass", n, k, m, y, ref)
            for gran in ("tensor", "row"):
                ws = f8["weight_scale"][:1] if gran == "tensor" else f8["weight_scale"]
                ref = reference.ref_linear_fp8(
                    xb, f8["weight"], ws, None, None, gran, torch.float64
                )
                y = fp8_scaled_mm(xb, f8["weight"], ws, None, None, gran)
                record(f"fp8_{gran}_bf16", "scaled_mm", n, k, m, y, ref)
                y = fp8_scaled_mm(xb, f8["weight"], ws, None, None, gran, fast_accum=True)
                record(f"fp8_{gran}_bf16", "scaled_mm_fast", n, k, m, y, ref)
            # static per-tensor activation scale (what an FP8 calibration exports), fast accum
            xs = (xb.abs().amax().float() / reference.FP8_MAX).reshape(1)
            ws = f8["weight_scale"][:1]
            ref = reference.ref_linear_fp8(xb, f8["weight"], ws, None, xs, "tensor", torch.float64)
            y = fp8_scaled_mm(xb, f8["weight"], ws, None, xs, "tensor", fast_accum=True)
            record("fp8_tensor_static_bf16", "scaled_mm_fast", n, k, m, y, ref)
            # native layout through its auto path (cuda_mma plans / dequantize + cuBLAS)
            ref = xb.double() @ wd4.t()
            y = cuda_mma.w4a16_native_auto(xb, w4n, w4["scales"], None, 128, None, fill=math.nan)
            record("w4a16_g128_sym_bf16_native", "auto", n, k, m, y, ref)
            if w4h is not None and w4ah is not None:  # Hopper layout: its auto, and cutlass_w4
                y = cutlass_w4.w4a16_hopper_auto(
                    xb, w4h, w4["scales"], None, 128, None, fill=math.nan
                )
                record("w4a16_g128_sym_bf16_hopper", "auto", n, k, m, y, ref)
                y = cutlass_w4.w4a16_cutlass_gemm(
                    xb, w4h, w4["scales"], None, 128, None, fill=math.nan
                )
                record("w4a16_g128_sym_bf16_hopper", "cutlass", n, k, m, y, ref)
                b = bias.to(torch.float16)
                ref = xh.double() @ wd4a.t() + b.double()
                y = cutlass_w4.w4a16_hopper_auto(
                    xh, w4ah, w4a["scales"], w4a["zeros"], 128, b, fill=math.nan
                )
                record("w4a16_g128_asym_fp16_hopper", "auto", n, k, m, y, ref)
                y = cutlass_w4.w4a16_cutlass_gemm(
                    xh, w4ah, w4a["scales"], w4a["zeros"], 128, b, fill=math.nan
                )
                record("w4a16_g128_asym_fp16_hopper", "cutlass", n, k, m, y, ref)
            # every forced W4/W8 path where it applies, untuned (first config) to bound compiles
            os.environ["QUANTLAB_KERNELS_NO_TUNE"] = "1"
            if m <= 64:
                for name, w, qw, wd, x in (
                    ("w4a16_g128_sym_bf16", w4, w4["qweight"], wd4, xb),
                    ("w4a16_g128_asym_fp16", w4a, w4a["qweight"], wd4a, xh),
                    ("w4a16_g128_sym_bf16_native", w4, w4n, wd4, xb),
                    ("w4a16_g128_asym_fp16_native", w4a, w4an, wd4a, xh),
                    *(
                        (
                            ("w4a16_g128_sym_bf16_hopper", w4, w4h, wd4, xb),
                            ("w4a16_g128_asym_fp16_hopper", w4a, w4ah, wd4a, xh),
                        )
                        if w4h is not None and w4ah is not None
                        else ()
                    ),
                ):
                    b = bias.to(x.dtype)
                    ref = x.double() @ wd.t() + b.double()
                    y = cuda_mma.w4a16_mma_gemm(
                        x, qw, w["scales"], w["zeros"], 128, b, fill=math.nan
                    )
                    record(name, "cuda_mma", n, k, m, y, ref)
                ref = xb.double() @ wd8.t() + bias.double()
                y = t8.w8a16_gemm(xb, w8["qweight"], w8["scales"], bias, "cuda_mma", fill=math.nan)
                record("w8a16_bf16", "cuda_mma", n, k, m, y, ref)
            if m <= cuda_gemv.MAX_M:
                for name, w, wd, x in (
                    ("w4a16_g128_sym_bf16", w4, wd4, xb),
                    ("w4a16_g128_asym_fp16", w4a, wd4a, xh),
                ):
                    b = bias.to(x.dtype)
                    ref = x.double() @ wd.t() + b.double()
                    y = cuda_gemv.w4a16_cuda_gemm(
                        x, w["qweight"], w["scales"], w["zeros"], 128, b, fill=math.nan
                    )
                    record(name, "cuda_gemv", n, k, m, y, ref)
            for path in ("gemv", "halves", "splitk", "tiled", "dequant", "swap"):
                if path == "gemv" and m > 4:
                    continue
                if path in ("halves", "swap"):  # W4-only paths
                    ref = xb.double() @ wd4.t()
                    y = t4.w4a16_gemm(
                        xb, w4["qweight"], w4["scales"], None, 128, None, path, fill=math.nan
                    )
                    record("w4a16_g128_sym_bf16", path, n, k, m, y, ref)
                    continue
                ref = xb.double() @ wd4.t() + bias.double()
                y = t4.w4a16_gemm(
                    xb, w4["qweight"], w4["scales"], None, 128, bias, path, fill=math.nan
                )
                record("w4a16_g128_sym_bf16", path, n, k, m, y, ref)
                ref = xb.double() @ wd8.t()
                y = t8.w8a16_gemm(xb, w8["qweight"], w8["scales"], None, path, fill=math.nan)
                record("w8a16_bf16", path, n, k, m, y, ref)
            os.environ.pop("QUANTLAB_KERNELS_NO_TUNE")
        del w4, w4a, w8, f8, wd4, wd4a, wd8, w4n, w4an
        torch.cuda.empty_cache()
        log(f"checked N={n} K={k}: {sum(bool(r['ok']) for r in recs)}/{len(recs)} ok so far")
    # group sizes 32/64 and fp16 on the smallest shape, every path
    n, k = shapes[0]
    for g in (32, 64):
        for dt in (torch.float16, torch.bfloat16):
            for asym in (False, True):
                w = make_w4(n, k, g, asym, dt, dev)
                wd = reference.dequant_w4(w["qweight"], w["scales"], w["zeros"], g, torch.float64)
                name = f"w4a16_g{g}_{'asym' if asym else 'sym'}_{str(dt)[6:]}"
                for m in (1, 3, 8, 16, 256):
                    x = torch.randn(m, k, device=dev, dtype=dt)
                    ref = x.double() @ wd.t()
                    y = t4.w4a16_gemm(
                        x, w["qweight"], w["scales"], w["zeros"], g, None, "auto", fill=math.nan
                    )
                    record(name, "auto", n, k, m, y, ref)
                    if m <= cuda_gemv.MAX_M:
                        y = cuda_gemv.w4a16_cuda_gemm(
                            x, w["qweight"], w["scales"], w["zeros"], g, None, fill=math.nan
                        )
                        record(name, "cuda_gemv", n, k, m, y, ref)
                    qn = packing.to_mma_layout(w["qweight"])
                    y = cuda_mma.w4a16_native_auto(
                        x, qn, w["scales"], w["zeros"], g, None, fill=math.nan
                    )
                    record(name + "_native", "auto", n, k, m, y, ref)
                    y = cuda_mma.w4a16_mma_gemm(
                        x, qn, w["scales"], w["zeros"], g, None, fill=math.nan
                    )
                    record(name + "_native", "cuda_mma", n, k, m, y, ref)
                    qh = packing.to_wgmma_layout(w["qweight"])
                    y = cuda_mma.w4a16_mma_gemm(
                        x, qh, w["scales"], w["zeros"], g, None, fill=math.nan
                    )
                    record(name + "_hopper", "cuda_mma", n, k, m, y, ref)
                    if g == 64 and cutlass_w4.available(torch.device(dev)):
                        y = cutlass_w4.w4a16_cutlass_gemm(
                            x, qh, w["scales"], w["zeros"], g, None, fill=math.nan
                        )
                        record(name + "_hopper", "cutlass", n, k, m, y, ref)
    return recs


def tinygemm_pack(
    n: int, k: int, copies: int, dev: str
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Random weights in torch's int4 tinygemm layout (g128), or None if this build lacks it."""
    try:
        out = []
        for _ in range(copies):
            w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
            packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
            sz = (torch.rand(k // 128, n, 2, device=dev) * 0.01).to(torch.bfloat16)
            out.append((packed, sz))
        return out
    except (RuntimeError, AttributeError):
        return None


def bench_shape(n: int, k: int, ms: list[int], l2: int, log: Callable[[str], None]) -> list[dict]:
    """Time every method on one N x K over ms."""
    from quantlab.kernels import triton_w4a16 as t4
    from quantlab.kernels import triton_w8a16 as t8

    dev = "cuda"
    # >= 8 copies, and enough that the int4 copies together are >= 3x L2 (bf16 ones are 4x more).
    cps = max(8, math.ceil(3 * l2 / (n * k // 2)))
    w4 = [make_w4(n, k, 128, False, torch.bfloat16, dev) for _ in range(cps)]
    w4n = [packing.to_mma_layout(w["qweight"]) for w in w4]  # converted once, offline
    hopper = cutlass_w4.available(torch.device(dev))
    # Hopper layout and N-major scales (the kernel's scale order), also converted offline
    w4h = [packing.to_wgmma_layout(w["qweight"]) for w in w4] if hopper else []
    s4h = [w["scales"].t().contiguous().t() for w in w4] if hopper else []
    w8 = [make_w8(n, k, torch.bfloat16, dev) for _ in range(8)]
    f8 = [make_fp8(n, k, dev) for _ in range(8)]
    wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
    tg = tinygemm_pack(n, k, cps, dev)
    recs = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, sx = reference.quantize_fp8_act(x, "row")
        # the GEMM-alone columns read one of 8 copies of the quantized x per call, like the
        # weights, so xq is not served from L2 across calls (one shared copy made some rows up
        # to ~12 % faster than the GEMM inside the op, which reads a freshly written xq; runs 57-58)
        xqs = [xq.clone() for _ in range(8)]
        xs = (x.abs().amax().float() / reference.FP8_MAX).reshape(1)  # a calibrated static scale
        act_out = nbytes(x) + m * n * 2
        methods: dict[str, tuple[Callable[..., object], int, int]] = {
            "cublas_bf16": (lambda i, x=x: F.linear(x, wb[i]), 8, nbytes(wb[0]) + act_out),
            "w4a16_g128": (
                lambda i, x=x: t4.w4a16_gemm(x, w4[i]["qweight"], w4[i]["scales"], None, 128, None),
                cps,
                nbytes(w4[0]["qweight"], w4[0]["scales"]) + act_out,
            ),
            "w4a16_g128_native": (
                lambda i, x=x: cuda_mma.w4a16_native_auto(
                    x, w4n[i], w4[i]["scales"], None, 128, None
                ),
                cps,
                nbytes(w4n[0], w4[0]["scales"]) + act_out,
            ),
            "w8a16": (
                lambda i, x=x: t8.w8a16_gemm(x, w8[i]["qweight"], w8[i]["scales"], None),
                8,
                nbytes(w8[0]["qweight"], w8[0]["scales"]) + act_out,
            ),
            "fp8_row_dyn": (
                lambda i, x=x: fp8_scaled_mm(
                    x, f8[i]["weight"], f8[i]["weight_scale"], None, None, "row"
                ),
                8,
                nbytes(f8[0]["weight"], f8[0]["weight_scale"]) + act_out,
            ),
            "fp8_row_fast_dyn": (
                lambda i, x=x: fp8_scaled_mm(
                    x, f8[i]["weight"], f8[i]["weight_scale"], None, None, "row", fast_accum=True
                ),
                8,
                nbytes(f8[0]["weight"], f8[0]["weight_scale"]) + act_out,
            ),
            "fp8_tensor_dyn_fast": (
                lambda i, x=x: fp8_scaled_mm(
                    x, f8[i]["weight"], f8[i]["weight_scale"][:1], None, None, "tensor", True
                ),
                8,
                nbytes(f8[0]["weight"]) + act_out,
            ),
            "fp8_tensor_static_fast": (
                lambda i, x=x, xs=xs: fp8_scaled_mm(
                    x, f8[i]["weight"], f8[i]["weight_scale"][:1], None, xs, "tensor", True
                ),
                8,
                nbytes(f8[0]["weight"]) + act_out,
            ),
            "fp8_row_gemm_only": (
                lambda i, xqs=xqs, sx=sx: torch._scaled_mm(
                    xqs[i],
                    f8[i]["weight"].t(),
                    scale_a=sx,
                    scale_b=f8[i]["weight_scale"].reshape(1, -1),
                    out_dtype=torch.bfloat16,
                ),
                8,
                nbytes(f8[0]["weight"], f8[0]["weight_scale"]) + act_out,
            ),
        }
        if hopper:
            methods["w4a16_g128_hopper"] = (
                lambda i, x=x: cutlass_w4.w4a16_hopper_auto(x, w4h[i], s4h[i], None, 128, None),
                cps,
                nbytes(w4h[0], s4h[0]) + act_out,
            )
        xt, st = reference.quantize_fp8_act(x, "tensor")
        xts = [xt.clone() for _ in range(8)]
        one = torch.ones((), device=dev)
        methods["fp8_tensor_fast_gemm_only"] = (
            lambda i, xts=xts, st=st, one_=one: torch._scaled_mm(
                xts[i],
                f8[i]["weight"].t(),
                scale_a=st.reshape(()),
                scale_b=one_,
                out_dtype=torch.bfloat16,
                use_fast_accum=True,
            ),
            8,
            nbytes(f8[0]["weight"]) + act_out,
        )
        if tg is not None:
            methods["tinygemm_int4"] = (
                lambda i, x=x: torch.ops.aten._weight_int4pack_mm(x, tg[i][0], 128, tg[i][1]),
                cps,
                nbytes(*tg[0]) + act_out,
            )
        row: dict[str, Any] = {"N": n, "K": k, "M": m, "copies_w4": cps}
        for name, (fn, copies, b) in methods.items():
            try:
                ms_ = time_rotating(fn, copies, quick_ms(fn))
            except Exception as err:  # a baseline that this build cannot run is reported, not fatal
                row[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
                continue
            row[name] = {"us": ms_ * 1e3, "GBps": b / (ms_ * 1e-3) / 1e9}
        base = row["cublas_bf16"].get("us")
        for name in methods:
            if "us" in row[name] and base:
                row[name]["x_cublas"] = base / row[name]["us"]
        keys4: list[Any] = list(t4.TUNER.cache)  # tuple keys (see triton_w4a16.w4a16_gemm)
        keys8: list[Any] = list(t8.TUNER.cache)
        key4 = next(
            (
                kk
                for kk in keys4
                if kk[0] == t4.m_bucket(m)
                and kk[1] == n
                and kk[2] == k
                and kk[3] == 128
                and kk[4] == torch.bfloat16
                and not kk[6]
                and not kk[7]
                and kk[8] == "auto"
            ),
            None,
        )
        row["w4a16_g128"]["plan"] = str(t4.TUNER.cache.get(key4)) if key4 else "?"
        keyn = (t4.m_bucket(m), n, k, 128, torch.bfloat16, torch.bfloat16, False, False, 1)
        keysn: list[Any] = list(cuda_mma.TUNER.cache)  # tuple keys (see cuda_mma._key)
        keyn_hit = [kk for kk in keysn if kk[:9] == keyn and kk[9] == "autoTrue"]
        if "w4a16_g128_native" in row and keyn_hit:
            row["w4a16_g128_native"]["plan"] = str(cuda_mma.TUNER.cache[keyn_hit[0]])
        keyh = (t4.m_bucket(m), n, k, 128, torch.bfloat16, torch.bfloat16, True, False, False)
        if "w4a16_g128_hopper" in row and keyh in cutlass_w4.HOPPER_TUNER.cache:
            row["w4a16_g128_hopper"]["plan"] = str(cutlass_w4.HOPPER_TUNER.cache[keyh])
        key8 = next(
            (
                kk
                for kk in keys8
                if kk[0] == t8.m_bucket(m)
                and kk[1] == n
                and kk[2] == k
                and kk[3] == torch.bfloat16
                and not kk[5]
                and str(kk[6]).startswith("auto")
            ),
            None,
        )
        row["w8a16"]["plan"] = str(t8.TUNER.cache.get(key8)) if key8 else "?"
        recs.append(row)
        log(json.dumps(row))
    return recs


def check_small_m(shapes: list[tuple[int, int]], log: Callable[[str], None]) -> list[dict]:
    """fp64 check of every CUDA small-M plan: every shape x G 32/64/128 x fp16/bf16 x sym/asym
    (asym with bias and fp32 scales on half the formats) x M in 1, 2, 3, 4, 8; NaN-poisoned."""
    recs: list[dict[str, Any]] = []
    dev = "cuda"
    for n, k in shapes:
        for g in (32, 64, 128):
            for dt in (torch.float16, torch.bfloat16):
                for asym in (False, True):
                    w = make_w4(n, k, g, asym, dt, dev)
                    if asym and dt == torch.bfloat16:
                        w["scales"] = w["scales"].float()
                    wd = reference.dequant_w4(
                        w["qweight"], w["scales"], w["zeros"], g, torch.float64
                    )
                    bias = torch.randn(n, device=dev, dtype=dt) if asym else None
                    name = f"g{g}_{'asym' if asym else 'sym'}_{str(dt)[6:]}"
                    for m in (1, 2, 3, 4, 8):
                        x = torch.randn(m, k, device=dev, dtype=dt)
                        ref = x.double() @ wd.t()
                        if bias is not None:
                            ref += bias.double()
                        for p in cuda_gemv.candidates(g):
                            y = cuda_gemv.run_plan(
                                p, x, w["qweight"], w["scales"], w["zeros"], g, bias, math.nan
                            )
                            err = rel_err(y, ref)
                            ok = err < TOL
                            recs.append(
                                {"fmt": name, "plan": str(p), "N": n, "K": k, "M": m,
                                 "rel_err": err, "ok": ok}
                            )  # fmt: skip
                            if not ok:
                                log(f"FAIL {name} {p} N={n} K={k} M={m} rel_err={err:.3e}")
                    del w, wd
            torch.cuda.empty_cache()
        bad = sum(not r["ok"] for r in recs)
        log(f"small-M check N={n} K={k}: {len(recs) - bad}/{len(recs)} ok so far")
    return recs


def time_small_m(
    shapes: list[tuple[int, int]], ms: list[int], l2: int, log: Callable[[str], None]
) -> list[dict]:
    """Every CUDA small-M plan (g128 sym bf16) vs cuBLAS bf16, rotated weights, CUDA graphs."""
    dev = "cuda"
    rows = []
    for n, k in shapes:
        cps = max(8, math.ceil(3 * l2 / (n * k // 2)))
        w4 = [make_w4(n, k, 128, False, torch.bfloat16, dev) for _ in range(cps)]
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        wbytes = nbytes(w4[0]["qweight"], w4[0]["scales"])
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            base = cublas_us(x, wb)
            row: dict[str, Any] = {"N": n, "K": k, "M": m, "cublas_us": base, "plans": {}}
            for p in cuda_gemv.candidates(128):
                fn = lambda i, x=x, p=p, w4=w4: cuda_gemv.run_plan(  # noqa: E731
                    p, x, w4[i]["qweight"], w4[i]["scales"], None, 128, None
                )
                us = time_rotating(fn, cps, quick_ms(fn)) * 1e3
                row["plans"][str(p)] = us
            best = min(row["plans"], key=row["plans"].get)
            us = row["plans"][best]
            row.update(best=best, best_us=us, x_cublas=base / us, GBps=wbytes / us / 1e3)
            log(
                f"{n}x{k} M={m}: cuBLAS {base:.1f} us, best {best} {us:.1f} us "
                f"({base / us:.2f}x, {wbytes / us / 1e3:.0f} GB/s)"
            )
            rows.append(row)
        del w4, wb
        torch.cuda.empty_cache()
    return rows


def check_mma(log: Callable[[str], None]) -> list[dict]:
    """fp64 check of every cuda_mma plan on odd shapes: both layouts (checkpoint for G 64/128),
    G 32/64/128 x fp16/bf16 x sym/asym (asym with bias) x M in 1, 3, 8, 9, 16, 17, 32, 40, 64,
    100, plus
    the native dequantize kernel; NaN-poisoned outputs."""
    recs: list[dict[str, Any]] = []
    dev = "cuda"
    for n, k in ((1216, 1152), (362, 2304)):
        for g in (32, 64, 128):
            for dt in (torch.float16, torch.bfloat16):
                for asym in (False, True):
                    w = make_w4(n, k, g, asym, dt, dev)
                    wd = reference.dequant_w4(
                        w["qweight"], w["scales"], w["zeros"], g, torch.float64
                    )
                    bias = torch.randn(n, device=dev, dtype=dt) if asym else None
                    qn = packing.to_mma_layout(w["qweight"])
                    name = f"g{g}_{'asym' if asym else 'sym'}_{str(dt)[6:]}"
                    wq = cuda_mma.dequant_native(qn, w["scales"], w["zeros"], g, dt, math.nan)
                    err = rel_err(wq, wd.to(dt).double())
                    recs.append({"fmt": name, "plan": "dequant_native", "N": n, "K": k, "M": 0,
                                 "rel_err": err, "ok": err < 1e-6})  # fmt: skip
                    for m in (1, 3, 8, 9, 16, 17, 32, 40, 64, 100):
                        x = torch.randn(m, k, device=dev, dtype=dt)
                        ref = x.double() @ wd.t()
                        if bias is not None:
                            ref += bias.double()
                        layouts = [("native", qn)]
                        if g >= 64:
                            layouts.append(("ckpt", w["qweight"]))
                        for lname, qw in layouts:
                            for p in cuda_mma.candidates(m, sym=not asym):
                                y = cuda_mma.run_plan(
                                    p, x, qw, w["scales"], w["zeros"], g, bias, math.nan
                                )
                                err = rel_err(y, ref)
                                recs.append({"fmt": name, "plan": f"{lname} {p}", "N": n,
                                             "K": k, "M": m, "rel_err": err,
                                             "ok": err < TOL})  # fmt: skip
                    del w, wd, qn
        bad = [r for r in recs if not r["ok"]]
        for r in bad[:20]:
            log(f"FAIL {r}")
        log(f"cuda_mma check N={n} K={k}: {len(recs) - len(bad)}/{len(recs)} ok so far")
    return recs


def time_mma(
    shapes: list[tuple[int, int]], ms: list[int], l2: int, log: Callable[[str], None]
) -> list[dict]:
    """Every cuda_mma plan (g128 sym bf16, both layouts) and the tuned cuda_gemv (M <= 8) vs
    cuBLAS bf16, rotated weights, CUDA graphs."""
    dev = "cuda"
    rows = []
    for n, k in shapes:
        cps = max(8, math.ceil(3 * l2 / (n * k // 2)))
        w4 = [make_w4(n, k, 128, False, torch.bfloat16, dev) for _ in range(cps)]
        w4n = [packing.to_mma_layout(w["qweight"]) for w in w4]
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        wbytes = nbytes(w4[0]["qweight"], w4[0]["scales"])
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            base = cublas_us(x, wb)
            row: dict[str, Any] = {"N": n, "K": k, "M": m, "cublas_us": base, "plans": {}}
            for lname, qws in (("native", w4n), ("ckpt", [w["qweight"] for w in w4])):
                for p in cuda_mma.candidates(m, sym=True):
                    fn = lambda i, x=x, p=p, qws=qws, w4=w4: cuda_mma.run_plan(  # noqa: E731
                        p, x, qws[i], w4[i]["scales"], None, 128, None
                    )
                    row["plans"][f"{lname} {p}"] = time_rotating(fn, cps, quick_ms(fn)) * 1e3
            if m <= cuda_gemv.MAX_M:
                fg = lambda i, x=x, w4=w4: cuda_gemv.w4a16_cuda_gemm(  # noqa: E731
                    x, w4[i]["qweight"], w4[i]["scales"], None, 128, None
                )
                row["cuda_gemv_us"] = time_rotating(fg, cps, quick_ms(fg)) * 1e3
            for lname in ("native", "ckpt"):
                mine = sorted((v, kk) for kk, v in row["plans"].items() if kk.startswith(lname))
                row[f"best_{lname}"] = (mine[0][1], mine[0][0])
            us = row["best_native"][1]
            log(
                f"{n}x{k} M={m}: cuBLAS {base:.1f} us | native {row['best_native'][0]} "
                f"{us:.1f} us ({base / us:.2f}x, {wbytes / us / 1e3:.0f} GB/s) | ckpt "
                f"{row['best_ckpt'][0]} {row['best_ckpt'][1]:.1f} us "
                f"({base / row['best_ckpt'][1]:.2f}x) | cuda_gemv "
                f"{row.get('cuda_gemv_us', float('nan')):.1f} us"
            )
            rows.append(row)
        del w4, w4n, wb
        torch.cuda.empty_cache()
    return rows


def check_plans(backend: str, log: Callable[[str], None]) -> list[dict]:
    """fp64 check of every plan of one Triton W4 backend on odd shapes: G 128 x fp16/bf16 x
    sym/asym (asym with bias) for every plan, G 32/64 for the first and last plan; NaN-poisoned
    outputs; M in 1, 16, 33, 100, 257."""
    from quantlab.kernels import triton_w4a16 as t4

    recs: list[dict[str, Any]] = []
    for n, k in ((1216, 1152), (362, 2304)):
        for g in (128, 64, 32):
            for dt in (torch.float16, torch.bfloat16):
                for asym in (False, True):
                    w = make_w4(n, k, g, asym, dt, "cuda")
                    wd = reference.dequant_w4(
                        w["qweight"], w["scales"], w["zeros"], g, torch.float64
                    )
                    bias = torch.randn(n, device="cuda", dtype=dt) if asym else None
                    name = f"g{g}_{'asym' if asym else 'sym'}_{str(dt)[6:]}"
                    for m in (1, 16, 33, 100, 257):
                        x = torch.randn(m, k, device="cuda", dtype=dt)
                        ref = x.double() @ wd.t()
                        if bias is not None:
                            ref += bias.double()
                        plans = t4.candidates(m, g, backend)
                        if g != 128:
                            plans = [plans[0], plans[-1]]
                        for p in plans:
                            y = t4.run_plan(p, x, w["qweight"], w["scales"], w["zeros"], g,
                                            bias, math.nan)  # fmt: skip
                            err = rel_err(y, ref)
                            recs.append({"fmt": name, "plan": str(p), "N": n, "K": k, "M": m,
                                         "rel_err": err, "ok": err < TOL})  # fmt: skip
        bad = [r for r in recs if not r["ok"]]
        for r in bad[:20]:
            log(f"FAIL {r}")
        log(f"{backend} check N={n} K={k}: {len(recs) - len(bad)}/{len(recs)} ok so far")
    return recs


def time_plans(
    backend: str, shapes: list[tuple[int, int]], ms: list[int], l2: int, log: Callable[[str], None]
) -> list[dict]:
    """Every plan of one Triton W4 backend (g128 sym bf16, checkpoint layout) vs cuBLAS bf16 and
    rotated weights, CUDA graphs."""
    from quantlab.kernels import triton_w4a16 as t4

    rows = []
    for n, k in shapes:
        cps = max(8, math.ceil(3 * l2 / (n * k // 2)))
        w4 = [make_w4(n, k, 128, False, torch.bfloat16, "cuda") for _ in range(cps)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = cublas_us(x, wb)
            row: dict[str, Any] = {"N": n, "K": k, "M": m, "cublas_us": base, "plans": {}}
            wd = reference.dequant_w4(w4[0]["qweight"], w4[0]["scales"], None, 128, torch.float64)
            ref = x.double() @ wd.t()
            del wd
            for p in t4.candidates(m, 128, backend):
                fn = lambda i, x=x, p=p, w4=w4: t4.run_plan(  # noqa: E731
                    p, x, w4[i]["qweight"], w4[i]["scales"], None, 128, None
                )
                try:
                    err = rel_err(fn(0), ref)
                    if not err < TOL:
                        log(f"  FAIL {p}: rel err {err:.2e}")
                    row["plans"][str(p)] = time_rotating(fn, cps, quick_ms(fn)) * 1e3
                except Exception as err:  # a plan that does not compile/fit is reported
                    log(f"  {p}: {type(err).__name__}: {str(err)[:200]}")
            best = min(row["plans"].items(), key=lambda kv: kv[1])
            row["best"] = best
            log(
                f"{n}x{k} M={m}: cuBLAS {base:.1f} us | {backend} best {best[0]} {best[1]:.1f} us "
                f"({base / best[1]:.2f}x) | all: "
                + ", ".join(f"{v:.1f}" for v in row["plans"].values())
            )
            rows.append(row)
        del w4, wb
        torch.cuda.empty_cache()
    return rows


def _plan_records(
    plans: list[Any],
    run: Callable[[Any, int, float | None], torch.Tensor],
    copies: int,
    ref: torch.Tensor,
    base_us: float,
    where: dict[str, int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each plan: run(plan, copy 0, NaN fill) against the fp64 ref [M, N], then the graph-replayed
    time of run(plan, i, None) over `copies` rotating weight copies; records sorted by time. A
    plan the kernel refuses for this problem (RuntimeError) is logged and left out."""
    res: list[dict[str, Any]] = []
    for p in plans:

        def timed(i: int, p: Any = p) -> torch.Tensor:
            return run(p, i, None)

        try:
            err = rel_err(run(p, 0, math.nan), ref)
            us = time_rotating(timed, copies, quick_ms(timed)) * 1e3
        except RuntimeError as e:
            log(f"  {p}: {str(e)[:160]}")
            continue
        res.append({**where, "plan": str(p), "us": us, "x_cublas": base_us / us, "rel_err": err,
                    "ok": err < TOL, "cublas_us": base_us})  # fmt: skip
    res.sort(key=lambda r: float(r["us"]))
    return res


def time_w8(shapes: list[tuple[int, int]], ms: list[int], log: Callable[[str], None]) -> list[dict]:
    """Every W8A16 plan (cuda_mma, Triton, cutlass_w8 from M = 64) per shape and M: fp64 check, then the
    graph-replayed time over 8 rotating weight copies, next to cuBLAS bf16 in the same run."""
    from quantlab.kernels import triton_w8a16 as t8

    recs: list[dict[str, Any]] = []
    for n, k in shapes:
        w8 = [make_w8(n, k, torch.bfloat16, "cuda") for _ in range(8)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        wd = reference.dequant_w8(w8[0]["qweight"], w8[0]["scales"], torch.float64)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ wd.t()
            base = cublas_us(x, wb)
            plans = cuda_mma.w8_candidates(m) if m <= cuda_mma.W8_MAX_M else []
            plans += t8.candidates(m, "splitk")
            plans += t8.candidates(m, "gemv") if m <= 4 else []
            if m >= 64:
                plans += t8.candidates(m, "tiled") + t8.candidates(m, "dequant")
                if cutlass_w8.available(torch.device("cuda")):
                    plans += cutlass_w8.candidates(torch.bfloat16, m)

            def run_w8(
                p: Any, i: int, fill: float | None, x: torch.Tensor = x, w8: list = w8
            ) -> torch.Tensor:
                return t8.run_plan(p, x, w8[i]["qweight"], w8[i]["scales"], None, fill)

            res = _plan_records(plans, run_w8, 8, ref, base, {"N": n, "K": k, "M": m}, log)
            recs += res
            top = " ".join(f"{r['plan']}={r['us']:.1f}us({r['x_cublas']:.2f}x)" for r in res[:4])
            bad = sum(not r["ok"] for r in res)
            log(f"W8 {n}x{k} M={m}: cuBLAS {base:.1f}us | {top} | {len(res)} plans, {bad} failed")
        torch.cuda.empty_cache()
    return recs


def time_hopper(
    shapes: list[tuple[int, int]], ms: list[int], l2: int, log: Callable[[str], None]
) -> list[dict]:
    """Every plan auto weighs on the Hopper layout (cuda_mma up to M = 32, every cutlass_w4
    configuration), W4 g128 sym bf16 with N-major scales: fp64 check (NaN-poisoned output), then
    the graph-replayed time over rotating weight copies, next to cuBLAS bf16 in the same run."""
    recs: list[dict[str, Any]] = []
    for n, k in shapes:
        cps = max(8, math.ceil(3 * l2 / (n * k // 2)))
        w4 = [make_w4(n, k, 128, False, torch.bfloat16, "cuda") for _ in range(cps)]
        w4h = [packing.to_wgmma_layout(w["qweight"]) for w in w4]
        s4h = [w["scales"].t().contiguous().t() for w in w4]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        wd = reference.dequant_w4(w4[0]["qweight"], w4[0]["scales"], None, 128, torch.float64)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ wd.t()
            base = cublas_us(x, wb)

            def run_h(
                p: Any,
                i: int,
                fill: float | None,
                x: torch.Tensor = x,
                w: list = w4h,
                s: list = s4h,
            ) -> torch.Tensor:
                return cutlass_w4.run_hopper_plan(p, x, w[i], s[i], None, 128, None, fill)

            plans = cutlass_w4.hopper_plans(x, w4h[0], s4h[0], None, 128, None)
            res = _plan_records(plans, run_h, cps, ref, base, {"N": n, "K": k, "M": m}, log)
            recs += res
            top = " ".join(f"{r['plan']}={r['us']:.1f}us({r['x_cublas']:.2f}x)" for r in res)
            bad = sum(not r["ok"] for r in res)
            log(f"W4H {n}x{k} M={m}: cuBLAS {base:.1f}us | {len(res)} plans, {bad} failed | {top}")
        del wd, ref
        torch.cuda.empty_cache()
    return recs


def time_fp8_quant(ks: list[int], ms: list[int], log: Callable[[str], None]) -> list[dict]:
    """The per-row e4m3 activation quantizer, one-pass against two-pass (both compiled from the
    same kernel), and the per-tensor dynamic one (Triton amax + cast against the torch ops of
    reference.quantize_fp8_act), over 8 rotating x copies in CUDA graphs; GB/s counts x read
    once + codes and scales written. Codes and scales of the variants must be bit-identical."""
    from quantlab.kernels.fp8 import _quant_rows_triton as quant
    from quantlab.kernels.fp8 import _quant_tensor_triton
    from quantlab.kernels.triton_fp8_quant import ONE_PASS_MAX_K

    recs = []
    for k in ks:
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            row: dict[str, Any] = {"M": m, "K": k}
            a, b = quant(xs[0], False), quant(xs[0], True) if k <= ONE_PASS_MAX_K else None
            row["identical"] = (
                b is not None
                and torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
                and torch.equal(a[1], b[1])
            )
            byts = m * k * 3 + m * 4
            for name, one in (("two_pass", False), ("one_pass", True)):
                if one and k > ONE_PASS_MAX_K:
                    continue

                def fn(i: int, one: bool = one, xs: list = xs) -> object:
                    return quant(xs[i], one)

                us = time_rotating(fn, 8, quick_ms(fn)) * 1e3
                row[name] = {"us": us, "GBps": byts / us / 1e3}
            t, r = _quant_tensor_triton(xs[0]), reference.quantize_fp8_act(xs[0], "tensor")
            row["tensor_identical"] = torch.equal(t[0].view(torch.uint8), r[0].view(torch.uint8))
            row["tensor_identical"] &= torch.equal(t[1], r[1])
            for name, qf in (("tensor_triton", _quant_tensor_triton),
                             ("tensor_torch", lambda v: reference.quantize_fp8_act(v, "tensor"))):  # fmt: skip

                def ft(i: int, qf: Callable = qf, xs: list = xs) -> object:
                    return qf(xs[i])

                us = time_rotating(ft, 8, quick_ms(ft)) * 1e3
                row[name] = {"us": us, "GBps": (m * k * 3 + 4) / us / 1e3}
            recs.append(row)
            one = row.get("one_pass", {}).get("us", float("nan"))
            log(f"fp8 row-quant M={m} K={k}: two-pass {row['two_pass']['us']:.1f} us "
                f"({row['two_pass']['GBps']:.0f} GB/s), one-pass {one:.1f} us, "
                f"{row['two_pass']['us'] / one:.2f}x, identical {row['identical']}; per tensor: "
                f"Triton {row['tensor_triton']['us']:.1f} us, torch ops "
                f"{row['tensor_torch']['us']:.1f} us, identical {row['tensor_identical']}")  # fmt: skip
            del xs
    return recs


def markdown(rows: list[dict]) -> str:
    """Results table: per shape and M, microseconds and ratio vs cuBLAS bf16 for each method."""
    names = [
        "cublas_bf16",
        "w4a16_g128",
        "w4a16_g128_native",
        "w4a16_g128_hopper",
        "tinygemm_int4",
        "w8a16",
        "fp8_row_dyn",
        "fp8_row_fast_dyn",
        "fp8_tensor_dyn_fast",
        "fp8_tensor_static_fast",
        "fp8_row_gemm_only",
        "fp8_tensor_fast_gemm_only",
    ]
    head = (
        "| N x K | M | "
        + " | ".join(f"{n} us (x cuBLAS)" for n in names)
        + " | W4 GB/s | W4 plan | W4 native GB/s | W4 native plan | W4 Hopper GB/s | W4 Hopper plan"
        + " | W8 GB/s | W8 plan |"
    )
    lines = [head, "|" + "---|" * (len(names) + 10)]
    for r in rows:
        cells = []
        for nm in names:
            v = r.get(nm, {})
            cells.append(f"{v['us']:.1f} ({v.get('x_cublas', 1):.2f}x)" if "us" in v else "n/a")
        w4 = r.get("w4a16_g128", {})
        w4n = r.get("w4a16_g128_native", {})
        w4h = r.get("w4a16_g128_hopper", {})
        w8 = r.get("w8a16", {})
        lines.append(
            f"| {r['N']}x{r['K']} | {r['M']} | "
            + " | ".join(cells)
            + f" | {w4.get('GBps', 0):.0f} | {w4.get('plan', '')}"
            + f" | {w4n.get('GBps', 0):.0f} | {w4n.get('plan', '')}"
            + f" | {w4h.get('GBps', 0):.0f} | {w4h.get('plan', '')}"
            + f" | {w8.get('GBps', 0):.0f} | {w8.get('plan', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: correctness over all shapes, then timing; writes JSON + markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument(
        "--skip-timing",
        action="store_true",
        help="correctness only (the full run split in two commands: --skip-timing, --skip-check)",
    )
    ap.add_argument(
        "--mma",
        action="store_true",
        help="only the cuda_mma kernel: fp64 check of every plan, then every plan's timing",
    )
    ap.add_argument(
        "--w8",
        action="store_true",
        help="only W8A16: every cuda_mma and Triton plan, fp64 check and graph timing vs cuBLAS",
    )
    ap.add_argument(
        "--hopper",
        action="store_true",
        help="only W4 g128 on the Hopper layout: every cuda_mma and cutlass_w4 plan auto weighs, "
        "fp64 check and graph timing vs cuBLAS",
    )
    ap.add_argument(
        "--fp8-quant",
        action="store_true",
        help="only the per-row FP8 activation quantizer: one-pass vs two-pass timing (K = the "
        "shapes' K values, M = --ms)",
    )
    ap.add_argument(
        "--small-m",
        action="store_true",
        help="only the CUDA small-M kernel: fp64 check of every plan, then every plan's timing",
    )
    ap.add_argument(
        "--plans",
        default="",
        help="only one Triton W4 backend (e.g. swap): fp64 check of every plan, then every "
        "plan's timing vs cuBLAS",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench needs a CUDA device; CPU correctness lives in tests/test_kernels_*.py")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    logf = open(out / "bench.log", "w")  # noqa: SIM115 - kept open for the whole run

    def log(s: str) -> None:
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    import triton

    props = torch.cuda.get_device_properties(0)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name,
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python -m quantlab.kernels.bench " + " ".join(sys.argv[1:]),
        "copy_GBps": copy_bandwidth(),
        "weights": "random (uniform int4/int8 codes, random scales); never zeros",
    }
    log(json.dumps(meta))
    result: dict[str, Any] = {"meta": meta}
    t0 = time.time()
    if args.mma:
        lib = cuda_mma.build(verbose=True)
        log(f"built {lib} in {time.time() - t0:.1f}s")
        checks = check_mma(log)
        bad = [c for c in checks if not c["ok"]]
        worst = max(c["rel_err"] for c in checks if c["M"])
        log(f"cuda_mma correctness: {len(checks) - len(bad)}/{len(checks)} ok, worst {worst:.3e}")
        result["mma_checks"] = {"n": len(checks), "bad": bad, "worst": worst}
        (out / "mma.json").write_text(json.dumps(result, indent=1, default=str))
        result["mma"] = time_mma(shapes, ms, meta["l2_bytes"], log)  # type: ignore[arg-type]
        (out / "mma.json").write_text(json.dumps(result, indent=1, default=str))
        log(f"total {time.time() - t0:.0f}s")
        return 0 if not bad else 1
    if args.plans:
        checks = check_plans(args.plans, log)
        bad = [c for c in checks if not c["ok"]]
        worst = max(c["rel_err"] for c in checks)
        log(f"{args.plans} correctness: {len(checks) - len(bad)}/{len(checks)} ok, worst "
            f"{worst:.3e}, {time.time() - t0:.0f}s")  # fmt: skip
        result["plan_checks"] = {"n": len(checks), "bad": bad, "worst": worst}
        result["plans"] = time_plans(args.plans, shapes, ms, meta["l2_bytes"], log)  # type: ignore[arg-type]
        (out / f"plans_{args.plans}.json").write_text(json.dumps(result, indent=1, default=str))
        log(f"total {time.time() - t0:.0f}s")
        return 0 if not bad else 1
    if args.w8:
        recs = time_w8(shapes, ms, log)  # type: ignore[arg-type]
        result["w8"] = recs
        (out / "w8.json").write_text(json.dumps(result, indent=1, default=str))
        bad = [r for r in recs if not r["ok"]]
        log(
            f"W8 plans: {len(recs) - len(bad)}/{len(recs)} within {TOL}, total {time.time() - t0:.0f}s"
        )
        return 0 if not bad else 1
    if args.hopper:
        recs = time_hopper(shapes, ms, meta["l2_bytes"], log)  # type: ignore[arg-type]
        result["hopper"] = recs
        (out / "hopper.json").write_text(json.dumps(result, indent=1, default=str))
        bad = [r for r in recs if not r["ok"]]
        log(f"W4 Hopper plans: {len(recs) - len(bad)}/{len(recs)} within {TOL}, "
            f"total {time.time() - t0:.0f}s")  # fmt: skip
        return 0 if not bad else 1
    if args.fp8_quant:
        ks = sorted({k for _, k in shapes})
        recs = time_fp8_quant(ks, ms, log)
        result["fp8_quant"] = recs
        (out / "fp8_quant.json").write_text(json.dumps(result, indent=1, default=str))
        bad = [
            r for r in recs if (r["K"] <= 32768 and not r["identical"]) or not r["tensor_identical"]
        ]
        log(f"fp8 quant: {len(recs) - len(bad)}/{len(recs)} rows bit-identical or two-pass only")
        return 0 if not bad else 1
    if args.small_m:
        lib = cuda_gemv.build(verbose=True)
        log(f"built {lib} in {time.time() - t0:.1f}s")
        checks = check_small_m(shapes, log)  # type: ignore[arg-type]
        bad = [c for c in checks if not c["ok"]]
        worst = max(c["rel_err"] for c in checks)
        log(f"small-M correctness: {len(checks) - len(bad)}/{len(checks)} ok, worst {worst:.3e}")
        result["small_m_checks"] = {"n": len(checks), "bad": bad, "worst": worst}
        result["small_m"] = time_small_m(shapes, ms, meta["l2_bytes"], log)  # type: ignore[arg-type]
        (out / "small_m.json").write_text(json.dumps(result, indent=1, default=str))
        log(f"total {time.time() - t0:.0f}s")
        return 0 if not bad else 1
    if not args.skip_check:
        checks = check_all(shapes, ms, log)  # type: ignore[arg-type]
        result["checks"] = checks
        bad = [c for c in checks if not c["ok"]]
        worst = max(c["rel_err"] for c in checks)
        log(
            f"correctness: {len(checks) - len(bad)}/{len(checks)} ok, worst rel_err {worst:.3e}, "
            f"{time.time() - t0:.0f}s"
        )
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    if args.skip_timing:
        log(f"total {time.time() - t0:.0f}s")
        return 0 if not result.get("checks") or all(c["ok"] for c in result["checks"]) else 1
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, ms, meta["l2_bytes"], log)
        torch.cuda.empty_cache()
        result["rows"] = rows
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    from quantlab.kernels import triton_w4a16 as t4

    result["tuning"] = {str(k): v for k, v in t4.TUNER.timings.items()}
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(rows)
    (out / "bench.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    log(table)
    log(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

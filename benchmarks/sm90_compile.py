"""Compile the engine's newer Triton kernels for sm_90 (H100 / H200) on a machine without a GPU.

The CPU interpreter checks their numerics but not what the GPU compiler accepts: layouts, tl.dot
operand types, shared-memory use. This script calls the kernels' own Python wrappers on small CPU
tensors with Triton's launch replaced by a recorder, so every (kernel, constexpr set, num_warps,
num_stages) a wrapper would launch is captured exactly as it would be launched, then compiles
each one with triton.compile for the cuda:90 target (Triton's own ptxas). A kernel that fails to
compile or needs more shared memory than an sm_90 block may have fails the run.

    python benchmarks/sm90_compile.py [--only w8a16_group,w8a8,fused,attention] [--out FILE.json]

Run without TRITON_INTERPRET (the recorder patches the compiled-kernel path). Numerics still need
the GPU tests (tests/test_kernels_gpu.py, test_kernels_w8a8.py, test_kernels_fused.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Constexprs whose wrapper value depends on the tensors' device: the values a CUDA launch passes.
ON_GPU = {"DOT_F32": False, "CUDA_EXP": True, "USE_ASM": True}
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KiB)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
}


def record_launches(calls: Callable[[], None]) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    """(JITFunction, bound arguments by name, launch options) of every launch calls() makes."""
    from triton.runtime.jit import JITFunction

    seen: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []
    real = JITFunction.run

    def fake_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        opts = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args, strict=False))
        bound.update(kwargs)
        seen.append((self, bound, opts))

    JITFunction.run = fake_run  # type: ignore[method-assign]
    try:
        calls()
    finally:
        JITFunction.run = real  # type: ignore[method-assign]
    return seen


def _arg_type(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if abs(v) >= 2**31 else "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


def compile_sm90(fn: Any, bound: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Compile one recorded launch for cuda:90; its name, constexprs, registers and shared bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bound = {p.name: bound.get(p.name, p.default) for p in fn.params}
    const = {p.name: ON_GPU.get(p.name, bound[p.name]) for p in fn.params if p.is_constexpr}
    sig = {p.name: "constexpr" if p.is_constexpr else _arg_type(bound[p.name]) for p in fn.params}
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const),
        target=GPUTarget("cuda", 90, 32),
        options=opts,
    )
    return {
        "kernel": fn.__name__,
        "constexprs": {n: v for n, v in const.items()},
        "options": opts,
        "shared_bytes": int(k.metadata.shared),
        **resource_usage(k.asm["cubin"]),
        "compile_s": round(time.perf_counter() - t0, 2),
    }


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack bytes (spills live there) of a cubin, by Triton's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        res = subprocess.run([str(tool), "-res-usage", str(f)], capture_output=True, text=True)
    fields = dict(re.findall(r"(REG|STACK):(\d+)", res.stdout))
    return {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1))}


ACT_DTYPES = [torch.float16, torch.bfloat16]


def _w8a16_group_calls() -> None:
    from quantlab.kernels import triton_w8a16_group as G

    n, k, g = 256, 1024, 128
    for dtype in ACT_DTYPES:
        q = torch.zeros(n, k, dtype=torch.int8)
        s = torch.ones(n, k // g, dtype=dtype)
        z = torch.zeros(n, k // g, dtype=torch.int8)
        b = torch.zeros(n, dtype=dtype)
        for m in (1, 4, 16, 64, 256):
            x = torch.zeros(m, k, dtype=dtype)
            for p in G.candidates(m, g, "auto"):
                if p.backend != "dequant":
                    G.run_plan(p, x, q, s, z, g, b)
                    G.run_plan(p, x, q, s, None, g, None)


def _w8a8_calls() -> None:
    from quantlab.kernels import triton_w8a8 as W

    n, k = 256, 1024
    for dtype in ACT_DTYPES:
        q = torch.zeros(n, k, dtype=torch.int8)
        sw = torch.ones(n)
        b = torch.zeros(n, dtype=dtype)
        for m in (1, 4, 16, 64, 256):
            x = torch.zeros(m, k, dtype=dtype)
            W.quantize_int8(x, torch.ones(1), torch.ones(k, dtype=dtype))
            W.quantize_int8(x, None, None)
            xq = torch.zeros(m, k, dtype=torch.int8)
            for p in W.candidates(m):
                W.run_plan(p, xq, torch.ones(m, 1), q, sw, b, dtype)
                W.run_plan(p, xq, torch.ones(1, 1), q, torch.ones(1), None, dtype)


def _fused_calls() -> None:
    from quantlab.kernels import fused_ops as F

    t, nq, nkv, d = 4, 32, 8, 128
    hidden = nq * d
    for dtype in ACT_DTYPES:
        x = torch.zeros(t, hidden, dtype=dtype)
        w = torch.ones(hidden, dtype=dtype)
        F.rms_norm(x, w, 1e-6, x.clone())
        for storage in ("int8", "fp8"):
            F.rms_norm_quant(x, w, 1e-6, x.clone(), torch.ones(1), storage)
            F.rms_norm_quant(x, w, 1e-6, None, torch.ones(1), storage)
        qkv = torch.zeros(t, (nq + 2 * nkv) * d, dtype=dtype)
        cos = torch.zeros(t, d, dtype=dtype)
        F.rope_qk_(qkv, cos, cos, nq, nkv, d)
        F.silu_mul(torch.zeros(t, 2 * 11008, dtype=dtype))
        slots = torch.arange(t)
        for storage, pdt in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn), ("fp16", dtype)):
            pools = [torch.zeros(4, 16, nkv, d, dtype=pdt) for _ in range(2)]
            k = qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d)
            F.kv_write(k, k, slots, *pools, storage, 1.0)
            F.rope_kv_write_(qkv, cos, cos, nq, nkv, d, slots, *pools, storage, 1.0)


def _attention_calls() -> None:
    from quantlab.kernels.paged_attention import paged_decode_attention
    from quantlab.kernels.paged_prefill import paged_prefill_attention

    h, hkv, d, bs = 32, 8, 128, 64
    i32 = torch.ones(2, dtype=torch.int32)
    for dtype in [*ACT_DTYPES, torch.float32]:  # fp32 engines: the "ieee" dot
        qd = torch.zeros(2, h, d, dtype=dtype)
        for pdt in (torch.int8, dtype):
            pool = torch.zeros(4, bs, hkv, d, dtype=pdt)
            tab = torch.ones(2, 2, dtype=torch.int32)
            for splits in (1, 3):
                paged_decode_attention(qd, pool, pool, tab, i32, 1.0, 0.1, splits, "triton")
        q = torch.zeros(8, h, d, dtype=dtype)
        for pdt in (torch.int8, torch.float8_e4m3fn, dtype):
            pool = torch.zeros(4, bs, hkv, d, dtype=pdt)
            tabs = (torch.ones(2, 2, dtype=torch.int32), i32, i32, i32)
            paged_prefill_attention(q, pool, pool, *tabs, 1.0, 0.1, 4, backend="triton")


GROUPS = {
    "w8a16_group": _w8a16_group_calls,
    "w8a8": _w8a8_calls,
    "fused": _fused_calls,
    "attention": _attention_calls,
}


def main() -> int:
    """Record, compile, print one line per distinct launch; 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated of " + ",".join(GROUPS))
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--dtypes", default="fp16,bf16", help="activation dtypes: fp16,bf16")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_compile: unset TRITON_INTERPRET (the interpreter never compiles)")
        return 2
    ACT_DTYPES[:] = [
        {"fp16": torch.float16, "bf16": torch.bfloat16}[d] for d in args.dtypes.split(",")
    ]
    rows, failures = [], 0
    for group in [g for g in args.only.split(",") if g] or list(GROUPS):
        launches = record_launches(GROUPS[group])
        done: set[str] = set()
        for fn, bound, opts in launches:
            row_key = json.dumps(
                [fn.__name__, {p.name: repr(ON_GPU.get(p.name, bound.get(p.name)))
                               for p in fn.params if p.is_constexpr},
                 {p.name: _arg_type(bound.get(p.name, p.default)) for p in fn.params
                  if not p.is_constexpr},
                 opts], sort_keys=True)  # fmt: skip
            if row_key in done:
                continue
            done.add(row_key)
            try:
                row = compile_sm90(fn, bound, opts)
                ok = row["shared_bytes"] <= SM90_MAX_SHARED
                row["status"] = "ok" if ok else "too much shared memory"
            except Exception as err:  # every compile error is reported, not raised
                row = {"kernel": fn.__name__, "status": f"error: {str(err)[-600:]}"}
                ok = False
            failures += not ok
            rows.append({"group": group, **row})
            print(json.dumps(rows[-1], default=str), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    spills = [r for r in rows if r.get("stack_bytes", 0) > 512]
    for r in spills:  # not a failure: a performance note (stack holds register spills)
        print(f"note: {r['kernel']} {r['constexprs']} {r['options']}: {r['stack_bytes']} B stack")
    print(f"sm90_compile: {len(rows)} launches compiled for sm_90, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

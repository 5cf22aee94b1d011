"""GPU: the AOT W4A16 plugin kernel (plugins/*.cubin launched through the driver API) against
cuBLAS fp16 (the unquantized engine's linear), timed as CUDA graph replays, and quantlab's tuned `linear_w4a16`, on Llama-2-7B /
Llama-3-8B linear shapes with random weights, M = 1, 16, 128. Prints a table; --out writes JSON.

    python benchmarks/aot_plugin_gpu.py [--prebuilt DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from quantlab.kernels import linear_w4a16, packing
from triton.testing import do_bench_cudagraph

from quantlab.deploy.aot import pick, write_w4a16_kernels
from quantlab.deploy.aot_launch import launch_w4a16
from quantlab.deploy.tensorrt import local_sm

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]  # (N, K)


def _us(fn: Callable[[], object]) -> float:
    """Median microseconds of fn replayed from a CUDA graph (no Python launch cost)."""
    return float(do_bench_cudagraph(fn, return_mode="median")) * 1e3


def main() -> None:
    """Check each launch against the tuned kernel, then time the three paths (median, us)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--prebuilt", default=None, help="engine folder with plugins/ built elsewhere")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sm, g, dt = local_sm(), 128, torch.float16
    assert sm is not None
    if args.prebuilt:
        folder = Path(args.prebuilt)
        recs = json.loads((folder / "plugins" / "kernels.json").read_text())["kernels"]
    else:
        folder = Path(tempfile.mkdtemp())
        recs = write_w4a16_kernels(folder, {(g, False)}, "float16", sm)
    rows = []
    print(
        f"{'N x K':>12} {'M':>4} {'cublas_fp16':>12} {'w4_tuned':>9} {'w4_aot':>8} {'aot/cublas':>10}"
    )
    for n, k in SHAPES:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        scale = (torch.rand(n, k // g, device="cuda") * 0.02 + 0.005).to(dt)
        qw, s, _ = packing.w4_from_codes(codes, scale)
        w = torch.randn(n, k, device="cuda", dtype=dt)
        for m in (1, 16, 128):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            rec = pick(recs, g, False, m)
            y = launch_w4a16(folder / "plugins", rec, x, qw, s, None)
            ref = linear_w4a16(x, qw, s, None, g)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            assert err < 2e-3, (n, k, m, err)
            t_cublas = _us(partial(torch.matmul, x, w.t()))
            t_tuned = _us(partial(linear_w4a16, x, qw, s, None, g))
            t_aot = _us(partial(launch_w4a16, folder / "plugins", rec, x, qw, s, None))
            rows.append(
                {"n": n, "k": k, "m": m, "tiling": rec["tiling"], "cublas_fp16_us": t_cublas,
                 "w4_tuned_us": t_tuned, "w4_aot_us": t_aot, "rel_err_vs_tuned": err}
            )  # fmt: skip
            print(
                f"{n:>6}x{k:<5} {m:>4} {t_cublas:>12.1f} {t_tuned:>9.1f} {t_aot:>8.1f} "
                f"{t_cublas / t_aot:>9.2f}x"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows})
        )


if __name__ == "__main__":
    main()

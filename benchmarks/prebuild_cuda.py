"""Prebuild the CUDA kernel libraries for Hopper (sm_90 / sm_90a) on a machine without a GPU.

The device machine compiles cuda_mma (54 s) and cutlass_w4 (258 s) on first use; a library
already in QUANTLAB_CUDA_CACHE whose name (a hash of source + flags + arch) matches is loaded as
is. Build them here once, then carry the folder:

    QUANTLAB_CUDA_CACHE=$PWD/.cuda_prebuilt python benchmarks/prebuild_cuda.py
    # device call: carry [".cuda_prebuilt"], export QUANTLAB_CUDA_CACHE=$PWD/.cuda_prebuilt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from quantlab.kernels import cuda_gemv, cuda_mma, cutlass_w4, cutlass_w8


def main() -> int:
    """Build each library for sm_90 / sm_90a; print its path, size and build time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated: cuda_gemv,cuda_mma,cutlass_w4,w8")
    args = ap.parse_args()
    if not os.environ.get("QUANTLAB_CUDA_CACHE"):
        print("set QUANTLAB_CUDA_CACHE to the folder to fill (it travels with carry)")
        return 2
    builders = {
        "cuda_gemv": lambda: cuda_gemv.build(arch="90"),
        "cuda_mma": lambda: cuda_mma.build(arch="90"),
        "cutlass_w4": cutlass_w4.build,
        "cutlass_w8": cutlass_w8.build,
    }
    pick = [p for p in args.only.split(",") if p] or list(builders)
    for name in pick:
        t0 = time.time()
        path = builders[name]()
        mb = path.stat().st_size / 2**20
        print(f"{name}: {path} ({mb:.1f} MiB, {time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Nsight Compute view of chosen W4/W8 kernels on the GPU machine (H100), one call each.

Run under ncu, which profiles only the calls between cudaProfilerStart/Stop:

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        python3 scripts/profile_kernels.py W4H:28672x8192:16 W4H:4096x4096:1 W8:14336x4096:1

Each argument is PATH:NxK:M with PATH one of W4H (W4 g128 sym bf16, Hopper layout, "auto"),
W8 (W8A16 per-channel, "auto"). "auto" is tuned (and warmed up) outside the profiled range, so
ncu sees exactly the kernel(s) auto picked for that key, and the script prints the plan.
Weights are random, as in the benchmark.
"""

from __future__ import annotations

import sys

import torch
from quantlab.kernels import cutlass_w4, linear_w4a16, linear_w8a16, packing
from quantlab.kernels.bench import make_w4, make_w8


def _case(spec: str) -> None:
    """Warm up and tune one PATH:NxK:M case, then run it once inside the profiled range."""
    path, shape, m_s = spec.split(":")
    n, k = (int(v) for v in shape.split("x"))
    m = int(m_s)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if path == "W4H":
        w = make_w4(n, k, 128, False, torch.bfloat16, "cuda")
        qw, s = packing.to_wgmma_layout(w["qweight"]), w["scales"].t().contiguous().t()

        def call() -> torch.Tensor:
            return linear_w4a16(x, qw, s, None, 128)

        for _ in range(3):
            call()
        picked = [str(v) for k_, v in cutlass_w4.HOPPER_TUNER.cache.items() if k_[1:3] == (n, k)]
    elif path == "W8":
        w8 = make_w8(n, k, torch.bfloat16, "cuda")

        def call() -> torch.Tensor:
            return linear_w8a16(x, w8["qweight"], w8["scales"])

        for _ in range(3):
            call()
        from quantlab.kernels import triton_w8a16

        picked = [str(v) for k_, v in triton_w8a16.TUNER.cache.items() if k_[1:3] == (n, k)]
    else:
        raise SystemExit(f"unknown path {path!r} in {spec!r}: use W4H or W8")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"== {spec}: auto's plans for this shape: {picked}", flush=True)


def main(argv: list[str]) -> int:
    """Profile each PATH:NxK:M argument in turn."""
    if not argv:
        print(__doc__)
        return 2
    for spec in argv:
        _case(spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

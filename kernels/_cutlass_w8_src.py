"""The generated config table + C++ source (kernels/cuda/cutlass_w8.cu) of the sm_90a W8A16 GEMM on CUTLASS (cutlass_w8.py builds it with nvcc).

CONFIGS is the one table of compiled configurations (the C++ switch is generated from it).
tile_n: weight rows per CTA tile (the wgmma M side), tile_m: activation rows (the wgmma N side);
sched as in _cutlass_w4_src.py. The tilings are the three that won somewhere for W4 (run 16).
"""

from __future__ import annotations

from typing import Any

from quantlab.kernels.cuda_gemv import cuda_source

_TILINGS = ((128, 64, "streamk"), (128, 128, "streamk"), (128, 256, "persistent"))
CONFIGS: list[dict[str, Any]] = [
    {"id": i, "dtype": dt, "tile_n": tn, "tile_m": tm, "sched": sc}
    for i, (dt, (tn, tm, sc)) in enumerate((dt, t) for dt in ("bf16", "f16") for t in _TILINGS)
]
_SCHED = {"persistent": "Persist", "streamk": "StreamK"}
_TABLE = "#define QL_W8_CONFIGS(X) " + " ".join(
    f"X({c['id']}, {c['dtype']}, {c['tile_n']}, {c['tile_m']}, {_SCHED[c['sched']]})"
    for c in CONFIGS
)


SOURCE = cuda_source("cutlass_w8.cu").replace(
    "// @QL_W8_CONFIGS@ (replaced by the generated #define when the library is built)", _TABLE
)

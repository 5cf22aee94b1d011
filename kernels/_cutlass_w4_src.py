"""The generated config table + C++ source (kernels/cuda/cutlass_w4.cu) of the sm_90a W4A16 GEMM on CUTLASS (cutlass_w4.py builds it with nvcc).

CONFIGS is the one table of compiled configurations: the C++ switch is generated from it, so the
Python plans and the library cannot disagree. tile_n: weight rows per CTA tile (the wgmma M side),
tile_m: activation rows (the wgmma N side); sched: "persistent" (one tile per CTA at a time, CTAs
loop over tiles), "streamk" (K split across CTAs to fill the GPU when tiles are few; both with
the two consumer warpgroups sharing one tile) or "pingpong" (each consumer warpgroup owns a tile
of tile_n weight rows, one's main loop overlapping the other's epilogue); cluster:
CTAs per cluster along the weight rows (2: the x tile is loaded once per cluster and multicast
to both CTAs); tile_k: k per main-loop step (64 or 128; the group size must be a multiple).
Runs 16 and 28-29 (docs/kernels.md) picked the tilings from probes on the six benchmark shapes.
"""

from __future__ import annotations

from typing import Any

from quantlab.kernels.cuda_gemv import cuda_source

# (dtype, zero points) -> (tile_n, tile_m, sched[, cluster, tile_k]). bf16 sym (the benchmark's
# mode) keeps every tiling that won or came within 2 % on some shape and M in the probes of runs
# 28-29 (25 tilings timed, docs/kernels.md); the other three modes get five of them, one or two
# per activation tile (compile time grows with every entry; unprobed there).
_BF16_SYM = (
    (128, 64, "streamk"),
    (128, 64, "streamk", 2, 64),
    (128, 64, "streamk", 1, 128),
    (128, 64, "streamk", 2, 128),
    (256, 64, "streamk", 2, 64),
    (256, 64, "streamk", 1, 128),
    (128, 128, "streamk"),
    (128, 128, "streamk", 2, 64),
    (128, 128, "streamk", 1, 128),
    (256, 128, "streamk"),
    (256, 128, "streamk", 2, 64),
    (256, 128, "streamk", 1, 128),
    (128, 256, "persistent"),
    (128, 256, "persistent", 2, 64),
    (128, 256, "streamk"),
    (128, 256, "streamk", 2, 64),
)
_OTHER = (
    (128, 64, "streamk"),
    (128, 64, "streamk", 1, 128),
    (128, 128, "streamk", 2, 64),
    (128, 256, "persistent"),
    (128, 256, "streamk", 2, 64),
)
_TILINGS: dict[tuple[str, bool], tuple[tuple[Any, ...], ...]] = {
    ("bf16", False): _BF16_SYM,
    ("bf16", True): _OTHER,
    ("f16", False): _OTHER,
    ("f16", True): _OTHER,
}


def _config(i: int, dt: str, z: bool, tiling: tuple[Any, ...]) -> dict[str, Any]:
    tn, tm, sc, cl, tk = (*tiling, 1, 64) if len(tiling) == 3 else tiling
    return {"id": i, "dtype": dt, "zero": z, "tile_n": tn, "tile_m": tm, "sched": sc,
            "cluster": cl, "tile_k": tk}  # fmt: skip


CONFIGS: list[dict[str, Any]] = [
    _config(i, dt, z, tiling)
    for i, ((dt, z), tiling) in enumerate(
        (mode, tiling) for mode, tilings in _TILINGS.items() for tiling in tilings
    )
]

# sched -> (kernel schedule, epilogue schedule, tile scheduler) of the C++ template
_SCHED = {
    "persistent": "Coop, CoopEpi, Persist",
    "streamk": "Coop, CoopEpi, StreamK",
    "pingpong": "Ping, PingEpi, Persist",
}
_TABLE = "#define QL_W4_CONFIGS(X) " + " ".join(
    f"X({c['id']}, {c['dtype']}, {str(c['zero']).lower()}, {c['tile_n']}, {c['tile_m']}, "
    f"{_SCHED[c['sched']]}, {c['cluster']}, {c['tile_k']})"
    for c in CONFIGS
)


SOURCE = cuda_source("cutlass_w4.cu").replace(
    "// @QL_W4_CONFIGS@ (replaced by the generated #define when the library is built)", _TABLE
)

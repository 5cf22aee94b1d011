"""W4A16 and W8A16 tensor-core GEMMs in CUDA C++ for small and medium M ("cuda_mma"): build,
plans, launch.

The kernel (source in cuda/cuda_mma.cu) reads the checkpoint layout (int8 [N/2, K], G = 64
or 128), the kernel-native layout (packing.to_mma_layout, int32 [ceil(N/16), K/64, 128], G = 32,
64 or 128) or the Hopper layout (packing.to_wgmma_layout, uint8 [N, K/2], N % 16 == 0, G = 32,
64 or 128; MT <= 4 plans: the layout that cutlass_w4 reads for larger M), streams each warp's weights through a shared-memory ring with cp.async,
turns nibbles into fp16/bf16 with one LOP3 per pair (no subtract: each group's fp32 sum is
corrected by (base + z) * sum(x), sum(x) from one extra mma with an all-ones A per k-step) and
runs mma.m16n8k16 with the activations as the 8-column operand (MT such operands per block,
grid.y walks M). Scales must be in x's dtype, in either storage order ([N, K/G] row-major or
N-major).

The library is built by nvcc on first use like cuda_gemv's (same cache folder; importing this
module compiles nothing) and launched through ctypes on torch's current stream.

Plans: MT (8-row activation tiles per block: 1, 2, 4, 8), RT (16-row weight tiles per warp),
ST (ring depth in 64-k units), KS (warps per block), WN (warp columns on different tiles; the
KS / WN warps of a column split K).

W8A16 (w8_candidates / run_w8_plan; the same library): int8 weights [N, K] as the checkpoint
stores them, per-channel scales (fp32 or x's dtype). Each lane copies 16 bytes of two weight rows
and 32 bytes of its activation row per 64-k unit into its warp's ring and reads back only those;
int8 becomes an exact integer in x's dtype (fp16: one PRMT + one subtract per pair; bf16 through
fp32), sums are fp32 and the scale is applied once per output. MT 1, 2, 4; KS == WN plans stream
the whole K per warp.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch
from quantlab.kernels import packing
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan
from quantlab.kernels.cuda_gemv import build_library, can_load, cuda_source

STEM = "w4a16_mma"
SOURCE = cuda_source("cuda_mma.cu")
# (MT, RT, ST) compiled in (QL_MMA_TILES in the source) and the (KS, WN) launch values offered
# for each (KS = warps per block, WN = warp columns side by side on tiles; KS / WN warps split K).
TILES: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {
    (1, 1, 4): ((4, 1), (8, 1), (16, 1), (8, 2)),
    (1, 2, 4): ((4, 1), (8, 1), (16, 1)),
    (1, 4, 4): ((4, 1), (8, 1)),
    (1, 1, 8): ((4, 1), (8, 1), (16, 1), (8, 2)),
    (1, 2, 8): ((4, 1), (8, 1), (8, 2)),
    (2, 1, 4): ((4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (8, 4), (16, 4)),
    (2, 2, 4): ((4, 1), (8, 1), (4, 2), (8, 2), (8, 4)),
    (2, 1, 8): ((4, 1), (8, 1), (8, 2), (8, 4)),
    (2, 2, 8): ((4, 1), (8, 2), (8, 4)),
    # RT * MT >= 8 ("big" tiles, <= 8 warps): 64 weight rows per warp at M = 16, where the Hopper
    # layout's ring then carries as many weight bytes as x bytes (x rows are not shared by warps;
    # RT = 2 carries half as many), and 32 at M = 32
    (2, 4, 4): ((4, 1), (8, 1), (8, 2)),
    (4, 2, 4): ((4, 1), (8, 1), (8, 2)),
    (4, 1, 4): ((4, 1), (8, 1), (4, 2), (8, 2), (8, 4), (16, 8)),
    (4, 1, 8): ((4, 1), (8, 2), (8, 4)),
    # MT = 8 ("scaled" mode, <= 8 warps: up to 255 registers): exact integers times the scale in
    # x's dtype, accumulated straight into fp32
    (8, 1, 4): ((4, 1), (8, 2), (8, 4), (8, 8)),
    (8, 1, 8): ((4, 1), (8, 4)),
    (8, 2, 4): ((4, 1), (8, 4)),
}
# Shared memory a block may opt into on sm_90 (227 KiB); on the Hopper layout the ring also holds
# x (KS * ST * (RT * 512 + MT * 1024) bytes), so larger plans are not offered there.
SMEM_LIMIT = 227 * 1024
NATIVE_GROUPS = (32, 64, 128)  # kernel-native and Hopper layouts
CHECKPOINT_GROUPS = (64, 128)

TUNER = Tuner("w4a16_cuda_mma")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: str | None = None


def build(device: torch.device | None = None, verbose: bool = False, arch: str | None = None):
    """Compile the library for device's compute capability, or for arch (e.g. "90", no GPU
    needed), into the cache; returns its path."""
    return build_library(SOURCE, STEM, device, verbose, arch=arch)


def _load(device: torch.device) -> ctypes.CDLL:
    global _lib, _build_error
    with _lock:
        if _lib is not None:
            return _lib
        if _build_error is not None:
            raise RuntimeError(_build_error)
        try:
            lib = ctypes.CDLL(str(build(device)))
        except (RuntimeError, OSError) as err:
            _build_error = str(err)
            raise
        lib.ql_w4_mma.restype = ctypes.c_int
        # device, 6 pointers (x, qweight, scales, zeros, bias, out), 15 ints, stream
        lib.ql_w4_mma.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 6,
            *[ctypes.c_int] * 15,
            ctypes.c_void_p,
        ]
        lib.ql_w4_native_dequant.restype = ctypes.c_int
        # device, 4 pointers (qweight, scales, zeros, w), 7 ints, stream
        lib.ql_w4_native_dequant.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 4,
            *[ctypes.c_int] * 7,
            ctypes.c_void_p,
        ]
        lib.ql_w8_mma.restype = ctypes.c_int
        # device, 5 pointers (x, qweight, scales, bias, out), 10 ints, stream
        lib.ql_w8_mma.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 5,
            *[ctypes.c_int] * 10,
            ctypes.c_void_p,
        ]
        lib.ql_mma_error_string.restype = ctypes.c_char_p
        lib.ql_mma_error_string.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


def available(device: torch.device) -> bool:
    """True if the library is (or can now be) built and loaded; never builds under capture."""
    if _lib is not None:
        return True
    # bf16 mma and cp.async need sm_80
    return torch.cuda.get_device_capability(device) >= (8, 0) and can_load(
        _build_error, lambda: _load(device)
    )


def unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    check_x_layout: bool = True,
) -> str | None:
    """Why the cuda_mma kernel cannot take these arguments (x [M, K] or [..., K]), else None.

    Pure Python (no build). check_x_layout=False skips the data-pointer alignment checks and x's
    contiguity (what torch.compile cannot trace; the op checks them again at run time).
    """
    checkpoint = layout_id(qweight) == 0
    k = x.shape[-1]
    if not x.is_cuda:
        return "needs CUDA tensors"
    groups = CHECKPOINT_GROUPS if checkpoint else NATIVE_GROUPS
    if group_size not in groups:
        return f"group size must be one of {groups} for this layout, got {group_size}"
    if k % 64:
        return f"K must be a multiple of 64, got {k}"
    if packing.is_wgmma_layout(qweight) and scales.shape[0] % 16:
        return f"the Hopper layout needs N % 16 == 0, got N={scales.shape[0]}"
    if scales.dtype != x.dtype:
        return f"scales must be in x's dtype {x.dtype}, got {scales.dtype}"
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return "bias must be contiguous in x's dtype"
    if not qweight.is_contiguous() or (check_x_layout and qweight.data_ptr() % 16):
        return "qweight must be contiguous and 16-byte aligned"
    if 1 not in scales.stride():
        return "scales need unit stride along N or along groups"
    if zeros is not None and zeros.stride(-1) != 1:
        return "zeros need unit stride along groups"
    if check_x_layout and (x.data_ptr() % 16 or not x.is_contiguous()):
        return "x must be contiguous and 16-byte aligned"
    if k * 2 > 2**31 or qweight.numel() * qweight.element_size() >= 2**40:
        return "shape too large"
    return None


def layout_id(qweight: torch.Tensor) -> int:
    """The kernel's layout code: 0 checkpoint, 1 kernel-native, 2 Hopper."""
    if packing.is_wgmma_layout(qweight):
        return 2
    return int(packing.is_mma_layout(qweight))


def candidates(m: int, hopper: bool = False, sym: bool = False) -> list[Plan]:
    """Plans for M rows: the smallest MT whose 8*MT rows cover M (MT 4 and 8 past 32 rows; the
    grid walks M in blocks of 8*MT rows; the Hopper layout stops at MT 4). sym (no zero points)
    adds each MT < 8 plan's SZ=1 twin, which subtracts the offset in registers instead of
    correcting each group's sum with sum(x)."""
    return list(_candidates(m_bucket(m), hopper, sym))


@functools.lru_cache(maxsize=256)
def _candidates(b: int, hopper: bool, sym: bool) -> tuple[Plan, ...]:
    """candidates() per M bucket, built once (the engine's eager steps ask on every linear)."""
    mts = (1,) if b <= 8 else (2,) if b <= 16 else (4,) if b <= 32 or hopper else (4, 8)
    base = [
        plan("cuda_mma", MT=t[0], RT=t[1], ST=t[2], KS=ks, WN=wn)
        for t, launches in TILES.items()
        if t[0] in mts
        for ks, wn in launches
        if not hopper or ks * t[2] * (t[1] * 512 + t[0] * 1024) <= SMEM_LIMIT
    ]
    if not sym:
        return tuple(base)
    return (*base, *(plan("cuda_mma", **dict(p.cfg), SZ=1) for p in base if p.get("MT") < 8))


def run_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Launch one plan: x [M, K] fp16/bf16 -> out [M, N] in x's dtype (any of the three layouts).

    scales [N, K/G] in x's dtype (row-major or N-major); zeros uint8 [N, K/G] or None; bias [N] in x's dtype or None.
    fill poisons the output first (tests pass NaN).
    """
    m, k = x.shape
    n = scales.shape[0]
    lib = _load(x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if fill is not None:
        out.fill_(fill)
    cfg = dict(p.cfg)
    err = lib.ql_w4_mma(
        x.device.index if x.device.index is not None else torch.cuda.current_device(),
        x.data_ptr(),
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else None,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        m,
        n,
        k,
        group_size,
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0) if zeros is not None else 0,
        0 if x.dtype == torch.float16 else 1,
        cfg["WN"],
        layout_id(qweight),
        cfg["MT"],
        cfg["RT"],
        cfg["ST"],
        cfg["KS"],
        cfg.get("SZ", 0),
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"cuda_mma launch failed: {lib.ql_mma_error_string(err).decode()}")
    return out


def dequant_native(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
    fill: float | None = None,
) -> torch.Tensor:
    """Native layout -> dense w [N, K] in dtype (fp16/bf16); scales in dtype or fp32."""
    n = scales.shape[0]
    k = qweight.shape[1] * 64
    scales = (
        scales if scales.stride(-1) == 1 else scales.contiguous()
    )  # the kernel: unit group stride
    lib = _load(qweight.device)
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if fill is not None:
        w.fill_(fill)
    err = lib.ql_w4_native_dequant(
        qweight.device.index if qweight.device.index is not None else torch.cuda.current_device(),
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else None,
        w.data_ptr(),
        n,
        k,
        group_size,
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        0 if dtype == torch.float16 else 1,
        int(scales.dtype == torch.float32),
        torch.cuda.current_stream(qweight.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"native dequant failed: {lib.ql_mma_error_string(err).decode()}")
    return w


def _key(x, qweight, scales, zeros, group_size, bias, what: str) -> tuple:
    return (
        m_bucket(x.shape[0]),
        scales.shape[0],
        x.shape[1],
        group_size,
        x.dtype,
        scales.dtype,
        zeros is not None,
        bias is not None,
        layout_id(qweight),
        what,
    )


def w4a16_mma_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Forced backend "cuda_mma": x [M, K] -> [M, N], tuned among the kernel's plans."""
    reason = unsupported_reason(x, qweight, scales, zeros, group_size, bias)
    if reason is not None:
        raise ValueError(f"cuda_mma: {reason}")
    chosen = TUNER.pick(
        _key(x, qweight, scales, zeros, group_size, bias, "forced"),
        candidates(x.shape[0], packing.is_wgmma_layout(qweight), zeros is None),
        lambda c: run_plan(c, x, qweight, scales, zeros, group_size, bias),
    )
    return run_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)


def run_native_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """One plan of the native-layout auto path: a cuda_mma plan, or dequantize + cuBLAS."""
    if p.backend == "cuda_dequant":
        w = dequant_native(qweight, scales, zeros, group_size, x.dtype)
        y = torch.nn.functional.linear(x, w, bias)
        return y
    return run_plan(p, x, qweight, scales, zeros, group_size, bias, fill)


def w4a16_native_auto(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """backend "auto" on the native layout (CUDA): cuda_mma plans and dequantize + cuBLAS, tuned
    per (M bucket, N, K, group, dtypes, zeros, bias). Arguments the kernel refuses (fp32 scales,
    say) take dequantize + cuBLAS alone."""
    cands: list[Plan] = [plan("cuda_dequant")]
    ok = unsupported_reason(x, qweight, scales, zeros, group_size, bias) is None
    if ok and x.shape[0] <= 256:
        cands = candidates(x.shape[0], sym=zeros is None) + cands
    chosen = TUNER.pick(
        _key(x, qweight, scales, zeros, group_size, bias, f"auto{ok}"),
        cands,
        lambda c: run_native_plan(c, x, qweight, scales, zeros, group_size, bias),
    )
    return run_native_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)


# ---- W8A16 (int8 [N, K], per-channel scales) ----------------------------------------------------

# (MT, RT, ST) compiled in (QL_W8_TILES in the source) and the (KS, WN) launches offered for each;
# a block's ring holds KS * ST * (RT + MT) KiB (weights and x), so plans above SMEM_LIMIT are not
# offered.
W8_TILES: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {
    # KS == WN: every warp streams the whole K of its own tiles (no split, no partials to add)
    (1, 1, 4): ((4, 1), (8, 1), (16, 1), (8, 2), (4, 4), (8, 8)),
    (1, 2, 4): ((4, 1), (8, 1), (16, 1)),
    (1, 1, 8): ((1, 1), (2, 1), (4, 1), (8, 1), (8, 2), (2, 2), (4, 4), (8, 8)),
    (1, 2, 8): ((1, 1), (4, 1), (8, 1), (4, 4)),
    (1, 1, 16): ((1, 1), (4, 1), (2, 2), (4, 4)),
    (1, 2, 16): ((1, 1), (2, 2), (4, 4)),
    (2, 1, 4): ((4, 1), (8, 1), (16, 1), (8, 2)),
    (2, 2, 4): ((4, 1), (8, 1), (8, 2)),
    (2, 1, 8): ((1, 1), (4, 1), (8, 1), (4, 4), (8, 8)),
    (2, 1, 16): ((1, 1), (2, 2), (4, 4)),
    (4, 1, 4): ((4, 1), (8, 1), (8, 2)),
    (4, 1, 8): ((1, 1), (4, 1), (8, 1), (4, 4)),
}
W8_MAX_M = 32  # "auto" on W8A16 tries these plans up to this M bucket


def w8_candidates(m: int) -> list[Plan]:
    """W8A16 plans for M rows: the smallest MT (1, 2, 4) whose 8*MT rows cover M (grid walks M)."""
    b = m_bucket(m)
    mt = 1 if b <= 8 else 2 if b <= 16 else 4
    return [
        plan("cuda_mma", MT=t[0], RT=t[1], ST=t[2], KS=ks, WN=wn)
        for t, launches in W8_TILES.items()
        if t[0] == mt
        for ks, wn in launches
        if ks * t[2] * (t[1] + t[0]) * 1024 <= SMEM_LIMIT
    ]


def w8_unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    check_x_layout: bool = True,
) -> str | None:
    """Why the W8A16 kernel cannot take x [M, K], qweight int8 [N, K], scales [N], bias; else None.

    check_x_layout=False skips the data-pointer alignment checks and x's contiguity (see
    unsupported_reason)."""
    k = x.shape[-1]
    if not x.is_cuda:
        return "needs CUDA tensors"
    if k % 64:
        return f"K must be a multiple of 64, got {k}"
    if scales.dtype not in (x.dtype, torch.float32) or not scales.is_contiguous():
        return f"scales must be contiguous fp32 or in x's dtype {x.dtype}, got {scales.dtype}"
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return "bias must be contiguous in x's dtype"
    if not qweight.is_contiguous() or (check_x_layout and qweight.data_ptr() % 16):
        return "qweight must be contiguous and 16-byte aligned"
    if check_x_layout and (x.data_ptr() % 16 or not x.is_contiguous()):
        return "x must be contiguous and 16-byte aligned"
    if qweight.numel() >= 2**40:
        return "shape too large"
    return None


def run_w8_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Launch one W8A16 plan: x [M, K] fp16/bf16 @ (qweight int8 [N, K] * scales [N])^T -> [M, N].

    scales fp32 or x's dtype; bias [N] in x's dtype or None; fill poisons the output first.
    """
    m, k = x.shape
    n = qweight.shape[0]
    lib = _load(x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if fill is not None:
        out.fill_(fill)
    cfg = dict(p.cfg)
    err = lib.ql_w8_mma(
        x.device.index if x.device.index is not None else torch.cuda.current_device(),
        x.data_ptr(),
        qweight.data_ptr(),
        scales.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        m,
        n,
        k,
        0 if x.dtype == torch.float16 else 1,
        int(scales.dtype == torch.float32),
        cfg["WN"],
        cfg["MT"],
        cfg["RT"],
        cfg["ST"],
        cfg["KS"],
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"cuda_mma W8 launch failed: {lib.ql_mma_error_string(err).decode()}")
    return out

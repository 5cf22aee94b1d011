"""Triton W4A16 GEMMs reading the TensorRT-LLM checkpoint int4 layout directly.

The checkpoint layout packs output rows 2j (low nibble) and 2j+1 (high nibble) into byte row j of
int8 [N // 2, K], so a [BN // 2, BK] byte tile is two dense [BN // 2, BK] int4 tiles: one for the
even outputs, one for the odd ones. Each kernel runs two dots (or two reductions) and interleaves
the results on store, so the exporter's layout is the kernel's layout (identity permutation) and
no repacking step exists.

Group scales apply after the dot: every K tile lies inside one group (BK <= G, G % BK == 0), so
y += (x @ q^T) * s[n, g] with q exact small integers in the activation dtype; this is one fp32
multiply per output per tile instead of one per weight. Zero points are subtracted in int8 first.

Backends (plans, see _tune.Plan):
  gemv    M <= 4: no tensor cores; broadcast-multiply and reduce over K (forced only: slower).
  halves  small M: the two-dot kernel below, split-K fp32 partials and a reduce launch.
  splitk  small M: one dot per tile (_w4a16_rows_kernel), BM = 16..64, split-K fp32 partials.
  tiled   larger M: the one-dot kernel with 64/128-row tiles, grouped program order.
  dequant very large M: dequantize to a [N, K] workspace in x's dtype, then cuBLAS.
  cuda_gemv  M <= 8 on CUDA: the nvcc-built kernel of cuda_gemv.py; "auto" times its plans
          against the Triton ones under the same tuning key (w4a16_gemm).
  cuda_mma   M <= 64 on CUDA (G = 64, 128, scales in x's dtype): the nvcc-built tensor-core
          kernel of cuda_mma.py, tuned against the others the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantlab.kernels import cuda_gemv, cuda_mma
from quantlab.kernels._triton_tiles import grouped_tile
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan
from quantlab.kernels.triton_w4a16_swap import w4a16_swap_kernel

# Configs. Run 2 (H100, 28672x8192, M = 1): the best two-dot "halves" plan took 133 us, every
# gemv plan >= 249 us, so gemv is a forced path only. W8's single-dot kernel streamed 2.7 TB/s
# with BN = 32..64, BK = 128, which the one-dot "rows" kernel (splitk/tiled) copies here.
_GEMV = [
    plan("gemv", BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
    for bn, bk, sk, w, st in [(32, 128, 4, 2, 4), (64, 128, 4, 4, 4)]
]
_HALVES = [
    plan("halves", BM=16, BN=bn, BK=128, SPLIT_K=sk, GROUP_M=1, num_warps=4, num_stages=st)
    for bn, sk, st in [(128, 4, 3), (64, 2, 4)]
]
_SPLITK = [
    plan("splitk", BM=bm, BN=bn, BK=bk, SPLIT_K=sk, GROUP_M=1, num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st in [
        (16, 32, 128, 1, 4, 4),
        (16, 64, 128, 1, 4, 4),
        (16, 32, 128, 2, 4, 4),
        (16, 64, 128, 2, 4, 4),
        (16, 64, 128, 4, 4, 4),
        (16, 128, 128, 2, 4, 3),
        (16, 32, 256, 2, 4, 3),
        (32, 64, 128, 2, 4, 4),
        (64, 64, 128, 1, 4, 4),
        (64, 128, 128, 1, 8, 3),
    ]
]
# Larger M: 64/128-row tiles; GROUP_M=8 keeps a band of weight tiles hot in L2 while 8 row
# blocks of x pass over it. Run 2: BN = 256 tiles were 1.3-3x slower, so none are listed.
_TILED = [
    plan("tiled", BM=bm, BN=bn, BK=bk, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (64, 64, 128, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 4),
        (128, 128, 128, 8, 3),
    ]
]
# Run 2: dequant (64x128 byte tiles) beat every tiled plan from M = 1024 (900 vs 2494 us at
# 28672x8192); 128-row tiles and 8 warps put more bytes in flight per SM.
_DEQUANT = [
    plan("dequant", BP=128, BK=128, num_warps=8),
    plan("dequant", BP=64, BK=128, num_warps=4),
]
# "swap" (triton_w4a16_swap.py): weights as the dot's A operand (registers -> wgmma on sm_90).
# Small-M plans split K for parallelism; large-M plans are the 128-256 wide tiles of a GEMM.
_SWAP_SMALL = [
    plan("swap", BM=bm, BN=bn, BK=bk, SPLIT_K=sk, GROUP_M=8, num_warps=w, num_stages=st, XL=0)
    for bm, bn, bk, sk, w, st in [
        (16, 128, 128, 1, 4, 4),
        (16, 128, 128, 2, 4, 4),
        (16, 256, 128, 2, 8, 3),
        (32, 128, 128, 1, 4, 4),
        (32, 128, 128, 2, 4, 4),
        (64, 128, 128, 1, 4, 4),
        (64, 128, 128, 2, 4, 4),
        (64, 256, 64, 1, 8, 4),
        (16, 128, 128, 4, 4, 4),  # last: the CPU tests run the first and last forced plans
    ]
]
# Run 13 (H100, 28672x8192 and 4096x4096, M 256-4096): BN = 256 tiles and BK = 128 were slower;
# these four were the best plans at every large M (x on the left, XL = 1, within 5% of W on the
# left, and faster at M = 256 on 28672x8192).
_SWAP_LARGE = [
    plan("swap", BM=bm, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st, XL=xl)
    for bm, w, st, xl in [(128, 4, 4, 0), (256, 8, 3, 0), (128, 4, 4, 1), (256, 8, 3, 1)]
]
BACKENDS = ("gemv", "halves", "splitk", "tiled", "dequant", "swap")

TUNER = Tuner("w4a16")


@triton.jit
def _load_group_params(
    s_ptr, z_ptr, offs_p, mask_p, g, stride_sn, stride_zn, HAS_ZERO: tl.constexpr
):
    # Scales of the even and odd output rows of byte rows offs_p for group g, in fp32.
    s_e = tl.load(s_ptr + (2 * offs_p) * stride_sn + g, mask=mask_p, other=0.0).to(tl.float32)
    s_o = tl.load(s_ptr + (2 * offs_p + 1) * stride_sn + g, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_ZERO:
        # uint8 zero z in [0, 15] against codes stored as u - 8: subtract (z - 8) in int8.
        z_e = tl.load(z_ptr + (2 * offs_p) * stride_zn + g, mask=mask_p, other=8).to(tl.int8) - 8
        z_o = (
            tl.load(z_ptr + (2 * offs_p + 1) * stride_zn + g, mask=mask_p, other=8).to(tl.int8) - 8
        )
    else:
        z_e = tl.zeros_like(s_e).to(tl.int8)
        z_o = z_e
    return s_e, s_o, z_e, z_o


@triton.jit
def _store_out(
    acc,
    out_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    N,
    stride_om,
    stride_os,
    pid_k,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if PARTIAL:
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _w4a16_rows_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_os,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # Output row n reads byte row n // 2 and keeps its nibble with a per-row shift, so the tile is
    # one dense [BN, BK] operand and one dot (no half-width dots, no interleave on store). Each
    # byte is fetched by two rows: DRAM traffic is unchanged, L2->SM traffic doubles (run 2:
    # the two-dot layout of _w4a16_dot_kernel streamed only ~0.9 TB/s at M = 1).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = qw_ptr + (offs_n // 2)[:, None] * stride_qn + offs_k[None, :]
    shift = ((1 - offs_n % 2) * 4).to(tl.int8)[:, None]  # 4: even row, low nibble; 0: odd row

    k_tiles = K // BK
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # Scales/zeros are fetched one K tile ahead by hand: Triton pipelines only the loads that feed
    # the dot, and a group-scale load waited on every tile held run 3 to ~0.95 TB/s at M = 1.
    s_ptrs = s_ptr + offs_n * stride_sn
    z_ptrs = z_ptr + offs_n * stride_zn
    s = tl.load(s_ptrs + (t0 * BK) // GROUP, mask=mask_n & (t0 < t1), other=0.0)
    z = tl.load(z_ptrs + (t0 * BK) // GROUP, mask=mask_n & (t0 < t1) & HAS_ZERO, other=8)
    for t in range(t0, t1):
        k0 = t * BK
        g_next = (k0 + BK) // GROUP
        more = mask_n & (t + 1 < t1)
        s_next = tl.load(s_ptrs + g_next, mask=more, other=0.0)
        z_next = tl.load(z_ptrs + g_next, mask=more & HAS_ZERO, other=8)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        p = tl.load(w_ptrs + k0, mask=mask_n[:, None], other=0)
        q = (p << shift) >> 4  # int8: arithmetic right shift sign-extends the nibble
        if HAS_ZERO:
            q = q - (z.to(tl.int8) - 8)[:, None]
        if DOT_F32:
            x = x.to(tl.float32)
        acc += tl.dot(x, tl.trans(q.to(tl.float32).to(x.dtype))) * s.to(tl.float32)[None, :]
        s = s_next
        z = z_next
    _store_out(
        acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, stride_os, pid_k, HAS_BIAS, PARTIAL
    )


# M is not specialized: one binary serves M = 1, 4 and 16 alike (fewer compiles while tuning).
@triton.jit(do_not_specialize=["M"])
def _w4a16_dot_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_os,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    HALF: tl.constexpr = BN // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_p = pid_n * HALF + tl.arange(0, HALF)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_p = offs_p < N // 2
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = qw_ptr + offs_p[:, None] * stride_qn + offs_k[None, :]

    k_tiles = K // BK
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc_e = tl.zeros((BM, HALF), dtype=tl.float32)
    acc_o = tl.zeros((BM, HALF), dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        p = tl.load(w_ptrs + k0, mask=mask_p[:, None], other=0)
        s_e, s_o, z_e, z_o = _load_group_params(
            s_ptr, z_ptr, offs_p, mask_p, k0 // GROUP, stride_sn, stride_zn, HAS_ZERO
        )
        lo = ((p << 4) >> 4) - z_e[:, None]  # arithmetic shifts sign-extend the low nibble
        hi = (p >> 4) - z_o[:, None]
        # int8 -> fp32 -> dot dtype: exact (|q| <= 15); the direct int8 -> bf16 cast is wrong in
        # Triton 3.6's interpreter, and on sm_90 the cast goes through fp32 anyway.
        if DOT_F32:
            x = x.to(tl.float32)
        w_e = lo.to(tl.float32).to(x.dtype)
        w_o = hi.to(tl.float32).to(x.dtype)
        acc_e += tl.dot(x, tl.trans(w_e)) * s_e[None, :]
        acc_o += tl.dot(x, tl.trans(w_o)) * s_o[None, :]

    acc = tl.reshape(tl.join(acc_e, acc_o), (BM, BN))
    offs_n = pid_n * BN + tl.arange(0, BN)
    _store_out(
        acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, stride_os, pid_k, HAS_BIAS, PARTIAL
    )


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    stride_os,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    HALF: tl.constexpr = BN // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_p = pid_n * HALF + tl.arange(0, HALF)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_p = offs_p < N // 2
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = qw_ptr + offs_p[:, None] * stride_qn + offs_k[None, :]

    k_tiles = K // BK
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc_e = tl.zeros((BM, HALF), dtype=tl.float32)
    acc_o = tl.zeros((BM, HALF), dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0).to(tl.float32)
        p = tl.load(w_ptrs + k0, mask=mask_p[:, None], other=0)
        s_e, s_o, z_e, z_o = _load_group_params(
            s_ptr, z_ptr, offs_p, mask_p, k0 // GROUP, stride_sn, stride_zn, HAS_ZERO
        )
        lo = (((p << 4) >> 4) - z_e[:, None]).to(tl.float32)
        hi = ((p >> 4) - z_o[:, None]).to(tl.float32)
        acc_e += tl.sum(x[:, None, :] * lo[None, :, :], axis=2) * s_e[None, :]
        acc_o += tl.sum(x[:, None, :] * hi[None, :, :], axis=2) * s_o[None, :]

    acc = tl.reshape(tl.join(acc_e, acc_o), (BM, BN))
    offs_n = pid_n * BN + tl.arange(0, BN)
    _store_out(
        acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, stride_os, pid_k, HAS_BIAS, PARTIAL
    )


@triton.jit
def splitk_reduce_kernel(
    ws_ptr,
    b_ptr,
    out_ptr,
    MN,
    N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sum fp32 partials [SPLIT_K, M, N] (+ bias [N]) into out [M, N] (contiguous)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w4_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BP: tl.constexpr,
    BK: tl.constexpr,
):
    # One [BP, BK] byte tile -> rows 2p (low) and 2p+1 (high) of w [N, K]; BK <= GROUP.
    offs_p = tl.program_id(0) * BP + tl.arange(0, BP)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask_p = offs_p < N // 2
    mask = mask_p[:, None] & (offs_k[None, :] < K)
    p = tl.load(qw_ptr + offs_p[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0)
    s_e, s_o, z_e, z_o = _load_group_params(
        s_ptr,
        z_ptr,
        offs_p,
        mask_p,
        (tl.program_id(1) * BK) // GROUP,
        stride_sn,
        stride_zn,
        HAS_ZERO,
    )
    lo = (((p << 4) >> 4) - z_e[:, None]).to(tl.float32) * s_e[:, None]
    hi = ((p >> 4) - z_o[:, None]).to(tl.float32) * s_o[:, None]
    dst = w_ptr + (2 * offs_p[:, None]) * K + offs_k[None, :]
    tl.store(dst, lo.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + K, hi.to(w_ptr.dtype.element_ty), mask=mask)


def interpreter_bf16(x: torch.Tensor) -> bool:
    """True when bf16 dots must run in fp32: Triton 3.6's CPU interpreter computes bf16 tl.dot on
    raw bits (errors ~1e10 with numpy 2.4), so CPU tests check bf16 everywhere but the dot itself."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def candidates(m: int, group_size: int, backend: str) -> list[Plan]:
    """Plans to try for M rows (BK is capped at the group so each K tile sits in one group)."""
    by_name = {
        "gemv": _GEMV,
        "halves": _HALVES,
        "splitk": _SPLITK,
        "tiled": _TILED,
        "dequant": _DEQUANT,
        "swap": (
            (_SWAP_SMALL if m_bucket(m) <= 64 else _SWAP_LARGE)
            if backend == "auto"
            else _SWAP_LARGE + _SWAP_SMALL
        ),
    }
    if backend == "auto":
        b = m_bucket(m)
        # Run 2 (H100): tiled plans lost to dequant + cuBLAS by 2.8-3.5x from M = 1024 on.
        names = (
            ["splitk", "halves", "swap"] if b <= 16
            else ["splitk", "swap"] if b <= 32
            else ["splitk", "tiled", "swap"] if b <= 128
            else ["tiled", "dequant", "swap"] if b <= 512
            else ["dequant", "swap"]
        )  # fmt: skip
    else:
        names = [backend]
    out = []
    for name in names:
        for c in by_name[name]:
            bk = c.get("BK")
            if bk > group_size or group_size % bk:
                c = Plan(c.backend, tuple((k, group_size if k == "BK" else v) for k, v in c.cfg))
            if name == "gemv" and m > 4:
                continue
            if c not in out:
                out.append(c)
    return out


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, x: torch.Tensor, fill: float | None):
    """An empty tensor on x's device, filled with fill when given (tests pass NaN, so an element
    no kernel wrote is caught)."""
    t = torch.empty(shape, dtype=dtype, device=x.device)
    return t if fill is None else t.fill_(fill)


def splitk_buffers(
    x: torch.Tensor, m: int, n: int, split: int, fill: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, N] in x's dtype, what the GEMM kernel writes: out itself, or fp32 partials
    [split, M, N] when split > 1)."""
    out = poisoned((m, n), x.dtype, x, fill)
    return out, (poisoned((split, m, n), torch.float32, x, fill) if split > 1 else out)


def splitk_finish(
    ws: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, split: int
) -> torch.Tensor:
    """Sum the split-K partials ws [split, M, N] (+ bias) into out; out as it is when split == 1."""
    if split > 1:
        m, n = out.shape
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws,
            bias if bias is not None else ws,
            out,
            m * n,
            n,
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
        )
    return out


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
    """Launch one plan: x [M, K] fp16/bf16 contiguous -> out [M, N] in x's dtype."""
    if p.backend == "cuda_gemv":
        return cuda_gemv.run_plan(p, x, qweight, scales, zeros, group_size, bias, fill)
    if p.backend == "cuda_mma":
        return cuda_mma.run_plan(p, x, qweight, scales, zeros, group_size, bias, fill)
    m, k = x.shape
    n = qweight.shape[0] * 2
    cfg = dict(p.cfg)
    if p.backend == "dequant":
        w = poisoned((n, k), x.dtype, x, fill)
        grid = (triton.cdiv(n // 2, cfg["BP"]), k // cfg["BK"])
        _w4_dequant_kernel[grid](
            qweight,
            scales,
            zeros if zeros is not None else scales,
            w,
            n,
            k,
            qweight.stride(0),
            scales.stride(0),
            zeros.stride(0) if zeros is not None else 0,
            GROUP=group_size,
            HAS_ZERO=zeros is not None,
            BP=cfg["BP"],
            BK=cfg["BK"],
            num_warps=cfg["num_warps"],
        )
        return torch.nn.functional.linear(x, w, bias)

    split = cfg["SPLIT_K"]
    partial = split > 1
    out, ws = splitk_buffers(x, m, n, split, fill)
    common = dict(
        GROUP=group_size,
        HAS_ZERO=zeros is not None,
        HAS_BIAS=bias is not None,
        PARTIAL=partial,
        BN=cfg["BN"],
        BK=cfg["BK"],
        SPLIT_K=split,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    args = (
        x,
        qweight,
        scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else scales,
        ws,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        n,
        m * n,
    )
    if p.backend == "gemv":
        bm = triton.next_power_of_2(m)
        _w4a16_gemv_kernel[(triton.cdiv(n, cfg["BN"]), split)](*args, BM=bm, **common)
    else:
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), split)
        kern = {"halves": _w4a16_dot_kernel, "swap": w4a16_swap_kernel}.get(
            p.backend, _w4a16_rows_kernel
        )
        extra = {"USE_ASM": x.is_cuda, "XL": cfg["XL"]} if p.backend == "swap" else {}
        kern[grid](
            *args,
            BM=cfg["BM"],
            GROUP_M=cfg["GROUP_M"],
            DOT_F32=interpreter_bf16(x),
            **extra,
            **common,
        )
    return splitk_finish(ws, out, bias, split)


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    backend: str = "auto",
    fill: float | None = None,
) -> torch.Tensor:
    """Triton W4A16: x [M, K] fp16/bf16 @ W4^T -> [M, N]; backend 'auto' tunes per M bucket."""
    m, k = x.shape
    cands = candidates(m, group_size, backend)
    # The CUDA small-M kernel competes in the same tuning run when it takes the arguments (and
    # nvcc built it); otherwise the Triton plans alone.
    cuda_ok = (
        backend == "auto"
        and x.is_cuda
        and cuda_gemv.unsupported_reason(x, qweight, scales, zeros, group_size, bias) is None
        and cuda_gemv.available(x.device)
    )
    if cuda_ok:
        cands = cuda_gemv.candidates(group_size) + cands
    mma_ok = (
        backend == "auto"
        and x.is_cuda
        and m_bucket(m) <= 64
        and cuda_mma.unsupported_reason(x, qweight, scales, zeros, group_size, bias) is None
        and cuda_mma.available(x.device)
    )
    if mma_ok:
        cands = cuda_mma.candidates(m, sym=zeros is None) + cands
    key = (
        m_bucket(m),
        qweight.shape[0] * 2,
        k,
        group_size,
        x.dtype,
        scales.dtype,
        zeros is not None,
        bias is not None,
        backend,
        cuda_ok,  # a cached CUDA plan is only reused where the CUDA kernel takes the arguments
        mma_ok,
    )
    chosen = TUNER.pick(
        key, cands, lambda c: run_plan(c, x, qweight, scales, zeros, group_size, bias)
    )
    return run_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)

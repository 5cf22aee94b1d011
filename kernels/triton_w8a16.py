"""Triton W8A16 per-channel GEMMs: int8 weights [N, K], one scale per output row.

The per-channel scale is constant along K, so the K loop accumulates x @ q^T with q exact in the
activation dtype and the scale multiplies the [BM, BN] accumulator once at the end (before the
split-K partials are written: the sum is linear). Backends mirror triton_w4a16 (gemv, splitk,
tiled, dequant) and share its split-K reduce. w8a16_gemm is also where W8A16 dispatch meets the
CUDA kernels: on CUDA its "auto" tunes cuda_mma's W8 plans (small M) and cutlass_w8 (sm_90, M >= 64)
together with these, and it forces either one on request.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantlab.kernels._triton_tiles import grouped_tile
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan
from quantlab.kernels.triton_w4a16 import interpreter_bf16, splitk_buffers, splitk_finish

# int8 rows carry 2x the bytes of int4 per K, so tiles are half as wide along K for the same
# bytes in flight; otherwise the same reasoning as triton_w4a16's configs.
_GEMV = [
    plan("gemv", BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
    for bn, bk, sk, w, st in [
        (32, 128, 1, 4, 4),
        (32, 128, 2, 4, 4),
        (64, 128, 2, 4, 4),
        (64, 128, 4, 4, 3),
        (32, 256, 4, 4, 3),
        (16, 256, 2, 4, 4),
    ]
]
_SPLITK = [
    plan("splitk", BM=bm, BN=bn, BK=bk, SPLIT_K=sk, GROUP_M=1, num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st in [
        (16, 32, 128, 1, 4, 4),
        (16, 64, 128, 1, 4, 4),
        (16, 64, 128, 2, 4, 4),
        (16, 64, 128, 4, 4, 4),
        (16, 128, 128, 2, 4, 3),
        (32, 64, 128, 2, 4, 4),
        (64, 128, 64, 2, 4, 4),
        (64, 128, 128, 1, 8, 3),
    ]
]
_TILED = [
    plan("tiled", BM=bm, BN=bn, BK=bk, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 4),
        (128, 256, 64, 8, 3),
        (128, 128, 128, 8, 3),
    ]
]
BACKENDS = ("gemv", "splitk", "tiled", "dequant")

TUNER = Tuner("w8a16")


@triton.jit(do_not_specialize=["M"])
def _w8a16_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_om,
    stride_os,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    GEMV: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :]

    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k[None, :], other=0)
        if GEMV:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
        else:
            if DOT_F32:
                x = x.to(tl.float32)
            acc += tl.dot(x, tl.trans(q.to(tl.float32).to(x.dtype)))
    acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(
            out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
            acc,
            mask=mask,
        )
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _w8_dequant_kernel(qw_ptr, s_ptr, w_ptr, N, K, stride_qn, BN: tl.constexpr, BK: tl.constexpr):
    # One [BN, BK] tile of q [N, K] int8 -> w = q * s[n] (fp32 product, rounded once to w's dtype)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * s[:, None]
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequant_w8(
    qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, fill: float | None = None
) -> torch.Tensor:
    """q int8 [N, K] * scales [N] -> w [N, K] in dtype, in one pass (a Triton kernel)."""
    n, k = qweight.shape
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if fill is not None:
        w.fill_(fill)
    bn, bk = 32, 256
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _w8_dequant_kernel[grid](qweight, scales, w, n, k, qweight.stride(0), BN=bn, BK=bk, num_warps=4)
    return w


def candidates(m: int, backend: str) -> list[Plan]:
    """Plans to try for M rows under a backend name ('auto' picks backends by M bucket)."""
    by_name = {"gemv": _GEMV, "splitk": _SPLITK, "tiled": _TILED, "dequant": [plan("dequant")]}
    if backend == "auto":
        b = m_bucket(m)
        names = (
            ["gemv", "splitk"]
            if b <= 4
            else ["splitk"]
            if b <= 32
            else ["splitk", "tiled"]
            if b <= 128
            else ["tiled"]
            if b <= 512
            else ["tiled", "dequant"]
        )
    else:
        names = [backend]
    return [c for name in names for c in by_name[name] if not (name == "gemv" and m > 4)]


def run_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Launch one plan: x [M, K] fp16/bf16 contiguous -> out [M, N] in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = dict(p.cfg)

    if p.backend == "cuda_mma":
        from quantlab.kernels.cuda_mma import run_w8_plan

        return run_w8_plan(p, x, qweight, scales, bias, fill)
    if p.backend == "cutlass_w8":
        from quantlab.kernels import cutlass_w8

        return cutlass_w8.run_plan(p, x, qweight, scales, bias, fill)
    if p.backend == "dequant":
        # q * s in fp32, rounded once to x's dtype (one pass over the weights), then cuBLAS. Run 25
        # (H100) timed the earlier three-pass torch version (an fp32 copy of w) at 0.49-0.61x of
        # cuBLAS bf16 for M >= 1024.
        w = dequant_w8(qweight, scales, x.dtype, fill)
        return torch.nn.functional.linear(x, w, bias)
    split = cfg["SPLIT_K"]
    partial = split > 1
    out, ws = splitk_buffers(x, m, n, split, fill)
    gemv = p.backend == "gemv"
    bm = triton.next_power_of_2(m) if gemv else cfg["BM"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, cfg["BN"]), split)
    _w8a16_kernel[grid](
        x,
        qweight,
        scales,
        bias if bias is not None else scales,
        ws,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        n,
        m * n,
        HAS_BIAS=bias is not None,
        PARTIAL=partial,
        GEMV=gemv,
        DOT_F32=interpreter_bf16(x),
        BM=bm,
        BN=cfg["BN"],
        BK=cfg["BK"],
        SPLIT_K=split,
        GROUP_M=1 if gemv else cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return splitk_finish(ws, out, bias, split)


def w8a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str = "auto",
    fill: float | None = None,
) -> torch.Tensor:
    """W8A16: x [M, K] fp16/bf16 @ (q [N, K] * s [N])^T -> [M, N]; 'auto' tunes per M bucket.

    On CUDA, 'auto' also tries the CUDA tensor-core plans (cuda_mma) up to M bucket
    cuda_mma.W8_MAX_M and, on sm_90, the CUTLASS plans (cutlass_w8) from M bucket
    cutlass_w8.MIN_M, where they build and accept the arguments; 'cuda_mma' and 'cutlass' force
    one of them.
    """
    m, k = x.shape
    if backend in ("cuda_mma", "cutlass"):
        from quantlab.kernels import cuda_mma, cutlass_w8

        if backend == "cuda_mma":
            reason = cuda_mma.w8_unsupported_reason(x, qweight, scales, bias)
            cands = cuda_mma.w8_candidates(m)
        else:
            reason = cutlass_w8.unsupported_reason(x, qweight, scales, bias)
            cands = cutlass_w8.candidates(x.dtype, m)
        if reason is not None:
            raise ValueError(f"{backend}: {reason}")
    else:
        cands = candidates(m, backend)
    if backend == "auto" and x.is_cuda:
        extra = _cuda_plans(x, qweight, scales, bias)
        if extra:
            cands = extra + cands
            backend = "auto+" + "+".join(sorted({p.backend for p in extra}))
    key = (m_bucket(m), qweight.shape[0], k, x.dtype, scales.dtype, bias is not None, backend)
    chosen = TUNER.pick(key, cands, lambda c: run_plan(c, x, qweight, scales, bias))
    return run_plan(chosen, x, qweight, scales, bias, fill)


def _cuda_plans(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> list[Plan]:
    """The CUDA plans 'auto' adds for these arguments: cuda_mma W8 (small M), cutlass_w8 (sm_90,
    M >= cutlass_w8.MIN_M); empty where neither applies or builds."""
    from quantlab.kernels import cuda_mma, cutlass_w8

    plans: list[Plan] = []
    b = m_bucket(x.shape[0])
    if _cuda_mma_ok(x, qweight, scales, bias):
        plans += cuda_mma.w8_candidates(x.shape[0])
    if (
        b >= cutlass_w8.MIN_M
        and cutlass_w8.unsupported_reason(x, qweight, scales, bias) is None
        and cutlass_w8.available(x.device)
    ):
        plans += cutlass_w8.candidates(x.dtype, x.shape[0])
    return plans


def _cuda_mma_ok(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """True if 'auto' should include the CUDA tensor-core W8A16 plans for these arguments."""
    from quantlab.kernels import cuda_mma

    return (
        m_bucket(x.shape[0]) <= cuda_mma.W8_MAX_M
        and cuda_mma.w8_unsupported_reason(x, qweight, scales, bias) is None
        and cuda_mma.available(x.device)
    )

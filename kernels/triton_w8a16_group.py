"""Triton W8A16 group-wise GEMMs (W8A16_GPTQ): int8 codes [N, K], scales [N, K/G] and optional
int8 zero points [N, K/G], with w = (q - zp) * s.

Every K tile lies inside one group (BK <= G, G % BK == 0): the tile's dot runs on the int8 codes
(exact in fp16 and bf16), the zero point enters as zp * (the tile's row sum of x), so no weight
element is touched twice (subtracting zp per element held ptxas to 32 registers and 3.5 KB of
spills at BN 64, BK 128), and the [BM, BN] result is scaled by the group's scales in fp32 before
it joins the accumulator. Scales and zeros are loaded one tile ahead
(as in triton_w4a16). The plans are triton_w8a16's, with BK capped at the group; 'dequant' expands
the weights once in fp32, rounds them to x's dtype and calls cuBLAS (large M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantlab.kernels._triton_tiles import grouped_tile
from quantlab.kernels._tune import Plan, Tuner, m_bucket
from quantlab.kernels.reference import dequant_w8_group
from quantlab.kernels.triton_w4a16 import (
    _store_out,
    interpreter_bf16,
    splitk_buffers,
    splitk_finish,
)
from quantlab.kernels.triton_w8a16 import candidates as w8_candidates

BACKENDS = ("gemv", "splitk", "tiled", "dequant")
TUNER = Tuner("w8a16_group")


@triton.jit(do_not_specialize=["M"])
def _w8g_kernel(
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
    stride_om,
    stride_os,
    GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
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
    s_ptrs = s_ptr + offs_n * stride_sn
    z_ptrs = z_ptr + offs_n * stride_sn

    k_tiles = K // BK
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    s = tl.load(s_ptrs + (t0 * BK) // GROUP, mask=mask_n & (t0 < t1), other=0.0)
    z = tl.load(z_ptrs + (t0 * BK) // GROUP, mask=mask_n & (t0 < t1) & HAS_ZERO, other=0)
    for t in range(t0, t1):
        k0 = t * BK
        g_next = (k0 + BK) // GROUP
        more = mask_n & (t + 1 < t1)
        s_next = tl.load(s_ptrs + g_next, mask=more, other=0.0)
        z_next = tl.load(z_ptrs + g_next, mask=more & HAS_ZERO, other=0)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        q = tl.load(w_ptrs + k0, mask=mask_n[:, None], other=0).to(tl.float32)
        if GEMV:
            part = tl.sum(x.to(tl.float32)[:, None, :] * q[None, :, :], axis=2)
        else:
            if DOT_F32:
                x = x.to(tl.float32)
            part = tl.dot(x, tl.trans(q.to(x.dtype)))
        if HAS_ZERO:  # sum_k x (q - z) = x . q - z * sum_k x: no per-weight subtraction
            part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * z.to(tl.float32)[None, :]
        acc += part * s.to(tl.float32)[None, :]
        s = s_next
        z = z_next
    _store_out(
        acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, stride_os, pid_k, HAS_BIAS, PARTIAL
    )


def candidates(m: int, group_size: int, backend: str) -> list[Plan]:
    """triton_w8a16's plans for M rows, BK capped at the group so each K tile sits in one group."""
    out: list[Plan] = []
    for c in w8_candidates(m, backend):
        bk = c.get("BK") if c.backend != "dequant" else None
        if bk is not None and (bk > group_size or group_size % bk):
            c = Plan(c.backend, tuple((k, group_size if k == "BK" else v) for k, v in c.cfg))
        if c not in out:
            out.append(c)
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
    m, k = x.shape
    n = qweight.shape[0]
    if p.backend == "dequant":
        w = dequant_w8_group(qweight, scales, zeros, group_size, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    cfg = dict(p.cfg)

    split = cfg["SPLIT_K"]
    partial = split > 1
    out, ws = splitk_buffers(x, m, n, split, fill)
    gemv = p.backend == "gemv"
    bm = triton.next_power_of_2(m) if gemv else cfg["BM"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, cfg["BN"]), split)
    _w8g_kernel[grid](
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
        n,
        m * n,
        GROUP=group_size,
        HAS_ZERO=zeros is not None,
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


def w8a16_group_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    backend: str = "auto",
    fill: float | None = None,
) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ ((q [N, K] - zp [N, K/G]) * s [N, K/G])^T + b -> [M, N]; 'auto' tunes."""
    m, k = x.shape
    cands = candidates(m, group_size, backend)
    key = (
        m_bucket(m),
        qweight.shape[0],
        k,
        group_size,
        x.dtype,
        scales.dtype,
        zeros is not None,
        bias is not None,
        backend,
    )
    args = (x, qweight, scales, zeros, group_size, bias)
    chosen = TUNER.pick(key, cands, lambda c: run_plan(c, *args))
    return run_plan(chosen, *args, fill=fill)

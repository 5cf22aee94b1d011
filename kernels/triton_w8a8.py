"""Triton SmoothQuant W8A8: int8 activation quantization and an int8 GEMM with its epilogue.

The torch path of a W8A8 linear takes about ten kernels: the smoothing multiply, abs, amax, a
division, round, clamp and cast of the activations, cuBLASLt's int8 GEMM (M padded to 17 rows),
then an int32 -> float epilogue in three more passes. Here it is two launches (three with split-K):

  quant_int8_kernel  row m of x [M, K] (times the smoothing scale pre [K], rounded to x's dtype as
                     torch's `x * pre`) -> codes int8 [M, K] and the dequantization scale [M]:
                     per token amax / 127 (1 where the row is zero) or the checkpoint's static
                     scale; codes round(x / s) half to even, saturated to [-128, 127]
  w8a8_kernel        int32 acc = xq @ wq^T (tl.dot on int8), then y = acc * sx[m] * sw[n] + b[n]
                     in float32, in the order the torch reference uses; with split-K each part
                     writes its int32 partial sum and w8a8_reduce_kernel adds them (exact) and
                     applies the same epilogue.

Integer accumulation is exact, so the result equals reference.ref_linear_w8a8 up to the float
epilogue's last bit (none at all under the CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantlab.kernels._triton_tiles import grouped_tile
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan

# fp32 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 to an integer, half to even (the
# fp32 add rounds to nearest even); portable to the CPU interpreter, unlike libdevice.rint.
ROUND_MAGIC = tl.constexpr(12582912.0)  # a global a @triton.jit body may read

_GEMV = [
    plan("gemv", BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
    for bn, bk, sk, w, st in [
        (32, 128, 1, 4, 4),
        (32, 256, 2, 4, 3),
        (64, 128, 2, 4, 4),
        (64, 256, 4, 4, 3),
    ]
]
_SPLITK = [
    plan("splitk", BM=bm, BN=bn, BK=bk, SPLIT_K=sk, GROUP_M=1, num_warps=w, num_stages=st)
    for bm, bn, bk, sk, w, st in [
        (16, 32, 256, 1, 4, 4),
        (16, 64, 256, 1, 4, 4),
        (16, 64, 256, 2, 4, 4),
        (16, 128, 128, 2, 4, 4),
        (16, 128, 64, 2, 4, 4),  # no spills at sm_90 (sm90_compile.py); BK 128 spills 784 B
        (32, 64, 256, 2, 4, 4),
        (64, 128, 128, 1, 4, 4),
    ]
]
_TILED = [
    plan("tiled", BM=bm, BN=bn, BK=bk, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (64, 128, 128, 4, 4),
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (128, 128, 64, 8, 4),  # 48 B of stack at sm_90 against 1136 B with BK 128
    ]
]

TUNER = Tuner("w8a8")


@triton.jit
def quant_int8_kernel(x_ptr, pre_ptr, static_ptr, xq_ptr, s_ptr, K, stride_xm,
                      HAS_PRE: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Row m of x [M, K] (* pre [K]) -> xq int8 [M, K], s fp32 [M] (BLOCK >= K: one read)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    v = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0)
    if HAS_PRE:
        v = v * tl.load(pre_ptr + offs, mask=mask, other=0.0).to(v.dtype)
    v = v.to(tl.float32)
    if STATIC:
        s = tl.load(static_ptr).to(tl.float32)
    else:
        s = tl.math.div_rn(tl.max(tl.abs(v), axis=0), tl.full([], 127.0, tl.float32))
        s = tl.where(s > 0, s, 1.0)
    tl.store(s_ptr + row, s)
    q = tl.clamp(tl.math.div_rn(v, tl.zeros_like(v) + s), -128.0, 127.0)
    q = (q + ROUND_MAGIC) - ROUND_MAGIC
    tl.store(xq_ptr + row * K + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _epilogue(acc, sx_ptr, sw_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
              SX_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """float32 (acc * sx) * sw (+ b): the reference's order of operations."""
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)[:, None] if SX_ROWS else tl.load(sx_ptr)
    if SW_COLS:
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        sw = tl.load(sw_ptr).to(tl.float32)
    y = (acc.to(tl.float32) * sx) * sw
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit(do_not_specialize=["M"])
def w8a8_kernel(xq_ptr, qw_ptr, sx_ptr, sw_ptr, b_ptr, out_ptr, M, N, K, stride_qn,
                SX_ROWS: tl.constexpr, SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                PARTIAL: tl.constexpr, GEMV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """out [M, N] (or int32 partials [SPLIT_K, M, N]) of xq int8 [M, K] @ qw int8 [N, K]^T."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_ptrs = xq_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :]
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for t in range(t0, t1):
        k0 = t * BK
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0)
        q = tl.load(w_ptrs + k0, mask=mask_n[:, None] & mask_k[None, :], other=0)
        if GEMV:
            acc += tl.sum(x.to(tl.int32)[:, None, :] * q.to(tl.int32)[None, :, :], axis=2)
        else:
            acc = tl.dot(x, tl.trans(q), acc, out_dtype=tl.int32)
    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        dst = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(dst, acc, mask=mask)
    else:
        y = _epilogue(acc, sx_ptr, sw_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
                      SX_ROWS, SW_COLS, HAS_BIAS)  # fmt: skip
        dst = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def w8a8_reduce_kernel(ws_ptr, sx_ptr, sw_ptr, b_ptr, out_ptr, M, N, SX_ROWS: tl.constexpr,
                       SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Sum the int32 partials [SPLIT_K, M, N] and apply the epilogue into out [M, N]."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    idx = offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0)
    y = _epilogue(acc, sx_ptr, sw_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
                  SX_ROWS, SW_COLS, HAS_BIAS)  # fmt: skip
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_int8(
    x: torch.Tensor, x_scale: torch.Tensor | None, pre: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16/fp32 (* pre [K]) -> (codes int8 [M, K], scale fp32 [M, 1] or [1, 1])."""
    m, k = x.shape
    x = x.contiguous()
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    quant_int8_kernel[(m,)](x, pre if pre is not None else x,
                            x_scale if x_scale is not None else s, xq, s, k, x.stride(0),
                            HAS_PRE=pre is not None, STATIC=x_scale is not None, BLOCK=block,
                            num_warps=min(16, max(4, block // 1024)))  # fmt: skip
    return xq, (s[:1] if x_scale is not None else s)


def candidates(m: int) -> list[Plan]:
    """Plans to try for M rows, by M bucket."""
    b = m_bucket(m)
    if b <= 4:
        return _GEMV + _SPLITK
    if b <= 64:
        return _SPLITK
    if b <= 256:
        return _SPLITK[-2:] + _TILED
    return _TILED


def run_plan(
    p: Plan,
    xq: torch.Tensor,
    sx: torch.Tensor,
    qweight: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Launch one plan: xq int8 [M, K] contiguous, sx fp32 [M, 1] or [1, 1] -> out [M, N] dtype."""
    m, k = xq.shape
    n = qweight.shape[0]
    c = dict(p.cfg)
    split = c["SPLIT_K"]
    out = torch.empty((m, n), dtype=dtype, device=xq.device)
    ws = torch.empty((split, m, n), dtype=torch.int32, device=xq.device) if split > 1 else out
    gemv = p.backend == "gemv"
    bm = triton.next_power_of_2(m) if gemv else c["BM"]
    flags = {"SX_ROWS": sx.numel() > 1, "SW_COLS": sw.numel() > 1, "HAS_BIAS": bias is not None}
    b = bias if bias is not None else sw
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, c["BN"]), split)
    w8a8_kernel[grid](xq, qweight, sx, sw, b, ws, m, n, k, qweight.stride(0), **flags,
                      PARTIAL=split > 1, GEMV=gemv, BM=bm, BN=c["BN"], BK=c["BK"], SPLIT_K=split,
                      GROUP_M=1 if gemv else c["GROUP_M"], num_warps=c["num_warps"],
                      num_stages=c["num_stages"])  # fmt: skip
    if split > 1:
        rb = (16, 128)
        grid2 = (triton.cdiv(m, rb[0]), triton.cdiv(n, rb[1]))
        w8a8_reduce_kernel[grid2](ws, sx, sw, b, out, m, n, **flags, SPLIT_K=split, BM=rb[0],
                                  BN=rb[1], num_warps=4)  # fmt: skip
    return out


def w8a8_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    pre: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [M, N] in x's dtype = SmoothQuant W8A8 of x [M, K] with int8 qweight [N, K].

    weight_scale fp32 [1] or [N]; x_scale: static fp32 scale (1 element) or None (per token);
    pre: smoothing multiplier [K] applied before quantization, or None. 'auto' tunes per M bucket.
    """
    xq, sx = quantize_int8(x, x_scale, pre)
    return w8a8_gemm_codes(xq, sx, qweight, weight_scale, bias, x.dtype, backend)


def w8a8_gemm_codes(
    xq: torch.Tensor,
    sx: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    backend: str = "auto",
) -> torch.Tensor:
    """y [M, N] in dtype from int8 codes xq [M, K] (contiguous) with scale sx fp32 [M, 1] or
    [1, 1], and int8 qweight [N, K] with weight_scale [1] or [N]; 'auto' tunes per M bucket."""
    sw = weight_scale.float().reshape(-1).contiguous()
    m, k = xq.shape
    cands = (
        candidates(m) if backend == "auto" else [c for c in candidates(m) if c.backend == backend]
    )
    if not cands:
        raise ValueError(f"w8a8_gemm: no plan of backend {backend!r} for M={m}")
    key = (m_bucket(m), qweight.shape[0], k, dtype, sx.numel() > 1, sw.numel() > 1)
    chosen = TUNER.pick(key, cands, lambda p: run_plan(p, xq, sx, qweight, sw, bias, dtype))
    return run_plan(chosen, xq, sx, qweight, sw, bias, dtype)

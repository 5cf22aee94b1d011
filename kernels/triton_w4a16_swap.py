"""Triton W4A16 "swap" kernel: out^T = W @ x^T, weights as the MMA's A operand.

The other Triton kernels put x on the left of the dot (A) and the dequantized weights on the
right (B). On sm_90 the tensor-core instruction (wgmma) reads B from shared memory only, while A
may come from registers; with the weights as A, a dequantized tile goes from registers straight
into the MMA. The checkpoint layout splits naturally: byte row p holds output row 2p (low nibble)
and 2p + 1 (high nibble), so each K step runs two dots, even rows and odd rows, of [BN/2, BK] x
[BK, BM], and the two [BN/2, BM] accumulators are interleaved once, in the epilogue.

Dequantization on CUDA (USE_ASM) is inline PTX, 2-2.5 instructions per weight and no
int->float conversion: a nibble n (two's complement code, or u - 8 for asymmetric codes u) goes
into the mantissa of a 16-bit MAGIC (bf16 128.0, fp16 1024.0) as n ^ 8 = u by one LOP3, giving
exactly MAGIC + u; a packed subtract of MAGIC + c (c = 8 symmetric, c = z asymmetric) is exact and
a packed multiply by the group scale (in the activation dtype) is the one rounding, as in the fused
kernels of other tools. Elsewhere (the CPU interpreter) the same trick runs in fp32 with 2^23.
Each K tile lies in one group (BK <= G, G % BK == 0); the scales and zeros of tile t + 1 are
loaded while tile t computes.

XL = 1 puts x back on the left (the dequantized weights then go through shared memory as the
dot's B operand), for the large-M plans where that was as fast or faster (docs/kernels.md).
"""

from __future__ import annotations

import triton
import triton.language as tl
from quantlab.kernels._triton_tiles import grouped_tile

MAGIC = tl.constexpr(
    8388608.0
)  # 2^23: fp32 bits 0x4B000000 | u read as a float are exactly 2^23 + u


# Four int8 bytes in one register -> four 16-bit values (two registers), for one nibble of each
# byte: PRMT spreads bytes 0,1 (2,3) into the two 16-bit lanes, (hi: shift right by 4), one LOP3
# (b & 0xF) ^ MAGIC8 puts the nibble n as n ^ 8 = u into the mantissa of MAGIC (bf16 128, fp16
# 1024: the 16-bit lane then holds exactly MAGIC + u), then a packed subtract of MAGIC + c
# (exact) and a packed multiply by the scale (the one rounding). 2-2.5 instructions per weight.
_DEQ_ASM = """{{
.reg .b32 t0, t1;
prmt.b32 t0, $2, 0, 0x4140;
prmt.b32 t1, $2, 0, 0x4342;
{shift}lop3.b32 t0, t0, 0x000F000F, {magic8}, 0x6a;
lop3.b32 t1, t1, 0x000F000F, {magic8}, 0x6a;
sub.rn.{ty}x2 t0, t0, $3;
sub.rn.{ty}x2 t1, t1, $4;
mul.rn.{ty}x2 $0, t0, $5;
mul.rn.{ty}x2 $1, t1, $6;
}}"""
_SHIFT = "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;\n"
DEQ_LO_BF16 = tl.constexpr(_DEQ_ASM.format(shift="", magic8="0x43084308", ty="bf16"))
DEQ_HI_BF16 = tl.constexpr(_DEQ_ASM.format(shift=_SHIFT, magic8="0x43084308", ty="bf16"))
DEQ_LO_F16 = tl.constexpr(_DEQ_ASM.format(shift="", magic8="0x64086408", ty="f16"))
DEQ_HI_F16 = tl.constexpr(_DEQ_ASM.format(shift=_SHIFT, magic8="0x64086408", ty="f16"))


@triton.jit
def _dequant_asm(p, c, s, HIGH: tl.constexpr, BF16: tl.constexpr):
    # p int8 [R, BK]; c = MAGIC16 + zero and s in the activation dtype, broadcast to [R, BK].
    # (dtype must be a literal: inline_asm_elementwise does not unwrap a constexpr dtype.)
    cons: tl.constexpr = "=r,=r,r,r,r,r,r"
    if BF16:
        if HIGH:
            w = tl.inline_asm_elementwise(DEQ_HI_BF16, cons, [p, c, s], tl.bfloat16, True, 4)
        else:
            w = tl.inline_asm_elementwise(DEQ_LO_BF16, cons, [p, c, s], tl.bfloat16, True, 4)
    else:
        if HIGH:
            w = tl.inline_asm_elementwise(DEQ_HI_F16, cons, [p, c, s], tl.float16, True, 4)
        else:
            w = tl.inline_asm_elementwise(DEQ_LO_F16, cons, [p, c, s], tl.float16, True, 4)
    return w


@triton.jit
def _load_zeros(ze_ptrs, stride_zn, g, mask, HAS_ZERO: tl.constexpr):
    # Integer zero points (fp32) of the even and odd rows for group g; 8 when symmetric.
    if HAS_ZERO:
        z_e = tl.load(ze_ptrs + g, mask=mask, other=8).to(tl.float32)
        z_o = tl.load(ze_ptrs + stride_zn + g, mask=mask, other=8).to(tl.float32)
    else:
        z_e = tl.full(ze_ptrs.shape, 8.0, tl.float32)
        z_o = z_e
    return z_e, z_o


@triton.jit(do_not_specialize=["M"])
def w4a16_swap_kernel(
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
    USE_ASM: tl.constexpr,
    XL: tl.constexpr,
):
    """x [M, K] fp16/bf16, qweight int8 [N/2, K] (checkpoint layout), scales [N, K/G], zeros
    uint8 [N, K/G] or unused -> out [M, N] (x's dtype) or fp32 partials [SPLIT_K, M, N]."""
    HALF: tl.constexpr = BN // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)

    offs_p = pid_n * HALF + tl.arange(0, HALF)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    mask_p = offs_p < N // 2
    mask_m = offs_m < M
    w_ptrs = qw_ptr + offs_p[:, None] * stride_qn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    se_ptrs = s_ptr + (2 * offs_p) * stride_sn
    ze_ptrs = z_ptr + (2 * offs_p) * stride_zn

    k_tiles = K // BK
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    if XL:
        acc_e = tl.zeros((BM, HALF), dtype=tl.float32)
        acc_o = tl.zeros((BM, HALF), dtype=tl.float32)
    else:
        acc_e = tl.zeros((HALF, BM), dtype=tl.float32)
        acc_o = tl.zeros((HALF, BM), dtype=tl.float32)
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    MAGIC16: tl.constexpr = 128.0 if BF16 else 1024.0  # USE_ASM: 16-bit magic, else fp32's
    base: tl.constexpr = MAGIC16 if USE_ASM else MAGIC
    # Scales/zeros of tile t + 1 are loaded while tile t computes: the pipeliner only stages the
    # loads that feed the dots, and a scale load waited on every tile stalls the loop.
    g = (t0 * BK) // GROUP
    live = mask_p & (t0 < t1)
    s_e = tl.load(se_ptrs + g, mask=live, other=0.0)
    s_o = tl.load(se_ptrs + stride_sn + g, mask=live, other=0.0)
    z_e, z_o = _load_zeros(ze_ptrs, stride_zn, g, live, HAS_ZERO)
    for t in range(t0, t1):
        k0 = t * BK
        g_next = (k0 + BK) // GROUP
        more = mask_p & (t + 1 < t1)
        s_e_next = tl.load(se_ptrs + g_next, mask=more, other=0.0)
        s_o_next = tl.load(se_ptrs + stride_sn + g_next, mask=more, other=0.0)
        z_e_next, z_o_next = _load_zeros(ze_ptrs, stride_zn, g_next, more, HAS_ZERO)
        p = tl.load(w_ptrs + k0, mask=mask_p[:, None], other=0)
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        c_e = z_e + base
        c_o = z_o + base
        if USE_ASM:
            shape: tl.constexpr = (HALF, BK)
            w_e = _dequant_asm(
                p,
                tl.broadcast_to(c_e.to(x.dtype)[:, None], shape),
                tl.broadcast_to(s_e.to(x.dtype)[:, None], shape),
                False,
                BF16,
            )
            w_o = _dequant_asm(
                p,
                tl.broadcast_to(c_o.to(x.dtype)[:, None], shape),
                tl.broadcast_to(s_o.to(x.dtype)[:, None], shape),
                True,
                BF16,
            )
        else:
            q = p.to(tl.int32)
            lo = ((q & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True)
            hi = (((q >> 4) & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True)
            w_e = ((lo - c_e[:, None]) * s_e.to(tl.float32)[:, None]).to(x.dtype)
            w_o = ((hi - c_o[:, None]) * s_o.to(tl.float32)[:, None]).to(x.dtype)
        if DOT_F32:  # CPU interpreter: bf16 dots are wrong there (see interpreter_bf16)
            x = x.to(tl.float32)
            w_e = w_e.to(tl.float32)
            w_o = w_o.to(tl.float32)
        if XL:  # x on the left, the weights through shared memory: acc [BM, BN/2]
            acc_e = tl.dot(x, tl.trans(w_e), acc_e)
            acc_o = tl.dot(x, tl.trans(w_o), acc_o)
        else:
            xt = tl.trans(x)
            acc_e = tl.dot(w_e, xt, acc_e)
            acc_o = tl.dot(w_o, xt, acc_o)
        s_e = s_e_next
        s_o = s_o_next
        z_e = z_e_next
        z_o = z_o_next

    # [HALF, BM] x 2 -> [BM, HALF, 2] -> [BM, BN]: column 2p + j of the output tile.
    if XL:
        acc = tl.reshape(tl.join(acc_e, acc_o), (BM, BN))
    else:
        acc = tl.reshape(tl.permute(tl.join(acc_e, acc_o), (1, 0, 2)), (BM, BN))
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if PARTIAL:
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

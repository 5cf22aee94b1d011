"""Fused elementwise kernels of a decoder layer's step: one launch where torch needs several.

Inside a CUDA-graph decode step at small batch the GEMMs are short and every elementwise torch op
is its own kernel (RMSNorm alone is seven). These Triton kernels compute the same values, rounding
to the activation dtype where the torch code rounds, so the engine's numerics do not move:

  rms_norm(x, w, eps, residual)   residual add (optional) + HF RMSNorm: float32 statistics,
                                  normalized value cast to the dtype, then times w in the dtype
  rms_norm_quant(x, w, eps, ...)  rms_norm, then the static int8 / e4m3 quantization of its output
                                  (the next linear's input), in one launch
  rope_qk_(qkv, cos, sin, ...)    GPT-NeoX rotary on the q and k parts of a fused qkv, in place
  silu_mul(gu)                    silu(g) * u of a fused [T, 2I] gate|up output
  kv_write(...)                   K and V rows into the paged pools, quantized (int8 / fp8) or cast
  rope_kv_write_(qkv, ...)        rope_qk_ and kv_write in one launch: q rotated in place, k
                                  rotated (in place too) and written with v into the pools

Each has a torch reference (`ref_*`) the tests compare it with; on CPU the kernels run under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - CPU installs without triton use the references
    triton = None

FP8_MAX = 448.0


def ref_rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * norm(s), s) with s = x + residual (or x); x, residual [T, C], w [C], one dtype."""
    s = x if residual is None else x + residual
    sf = s.float()
    sf = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    return w * sf.to(s.dtype), s


def ref_rope_qk_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, nkv: int, d: int
) -> None:
    """Rotate q (the first nq heads) and k (the next nkv) of qkv [T, (nq + 2 nkv) d] in place;
    cos, sin [T, d] in qkv's dtype."""
    for start, heads in ((0, nq), (nq * d, nkv)):
        x = qkv[:, start : start + heads * d].view(-1, heads, d)
        a, b = x.chunk(2, dim=-1)
        rot = torch.cat((-b, a), dim=-1)
        x.copy_(x * cos[:, None] + rot * sin[:, None])


def ref_silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for gu = [g | u] [T, 2I] -> [T, I]."""
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def ref_encode(x: torch.Tensor, storage: str, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The cache write's conversion of x: int8 round-half-even + saturate, fp8 saturate, or cast."""
    if storage == "int8":
        return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)
    if storage == "fp8":
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


if triton is not None:

    @triton.jit
    def _norm_row(x_ptr, r_ptr, w_ptr, s_ptr, row, cols, m, C, eps, HAS_RES: tl.constexpr):
        """One row of w * norm(x + r) in x's dtype; stores x + r into s when HAS_RES."""
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0)
        if HAS_RES:
            x = x + tl.load(r_ptr + row * C + cols, mask=m, other=0.0)  # rounded in the dtype
            tl.store(s_ptr + row * C + cols, x, mask=m)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / C + eps)  # torch.rsqrt: rsqrtf
        y = (xf * rstd).to(x.dtype)
        return tl.load(w_ptr + cols, mask=m, other=0.0) * y

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, C, eps,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        h = _norm_row(x_ptr, r_ptr, w_ptr, s_ptr, row, cols, m, C, eps, HAS_RES)
        tl.store(out_ptr + row * C + cols, h, mask=m)

    @triton.jit
    def _rms_norm_quant_kernel(
        x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, scale_ptr, C, eps,
        HAS_RES: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < C
        h = _norm_row(x_ptr, r_ptr, w_ptr, s_ptr, row, cols, m, C, eps, HAS_RES).to(tl.float32)
        scale = tl.load(scale_ptr)
        if MODE == 1:  # int8: round(h / s) half to even, saturated (reference.quantize_int8_act)
            v = tl.clamp(tl.math.div_rn(h, tl.zeros_like(h) + scale), -128.0, 127.0)
            q = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        else:  # e4m3: h * (1 / s), saturated (reference.quantize_fp8_act)
            q = tl.clamp(h * tl.math.div_rn(tl.full([], 1.0, tl.float32), scale), -448.0, 448.0)
            q = q.to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * C + cols, q, mask=m)

    @triton.jit
    def _rotate(a, b, cos_row, sin_row, i, half: tl.constexpr):
        """(a, b) halves of one head -> rotated halves: x * cos + rotate_half(x) * sin."""
        c1 = tl.load(cos_row + i)
        c2 = tl.load(cos_row + half + i)
        s1 = tl.load(sin_row + i)
        s2 = tl.load(sin_row + half + i)
        # torch: each product rounded to the dtype, then the sum. Products of two fp16/bf16
        # values are exact in fp32, so rounding each one to the dtype is torch's rounding, and
        # the casts keep the compiler from contracting into an FMA.
        f32 = tl.float32
        p1 = (a.to(f32) * c1.to(f32)).to(a.dtype).to(f32)
        p2 = (-(b.to(f32)) * s1.to(f32)).to(a.dtype).to(f32)
        p3 = (b.to(f32) * c2.to(f32)).to(a.dtype).to(f32)
        p4 = (a.to(f32) * s2.to(f32)).to(a.dtype).to(f32)
        return (p1 + p2).to(a.dtype), (p3 + p4).to(a.dtype)

    @triton.jit
    def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, stride, NQ, NKV, D: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)  # 0 .. NQ + NKV - 1: q heads, then k heads
        half: tl.constexpr = D // 2
        i = tl.arange(0, half)
        base = qkv_ptr + t * stride + h * D
        a, b = _rotate(tl.load(base + i), tl.load(base + half + i), cos_ptr + t * D,
                       sin_ptr + t * D, i, half)  # fmt: skip
        tl.store(base + i, a)
        tl.store(base + half + i, b)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, CUDA_EXP: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        g = tl.load(gu_ptr + row * 2 * inter + cols, mask=m, other=0.0)
        u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        # torch's silu uses expf; tl.exp is the fast ex2.approx (the interpreter: numpy's exp)
        e = libdevice.exp(-gf) if CUDA_EXP else tl.exp(-gf)
        s = (gf / (1.0 + e)).to(g.dtype)
        tl.store(out_ptr + row * inter + cols, s * u, mask=m)

    @triton.jit
    def _encode(x, scale, MODE: tl.constexpr, out_ty: tl.constexpr):
        """ref_encode of x: int8 round half to even + saturate, fp8 e4m3 saturate, or a cast."""
        if MODE == 1:  # int8: round half to even, saturate (torch.round, cvt.rni.sat)
            y = tl.math.div_rn(x.to(tl.float32), scale)
            f = tl.floor(y)
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
            up = (y - f > 0.5) | ((y - f == 0.5) & odd)
            r = tl.where(up, f + 1.0, f)
            return tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
        elif MODE == 2:  # fp8 e4m3: saturate, then convert
            y = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), scale), -448.0), 448.0)
            return y.to(out_ty)
        else:
            return x.to(out_ty)

    @triton.jit
    def _kv_write_kernel(
        k_ptr, v_ptr, slots_ptr, kc_ptr, vc_ptr, k_stride, v_stride, scale,
        W: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < W
        slot = tl.load(slots_ptr + t)
        for which in tl.static_range(2):
            src = k_ptr + t * k_stride if which == 0 else v_ptr + t * v_stride
            dst = kc_ptr if which == 0 else vc_ptr
            x = tl.load(src + cols, mask=m, other=0.0)
            tl.store(dst + slot * W + cols, _encode(x, scale, MODE, dst.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kv_write_kernel(
        qkv_ptr, cos_ptr, sin_ptr, slots_ptr, kc_ptr, vc_ptr, stride, scale, NQ, NKV,
        D: tl.constexpr, MODE: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        half: tl.constexpr = D // 2
        i = tl.arange(0, half)
        base = qkv_ptr + t * stride + h * D
        a = tl.load(base + i)
        b = tl.load(base + half + i)
        if h < NQ + NKV:  # q and k heads: rotated in place
            a, b = _rotate(a, b, cos_ptr + t * D, sin_ptr + t * D, i, half)
            tl.store(base + i, a)
            tl.store(base + half + i, b)
        if h >= NQ:
            slot = tl.load(slots_ptr + t)
            is_k = h < NQ + NKV
            kv_h = tl.where(is_k, h - NQ, h - NQ - NKV)
            off = slot * NKV * D + kv_h * D
            if is_k:
                tl.store(kc_ptr + off + i, _encode(a, scale, MODE, kc_ptr.dtype.element_ty))
                tl.store(kc_ptr + off + half + i, _encode(b, scale, MODE, kc_ptr.dtype.element_ty))
            else:
                tl.store(vc_ptr + off + i, _encode(a, scale, MODE, vc_ptr.dtype.element_ty))
                tl.store(vc_ptr + off + half + i, _encode(b, scale, MODE, vc_ptr.dtype.element_ty))


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve x (a CUDA tensor and triton importable)."""
    return triton is not None and x.is_cuda


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ref_rms_norm: (normed [T, C], x + residual [T, C] or x)."""
    assert triton is not None
    t, c = x.shape
    out = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(c)
    _rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, w, out, s, c, eps,
        HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out, s


def ref_rms_norm_quant(
    x: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    scale: torch.Tensor,
    storage: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 / e4m3 [T, C] of ref_rms_norm's output at the static scale, x + residual)."""
    from quantlab.kernels.reference import quantize_fp8_act, quantize_int8_act

    h, s = ref_rms_norm(x, w, eps, residual)
    if storage == "int8":
        return quantize_int8_act(h, scale)[0], s
    return quantize_fp8_act(h, "tensor", scale)[0], s


def rms_norm_quant(
    x: torch.Tensor,
    w: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    scale: torch.Tensor,
    storage: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ref_rms_norm_quant: storage 'int8' or 'fp8'; scale fp32 (one element)."""
    assert triton is not None
    t, c = x.shape
    dtype = torch.int8 if storage == "int8" else torch.float8_e4m3fn
    q = torch.empty((t, c), dtype=dtype, device=x.device)
    s = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(c)
    _rms_norm_quant_kernel[(t,)](
        x, residual if residual is not None else x, w, q, s, scale, c, eps,
        HAS_RES=residual is not None, MODE=1 if storage == "int8" else 2, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return q, s


def rope_qk_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, nkv: int, d: int
) -> None:
    """Triton ref_rope_qk_ (in place; qkv rows contiguous, cos/sin [T, d] contiguous)."""
    assert triton is not None and qkv.stride(1) == 1
    _rope_kernel[(qkv.shape[0], nq + nkv)](qkv, cos, sin, qkv.stride(0), nq, nkv, D=d)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """Triton ref_silu_mul."""
    assert triton is not None
    t, two_i = gu.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gu.dtype, device=gu.device)
    block = 1024
    grid = (t, triton.cdiv(inter, block))
    _silu_mul_kernel[grid](gu.contiguous(), out, inter, BLOCK=block, CUDA_EXP=gu.is_cuda)
    return out


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    storage: str,
    scale: float,
) -> None:
    """Store k, v [T, H_kv, D] (rows may be strided views of a fused qkv) at flat slots [T] of
    the pools [num_blocks, block_size, H_kv, D], converted as ref_encode."""
    assert triton is not None
    t, h, d = k.shape
    mode = {"int8": 1, "fp8": 2}.get(storage, 0)
    width = h * d
    _kv_write_kernel[(t,)](
        k, v, slots, k_pool, v_pool, k.stride(0), v.stride(0), float(scale),
        W=width, MODE=mode, BLOCK=triton.next_power_of_2(width),
    )  # fmt: skip


def rope_kv_write_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    nq: int,
    nkv: int,
    d: int,
    slots: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    storage: str,
    scale: float,
) -> None:
    """rope_qk_ then kv_write of the k and v heads of qkv [T, (nq + 2 nkv) d], in one launch.

    qkv rows contiguous, cos/sin [T, d] contiguous; pools [num_blocks, block_size, nkv, d]."""
    assert triton is not None and qkv.stride(1) == 1
    mode = {"int8": 1, "fp8": 2}.get(storage, 0)
    _rope_kv_write_kernel[(qkv.shape[0], nq + 2 * nkv)](
        qkv, cos, sin, slots, k_pool, v_pool, qkv.stride(0), float(scale), nq, nkv, D=d, MODE=mode,
    )  # fmt: skip

"""Torch reference GEMMs: dequantize-then-matmul for every kernel format; the ground truth.

Formats (weights W [N, K], activations x [..., K] fp16/bf16, output [..., N] in x's dtype):
  W4A16 sym : qweight int8 [N // 2, K] (pack_int4_rows of q in [-8, 7]), scales [N, K // G];
              w = q * s.
  W4A16 asym: qweight from pack_int4_asym (codes u in [0, 15] stored as u - 8), scales [N, K // G],
              zeros uint8 [N, K // G] integer zero point in [0, 15]; w = (u - z) * s.
  W8A16     : qweight int8 [N, K], scales [N]; w = q * s.
  FP8 W8A8  : weight float8_e4m3fn [N, K], weight_scale fp32 [1] or [N]; activations quantized
              to e4m3 per tensor or per row (see quantize_fp8_act); y = (xq * sx) @ (wq * sw)^T.
Scales may be fp16, bf16 or fp32; the math here runs in float32 (or float64 when asked).
"""

from __future__ import annotations

import torch
from quantlab.kernels.packing import ASYM_OFFSET, unpack_int4_rows

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def dequant_w4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize W4 (qweight int8 [N/2, K], scales [N, K/G], zeros uint8 [N, K/G] or None) to [N, K]."""
    q = unpack_int4_rows(qweight).to(dtype)
    n, k = q.shape
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales must be [{n}, {k // group_size}], got {tuple(scales.shape)}")
    if zeros is not None:
        q = q - (zeros.to(dtype) - ASYM_OFFSET).repeat_interleave(group_size, dim=1)
    return q * scales.to(dtype).repeat_interleave(group_size, dim=1)


def dequant_w8(
    qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize W8 per-channel (qweight int8 [N, K], scales [N]) to [N, K]."""
    return qweight.to(dtype) * scales.to(dtype).reshape(-1, 1)


def dequant_w8_group(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize W8 group-wise (qweight int8 [N, K], scales [N, K/G], zeros int8 [N, K/G] | None)
    to (q - zp) * s [N, K], computed in fp32 (float64 if asked) and rounded once to dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = qweight.to(acc)
    if zeros is not None:
        q = q - zeros.to(acc).repeat_interleave(group_size, dim=1)
    return (q * scales.to(acc).repeat_interleave(group_size, dim=1)).to(dtype)


def quantize_fp8_act(
    x: torch.Tensor, granularity: str, x_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [M, K] to e4m3: returns (xq [M, K], scale fp32 [1, 1] per tensor or [M, 1] per row).

    Dynamic scales are amax * fp32(1 / 448), and the codes are x * (1 / scale) with the
    reciprocal rounded once: products and one IEEE division, so CPU, CUDA and the Triton
    quantizer round them identically (a division per element would cost the GPU kernel twice
    its time)."""
    if x_scale is not None:
        scale = x_scale.float().reshape(1, 1)
    elif granularity == "tensor":
        scale = (x.abs().amax().float() * (1.0 / FP8_MAX)).clamp(min=1e-12).reshape(1, 1)
    elif granularity == "row":
        scale = (x.abs().amax(dim=1, keepdim=True).float() * (1.0 / FP8_MAX)).clamp(min=1e-12)
    else:
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    xq = (x.float() * torch.reciprocal(scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype)


def ref_linear_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant_w4(...)^T (+ bias [N]) in compute_dtype, returned in x's dtype."""
    w = dequant_w4(qweight, scales, zeros, group_size, compute_dtype)
    y = x.to(compute_dtype) @ w.t()
    return _finish(y, bias, x.dtype if compute_dtype != torch.float64 else torch.float64)


def ref_linear_w8a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant_w8(...)^T (+ bias [N]) in compute_dtype, returned in x's dtype."""
    y = x.to(compute_dtype) @ dequant_w8(qweight, scales, compute_dtype).t()
    return _finish(y, bias, x.dtype if compute_dtype != torch.float64 else torch.float64)


def ref_linear_w8a16_group(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant_w8_group(...)^T (+ bias [N]) in compute_dtype, in x's dtype."""
    w = dequant_w8_group(qweight, scales, zeros, group_size, compute_dtype)
    y = x.to(compute_dtype) @ w.t()
    return _finish(y, bias, x.dtype if compute_dtype != torch.float64 else torch.float64)


def ref_linear_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    granularity: str = "tensor",
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y [M, N] from x [M, K] quantized to e4m3 and weight e4m3 [N, K] with weight_scale [1] or [N]."""
    xq, sx = quantize_fp8_act(x, granularity, x_scale)
    out = x.dtype if compute_dtype != torch.float64 else torch.float64
    return ref_fp8_from_codes(xq, sx, weight, weight_scale, bias, out, compute_dtype)


def ref_fp8_from_codes(
    xq: torch.Tensor,
    sx: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[M, N] in dtype from e4m3 codes xq [M, K] with scale sx [1, 1] or [M, 1] (ref_linear_fp8
    after its quantization)."""
    w = weight.to(compute_dtype) * weight_scale.to(compute_dtype).reshape(-1, 1)
    y = (xq.to(compute_dtype) * sx.to(compute_dtype)) @ w.t()
    return _finish(y, bias, dtype)


INT8_MAX = 127.0


def quantize_int8_act(
    x: torch.Tensor, x_scale: torch.Tensor | None, pre: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (* pre [K] in x's dtype) -> (codes int8 [M, K], scale fp32 [1, 1] or [M, 1]).

    Per token: s = amax / 127 (1 for a zero row); static: the checkpoint's scale. Codes are
    round(x / s) half to even, saturated to [-128, 127]: the simulated QuantLinear's rule
    (primitives.fake_quant / fake_quant_static).
    """
    if pre is not None:
        x = x * pre.to(x.dtype)
    if x_scale is not None:
        s = x_scale.float().reshape(1, 1)
    else:
        s = x.abs().amax(dim=1, keepdim=True).float() / INT8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x.float() / s).clamp(-128, 127).to(torch.int8)
    return q, s


def ref_linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothQuant W8A8: y [M, N] in x's dtype from x [M, K] and int8 qweight [N, K].

    The product of the codes is exact (float64 holds every int32 sum); then (acc * sx) * sw
    (+ bias) in fp32.
    weight_scale fp32 [1] or [N]; x_scale a static scale or None (per token); pre [K] or None.
    """
    xq, sx = quantize_int8_act(x, x_scale, pre)
    return ref_w8a8_from_codes(xq, sx, qweight, weight_scale, bias, x.dtype)


def ref_w8a8_from_codes(
    xq: torch.Tensor,
    sx: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[M, N] in dtype from int8 codes xq [M, K] with scale sx [1, 1] or [M, 1] (ref_linear_w8a8
    after its quantization)."""
    acc = xq.double() @ qweight.double().t()
    y = acc.float() * sx * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)

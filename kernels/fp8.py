"""FP8 W8A8 GEMM through torch._scaled_mm (cuBLASLt), per-tensor or rowwise scales.

Activations are quantized on the fly (dynamic amax) unless a static per-tensor x_scale is given
(one Triton pass on CUDA). Rowwise: one scale per activation row [M, 1] and per weight row
[1, N]; cuBLASLt's rowwise path only writes bf16, so fp16 callers get a cast. fast_accum lets
the FP8 tensor cores accumulate without promoting partial sums to full fp32 (faster, less exact:
the benchmark's fp64 check measures how much).
"""

from __future__ import annotations

import torch
from quantlab.kernels.reference import quantize_fp8_act


def _quant_rows_triton(
    x: torch.Tensor, one_pass: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of x [M, K] fp16/bf16 in one launch: (xq [M, K], scale [M, 1]).

    one_pass: None picks by K (one read of each row up to ONE_PASS_MAX_K); False forces the
    two-pass loop (the benchmark compares both)."""
    import triton
    from quantlab.kernels.triton_fp8_quant import ONE_PASS_MAX_K, quant_rows_kernel

    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if one_pass is None:
        one_pass = k <= ONE_PASS_MAX_K
    elif one_pass and k > ONE_PASS_MAX_K:
        raise ValueError(f"one-pass row quantization holds K <= {ONE_PASS_MAX_K}, got K={k}")
    block = triton.next_power_of_2(k) if one_pass else 4096
    warps = min(16, max(4, block // 1024)) if one_pass else 8
    quant_rows_kernel[(m,)](x, xq, scale, k, x.stride(0), BLOCK=block, ONE_PASS=one_pass,
                            num_warps=warps)  # fmt: skip
    return xq, scale


def _quant_tensor_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic e4m3 quantization of x [M, K] fp16/bf16 (contiguous) in two passes
    (amax, then scale + cast): (xq e4m3 [M, K], scale fp32 [1, 1])."""
    from quantlab.kernels.triton_fp8_quant import amax_kernel, quant_tensor_kernel

    amax = torch.zeros(1, dtype=torch.int32, device=x.device)
    scale = torch.empty((1, 1), dtype=torch.float32, device=x.device)
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n, block = x.numel(), 4096
    grid = (max(1, -(-n // block)),)
    amax_kernel[grid](x, amax, n, BLOCK=block)
    quant_tensor_kernel[grid](x, xq, amax, scale, n, BLOCK=block)
    return xq, scale


def _quant_static_triton(
    x: torch.Tensor, x_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16 (contiguous) / static scale -> (xq e4m3 [M, K], scale fp32 [1, 1])."""
    from quantlab.kernels.triton_fp8_quant import quant_static_kernel

    scale = x_scale.float().reshape(1, 1)
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    block = 4096
    quant_static_kernel[(-(-x.numel() // block),)](x, xq, scale, x.numel(), BLOCK=block)
    return xq, scale


def fp8_scaled_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    granularity: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    """x [M, K] fp16/bf16, weight e4m3 [N, K], weight_scale fp32 [1] or [N] -> [M, N] in x's dtype."""
    if granularity == "row" and x_scale is None and x.is_cuda:
        # torch ops need ~5 passes over x (abs, amax, div, clamp, cast); run 2 measured 1.45x
        # vs cuBLAS for the dynamic path against 1.88x for the GEMM alone (28672x8192, M=1024).
        xq, sx = _quant_rows_triton(x)
    elif x_scale is not None and x.is_cuda and x.is_contiguous():
        xq, sx = _quant_static_triton(x, x_scale)
    elif granularity == "tensor" and x.is_cuda and x.is_contiguous():
        xq, sx = _quant_tensor_triton(x)  # torch ops would take ~8 passes and an fp32 copy
    else:
        xq, sx = quantize_fp8_act(x, granularity, x_scale)
    return fp8_mm_codes(xq, sx, weight, weight_scale, bias, granularity, x.dtype, fast_accum)


def fp8_mm_codes(
    xq: torch.Tensor,
    sx: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    """[M, N] in out_dtype from quantized activations xq e4m3 [M, K] with scale sx fp32 [1, 1]
    (per tensor) or [M, 1] (per row), and weight e4m3 [N, K] with weight_scale [1] or [N]."""
    wt = weight.t()  # [K, N] column-major view: the layout cuBLASLt wants for the second operand
    if granularity == "tensor":
        if weight_scale.numel() != 1:
            raise ValueError("granularity='tensor' needs a single weight scale; use 'row' for [N]")
        return torch._scaled_mm(
            xq,
            wt,
            scale_a=sx.reshape(()),
            scale_b=weight_scale.float().reshape(()),
            bias=bias,
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
    sw = weight_scale.float().reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    y = torch._scaled_mm(
        xq, wt, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast_accum
    )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)

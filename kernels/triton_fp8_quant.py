"""Triton e4m3 activation quantization: per-row dynamic (one read of each row when it fits one
block, K <= ONE_PASS_MAX_K; else two passes: amax, then scale + cast) and per-tensor static (one
pass: scale, clamp, cast). The row scale is amax * fp32(1 / 448) and the codes are
x * (1 / scale), the reciprocal taken once per row with an IEEE division (tl.math.div_rn;
Triton's plain fp32 `/` is approximate and misrounded a few codes in GPU run 36): the products
and the one division that reference.quantize_fp8_act forms on CPU and CUDA alike, so the codes
match it bit for bit. (Runs 36-54 divided every element with div_rn, which made the kernel
about twice as slow; probe run 57.)"""

from __future__ import annotations

import triton
import triton.language as tl

# rows up to this K are read once (held in registers: 32-64 values per thread at 4-16 warps)
ONE_PASS_MAX_K = 32768


@triton.jit
def _scale_of(amax):
    """fp32 scale of a row's or tensor's amax: max(amax * fp32(1 / 448), 1e-12)."""
    return tl.maximum(amax * (1.0 / 448.0), 1e-12)


@triton.jit
def _codes(v, scale):
    """clamp(v * (1 / scale), +-448) in fp32 (v fp32), the reciprocal rounded once by an IEEE
    division: the definition reference.quantize_fp8_act shares, bit for bit."""
    return tl.clamp(v * tl.math.div_rn(tl.full([], 1.0, tl.float32), scale), -448.0, 448.0)


@triton.jit
def quant_rows_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_xm, BLOCK: tl.constexpr,
                      ONE_PASS: tl.constexpr):  # fmt: skip
    """Row m of x [M, K] -> xq [M, K] e4m3 and scale [M, 1] fp32 = max(amax * (1 / 448), 1e-12).

    ONE_PASS (BLOCK >= K): the row is loaded once and kept in registers; else it is read twice.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(v), axis=0))
        tl.store(scale_ptr + row, scale)
        q = _codes(v, scale)
        tl.store(xq_ptr + row * K + offs, q.to(xq_ptr.dtype.element_ty), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        scale = _scale_of(tl.max(amax, axis=0))
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            q = _codes(v.to(tl.float32), scale)
            tl.store(
                xq_ptr + row * K + k0 + offs, q.to(xq_ptr.dtype.element_ty), mask=k0 + offs < K
            )


@triton.jit
def quant_static_kernel(x_ptr, xq_ptr, scale_ptr, n_elem, BLOCK: tl.constexpr):
    """x flat [n_elem] -> xq e4m3 = clamp(x * (1 / scale), +-448), one fp32 scale (scale_ptr [1])."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _codes(v, tl.load(scale_ptr))
    tl.store(xq_ptr + offs, q.to(xq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def amax_kernel(x_ptr, amax_ptr, n_elem, BLOCK: tl.constexpr):
    """max |x| of x flat [n_elem] into amax_ptr (int32 [1], zeroed before): each block adds its
    maximum with one atomic max on the fp32 bits (non-negative floats order as their bits do)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n_elem, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(v), axis=0).to(tl.int32, bitcast=True))


@triton.jit
def quant_tensor_kernel(x_ptr, xq_ptr, amax_ptr, scale_ptr, n_elem, BLOCK: tl.constexpr):
    """Per-tensor dynamic: scale = max(amax * (1 / 448), 1e-12) from amax_ptr (amax_kernel's
    int32 bits; block 0 stores it to scale_ptr [1]), xq = clamp(x * (1 / scale), +-448) in e4m3."""
    pid = tl.program_id(0)
    scale = _scale_of(tl.load(amax_ptr).to(tl.float32, bitcast=True))
    if pid == 0:
        tl.store(scale_ptr, scale)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = _codes(v, scale)
    tl.store(xq_ptr + offs, q.to(xq_ptr.dtype.element_ty), mask=mask)

"""Triton kernels against the fp64 reference on CPU through TRITON_INTERPRET=1 (small odd shapes).

Every W4A16 format (group 32/64/128, sym/asym, fp16/bf16) and every forced path, W8A16 on every
path, and the split-K reduce, with fresh random inputs, NaN-poisoned outputs and workspaces, and
per-dtype norm-wise tolerances (output rounding alone gives ~3e-4 in fp16 and ~3e-3 in bf16).
Known Triton 3.6 interpreter gaps, worked around here and covered by the GPU script instead:
bf16 tl.dot runs in fp32 under the interpreter (see triton_w4a16.interpreter_bf16), and
range() over a runtime bound fails with numpy >= 2.4 (patched in conftest, test processes only).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests run on CPU-only machines", allow_module_level=True)
# Must be set before triton is first imported (its knobs read it then), and so before the
# kernels are decorated.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton

if not triton.knobs.runtime.interpret:
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 could be set; run this file alone "
        "or export TRITON_INTERPRET=1",
        allow_module_level=True,
    )

from quantlab.kernels import packing, reference
from quantlab.kernels import triton_w4a16 as t4
from quantlab.kernels import triton_w8a16 as t8
from quantlab.kernels import triton_w8a16_group as t8g

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
MS = (1, 3, 16, 33)
# N, K multiples of the group and not powers of two; K / G = 3 or 6 tiles.
SHAPE = {32: (96, 192), 64: (160, 192), 128: (96, 384)}


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"rel err {err:.2e} >= {TOL[dtype]}"


def _w4(n: int, k: int, g: int, asym: bool, dtype: torch.dtype):
    scale = (torch.rand(n, k // g) * 0.02 + 0.005).to(dtype)
    if asym:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        return packing.w4_from_codes(
            codes, scale, torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
        )
    return packing.w4_from_codes(torch.randint(-8, 8, (n, k), dtype=torch.int8), scale)


@pytest.mark.parametrize("path", t4.BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_w4a16_every_format(path: str, m: int) -> None:
    if path == "gemv" and m > 4:
        pytest.skip("gemv serves M <= 4")
    for g, (n, k) in SHAPE.items():
        for asym in (False, True):
            for dtype in (torch.float16, torch.bfloat16):
                qw, s, z = _w4(n, k, g, asym, dtype)
                x = torch.randn(m, k).to(dtype)
                bias = torch.randn(n).to(dtype) if asym else None
                # first config for fp16, last for bf16 (the last ones split K: covers the reduce)
                plans = t4.candidates(m, g, path)
                plan = plans[0] if dtype == torch.float16 else plans[-1]
                y = t4.run_plan(plan, x, qw, s, z, g, bias, fill=math.nan)
                ref = reference.ref_linear_w4a16(x, qw, s, z, g, bias, torch.float64)
                _check(y, ref, dtype)


@pytest.mark.parametrize("path", t8.BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_w8a16(path: str, m: int) -> None:
    if path == "gemv" and m > 4:
        pytest.skip("gemv serves M <= 4")
    n, k = 96, 320  # K not a multiple of 128: exercises the K mask
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = (torch.rand(n) * 0.002 + 0.0005).to(dtype)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n).to(dtype)
        for plan in {t8.candidates(m, path)[0], t8.candidates(m, path)[-1]}:
            y = t8.run_plan(plan, x, q, s, bias, fill=math.nan)
            _check(y, reference.ref_linear_w8a16(x, q, s, bias, torch.float64), dtype)


@pytest.mark.parametrize("path", t8g.BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_w8a16_group_every_format(path: str, m: int) -> None:
    """Group-wise int8 (W8A16_GPTQ): groups 32/64/128, symmetric and with int8 zero points."""
    if path == "gemv" and m > 4:
        pytest.skip("gemv serves M <= 4")
    for g, (n, k) in SHAPE.items():
        for asym in (False, True):
            for dtype in (torch.float16, torch.bfloat16):
                q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
                s = (torch.rand(n, k // g) * 0.002 + 0.0005).to(dtype)
                z = torch.randint(-20, 21, (n, k // g), dtype=torch.int8) if asym else None
                x = torch.randn(m, k).to(dtype)
                bias = torch.randn(n).to(dtype) if asym else None
                plans = t8g.candidates(m, g, path)
                assert all(p.backend == "dequant" or g % p.get("BK") == 0 for p in plans)
                plan = plans[0] if dtype == torch.float16 else plans[-1]
                y = t8g.run_plan(plan, x, q, s, z, g, bias, fill=math.nan)
                ref = reference.ref_linear_w8a16_group(x, q, s, z, g, bias, torch.float64)
                _check(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8_dequant_matches_torch_exactly(dtype: torch.dtype) -> None:
    # One-pass dequantization (the 'dequant' plan's first step) against q * s computed in fp32
    # and rounded once; N, K not multiples of the kernel's 32 x 256 tile; fp32 scales too.
    # fp16: bit-identical. bf16: the Triton 3.6 interpreter truncates fp32 -> bf16 instead of
    # rounding to nearest, so here within one bf16 ulp (the GPU test requires bit equality).
    n, k = 70, 300
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    for s in ((torch.rand(n) * 0.01).to(dtype), torch.rand(n) * 0.01):
        w = t8.dequant_w8(q, s, dtype, fill=math.nan)
        exact = q.float() * s.float().reshape(-1, 1)
        if dtype == torch.float16:
            assert torch.equal(w, exact.to(dtype))
        else:
            ulp = exact.abs() * 2.0**-7  # bf16 spacing is at most 2^-7 of the value
            assert bool(((w.float() - exact).abs() <= ulp).all())
            assert not torch.equal(w, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swap_every_large_plan_both_orientations(dtype: torch.dtype) -> None:
    # Every large-M "swap" plan (weights on the left, XL = 0, and x on the left, XL = 1) against
    # fp64, asymmetric with bias; M = 33 leaves a partial row tile, N = 160 a partial BN tile.
    n, k, g = 160, 192, 64
    qw, s, z = _w4(n, k, g, True, dtype)
    x = torch.randn(33, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = reference.ref_linear_w4a16(x, qw, s, z, g, bias, torch.float64)
    plans = [
        p for p in t4.candidates(33, g, "swap") if p.get("SPLIT_K") == 1 and p.get("BM") >= 128
    ]
    assert {p.get("XL") for p in plans} == {0, 1}
    for plan in plans:
        _check(t4.run_plan(plan, x, qw, s, z, g, bias, fill=math.nan), ref, dtype)


def test_split_k_partials_sum_to_the_unsplit_result() -> None:
    n, k, g = 96, 384, 32
    qw, s, _ = _w4(n, k, g, False, torch.float16)
    x = torch.randn(5, k).half()
    one = t4.plan("splitk", BM=16, BN=32, BK=32, SPLIT_K=1, GROUP_M=1, num_warps=4, num_stages=2)
    many = t4.plan("splitk", BM=16, BN=32, BK=32, SPLIT_K=5, GROUP_M=1, num_warps=4, num_stages=2)
    a = t4.run_plan(one, x, qw, s, None, g, None, fill=math.nan)
    b = t4.run_plan(many, x, qw, s, None, g, None, fill=math.nan)  # 12 tiles over 5 splits
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_forced_paths_through_the_dispatch_point() -> None:
    from quantlab.kernels import linear_w4a16, linear_w8a16

    n, k, g = 96, 192, 64
    qw, s, z = _w4(n, k, g, True, torch.bfloat16)
    x = torch.randn(2, 3, k).to(torch.bfloat16)
    ref = reference.ref_linear_w4a16(x.reshape(6, k), qw, s, z, g, None, torch.float64)
    for path in t4.BACKENDS:
        if path == "gemv":
            continue  # 6 rows
        _check(linear_w4a16(x, qw, s, z, g, backend=path).reshape(6, n), ref, torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n).to(torch.bfloat16) * 1e-3
    ref8 = reference.ref_linear_w8a16(x.reshape(6, k), q, s8, None, torch.float64)
    _check(linear_w8a16(x, q, s8, backend="splitk").reshape(6, n), ref8, torch.bfloat16)


def test_fp8_tensor_quant_scale_matches_the_reference() -> None:
    """The per-tensor dynamic quantizer (amax by atomic max over blocks, then scale + cast) finds
    the reference's scale exactly, with the tensor's largest |x| (negative) in the last, partial
    block of 4096; codes are checked bit for bit on the GPU only (see below)."""
    from quantlab.kernels import fp8

    x = (torch.randn(7, 1300) * 3).to(torch.bfloat16)  # 9100 values: 3 blocks, the last partial
    x[6, 1290] = -650.0
    xq, sx = fp8._quant_tensor_triton(x)
    _, rs = reference.quantize_fp8_act(x, "tensor")
    assert xq.shape == x.shape and xq.dtype == torch.float8_e4m3fn
    assert sx.shape == (1, 1) and torch.equal(sx, rs)
    assert float(xq.float().abs().max()) == 448.0  # the largest value maps to the top code


@pytest.mark.parametrize("k", [1000, 40000])
def test_fp8_row_quant_scales_one_and_two_pass(k: int) -> None:
    """The per-row e4m3 quantizer's scales (amax / 448) match the reference exactly on the
    one-pass (K = 1000) and two-pass (K = 40000 > ONE_PASS_MAX_K) paths, outlier in the last
    block. Codes are checked bit for bit on the GPU only: the interpreter's e4m3 cast misrounds."""
    from quantlab.kernels import fp8
    from quantlab.kernels.triton_fp8_quant import ONE_PASS_MAX_K

    assert (k <= ONE_PASS_MAX_K) == (k == 1000)
    x = (torch.randn(3, k) * 3).to(torch.bfloat16)
    x[1, k - 3] = 700.0
    xq, sx = fp8._quant_rows_triton(x)
    _, rs = reference.quantize_fp8_act(x, "row")
    assert xq.shape == (3, k) and xq.dtype == torch.float8_e4m3fn
    assert torch.equal(sx, rs)

"""GPU tests of the CUDA kernels (cuda_gemv, cuda_mma W4A16 and W8A16, cutlass_w4) against fp64.

Odd shapes (N, K multiples of G but not powers of two, plus an N whose packed rows do not fill
the last 8-row tile), every group size, fp16/bf16, sym/asym, M in 1, 3, 4 (and 8), every compiled
plan, NaN-poisoned outputs. Norm-wise tolerance 1e-2: exact int4 x activation products with fp32
sums leave only the output rounding (~3e-4 fp16, ~2e-3 bf16), so an indexing or layout bug
(errors ~1) fails it.
"""

from __future__ import annotations

import math

import pytest
import torch
from quantlab.kernels import KernelArgumentError, linear_w4a16, linear_w8a16, packing, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = 1e-2


def _w4(n: int, k: int, g: int, asym: bool, dtype: torch.dtype):
    scale = (torch.rand(n, k // g, device="cuda") * 0.02 + 0.005).to(dtype)
    if asym:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        zero = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, device="cuda")
        return packing.w4_from_codes(codes, scale, zero)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    return packing.w4_from_codes(codes, scale)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert bool(torch.isfinite(y).all()), "unwritten (NaN-poisoned) or non-finite outputs"
    return float((y.double() - ref).norm() / ref.norm())


def _capture_and_replay(f, static_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Capture f(static_x) in a CUDA graph, refill static_x with fresh data, replay once;
    returns (the graph's output, the fresh input)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        static_y = f(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    return static_y, new_x


@pytest.fixture(scope="module")
def cg():
    from quantlab.kernels import cuda_gemv

    if not cuda_gemv.available(torch.device("cuda")):
        pytest.fail(f"cuda_gemv did not build: {cuda_gemv._build_error}")
    return cuda_gemv


# (N, K): 19 tiles of 8 packed rows; 1216 = 19 * 64; 1152 = 9 * 128 = 36 * 32; 362 leaves a
# partial last tile (181 packed rows).
SHAPES = [(1216, 1152), (362, 2304)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
def test_every_plan_vs_fp64(cg, shape, g: int, dtype: torch.dtype, asym: bool) -> None:
    n, k = shape
    qw, s, z = _w4(n, k, g, asym, dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if asym else None
    wd = reference.dequant_w4(qw, s, z, g, torch.float64)
    for m in (1, 3, 4, 8):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ wd.t() + (bias.double() if bias is not None else 0)
        for p in cg.candidates(g):
            y = cg.run_plan(p, x, qw, s, z, g, bias, fill=math.nan)
            assert y.shape == (m, n) and y.dtype == dtype
            err = _rel(y, ref)
            assert err < TOL, f"{p} M={m}: rel err {err:.3e}"


@pytest.mark.parametrize("m", [1, 3, 4])
def test_dispatch_forced_and_auto(cg, m: int) -> None:
    """backend='cuda_gemv' through the custom op (fp32 scales, [..., K] input), and 'auto'."""
    n, k, g = 1216, 1152, 128
    qw, s, z = _w4(n, k, g, True, torch.bfloat16)
    s = s.float()
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    ref = reference.ref_linear_w4a16(x[0], qw, s, z, g, None, torch.float64)
    for backend in ("cuda_gemv", "auto"):
        y = linear_w4a16(x, qw, s, z, g, backend=backend)
        assert y.shape == (1, m, n)
        assert _rel(y[0], ref) < TOL


def test_forced_rejects_what_it_cannot_take(cg) -> None:
    qw, s, z = _w4(256, 512, 128, False, torch.float16)
    with pytest.raises(KernelArgumentError, match="M <= 8"):
        linear_w4a16(torch.randn(9, 512, device="cuda").half(), qw, s, z, 128, backend="cuda_gemv")
    # auto still serves M = 9 (Triton), and fp16 scales with bf16 x (Triton fallback)
    x = torch.randn(9, 512, device="cuda", dtype=torch.bfloat16)
    y = linear_w4a16(x, qw, s, z, 128)
    ref = reference.ref_linear_w4a16(x, qw, s, z, 128, None, torch.float64)
    assert _rel(y, ref) < TOL


def test_cuda_graph_replay(cg) -> None:
    n, k, g = 1216, 1152, 64
    qw, s, z = _w4(n, k, g, False, torch.float16)
    static_x = torch.randn(2, k, device="cuda", dtype=torch.float16)
    linear_w4a16(static_x, qw, s, z, g, backend="cuda_gemv")  # build + tune outside capture
    static_y, new_x = _capture_and_replay(
        lambda t: linear_w4a16(t, qw, s, z, g, backend="cuda_gemv"), static_x
    )
    ref = reference.ref_linear_w4a16(new_x, qw, s, z, g, None, torch.float64)
    assert _rel(static_y, ref) < TOL


# ---- cuda_mma (tensor-core kernel, both weight layouts) ----------------------------------------


@pytest.fixture(scope="module")
def cm():
    from quantlab.kernels import cuda_mma

    if not cuda_mma.available(torch.device("cuda")):
        pytest.fail(f"cuda_mma did not build: {cuda_mma._build_error}")
    return cuda_mma


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
def test_mma_every_plan_vs_fp64(cm, shape, g: int, dtype: torch.dtype, asym: bool) -> None:
    """Every compiled plan on the native layout, the checkpoint layout (G 64/128) and the Hopper
    layout (N % 16 == 0; row-major and N-major scales), M from 1 to 100 (grid over M),
    NaN-poisoned outputs; plus the native dequantize kernel."""
    n, k = shape
    qw, s, z = _w4(n, k, g, asym, dtype)
    qn = packing.to_mma_layout(qw)
    bias = torch.randn(n, device="cuda", dtype=dtype) if asym else None
    wd = reference.dequant_w4(qw, s, z, g, torch.float64)
    wq = cm.dequant_native(qn, s, z, g, dtype, fill=math.nan)
    assert torch.equal(wq, wd.to(dtype))
    layouts = [(qn, s), (qw, s)] if g >= 64 else [(qn, s)]
    if n % 16 == 0:
        qh = packing.to_wgmma_layout(qw)
        layouts += [(qh, s), (qh, s.t().contiguous().t())]
    for m in (1, 3, 8, 16, 17, 33, 40, 64, 100):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ wd.t() + (bias.double() if bias is not None else 0)
        for w, sc in layouts:
            for p in cm.candidates(m, packing.is_wgmma_layout(w), z is None):
                y = cm.run_plan(p, x, w, sc, z, g, bias, fill=math.nan)
                assert y.shape == (m, n) and y.dtype == dtype
                err = _rel(y, ref)
                what = f"layout {cm.layout_id(w)} scale strides {sc.stride()}"
                assert err < TOL, f"{p} M={m} {what}: {err:.3e}"


@pytest.mark.parametrize("m", [1, 16, 40, 300])
def test_mma_dispatch_native_auto_and_forced(cm, m: int) -> None:
    """The native layout through linear_w4a16 (auto: cuda_mma plans or dequantize + cuBLAS;
    forced cuda_mma) and the checkpoint layout with forced cuda_mma, [..., K] input."""
    n, k, g = 1216, 1152, 128
    qw, s, z = _w4(n, k, g, True, torch.bfloat16)
    qn = packing.to_mma_layout(qw)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
    ref = reference.ref_linear_w4a16(x[0], qw, s, z, g, None, torch.float64)
    for w, backend in ((qn, "auto"), (qn, "cuda_mma"), (qw, "cuda_mma"), (qw, "auto")):
        y = linear_w4a16(x, w, s, z, g, backend=backend)
        assert y.shape == (1, m, n)
        assert _rel(y[0], ref) < TOL
    # fp32 scales: the kernel refuses them (forced), auto on the native layout dequantizes
    with pytest.raises(KernelArgumentError, match="cuda_mma"):
        linear_w4a16(x, qn, s.float(), z, g, backend="cuda_mma")
    assert _rel(linear_w4a16(x, qn, s.float(), z, g)[0], ref) < TOL


def test_mma_cuda_graph_and_compile(cm) -> None:
    n, k, g = 1216, 1152, 64
    qw, s, z = _w4(n, k, g, False, torch.float16)
    qn = packing.to_mma_layout(qw)
    static_x = torch.randn(5, k, device="cuda", dtype=torch.float16)
    f = torch.compile(lambda t: linear_w4a16(t, qn, s, z, g), fullgraph=True)
    f(static_x)  # build + tune + compile outside capture
    static_y, new_x = _capture_and_replay(f, static_x)
    ref = reference.ref_linear_w4a16(new_x, qw, s, z, g, None, torch.float64)
    assert _rel(static_y, ref) < TOL
    # forced backends trace too (their argument checks skip what dynamo cannot trace)
    for w, backend in ((qn, "cuda_mma"), (qw, "cuda_gemv")):
        f2 = torch.compile(lambda t, w=w, b=backend: linear_w4a16(t, w, s, z, g, backend=b),
                           fullgraph=True)  # fmt: skip
        ref = reference.ref_linear_w4a16(static_x, qw, s, z, g, None, torch.float64)
        assert _rel(f2(static_x), ref) < TOL, backend


@pytest.fixture(scope="module")
def cw():
    from quantlab.kernels import cutlass_w4

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cutlass_w4 needs an sm_90 GPU")
    if not cutlass_w4.available(torch.device("cuda")):
        pytest.fail(f"cutlass_w4 did not build: {cutlass_w4._build_error}")
    return cutlass_w4


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
def test_cutlass_every_config_vs_fp64(cw, g: int, dtype: torch.dtype, asym: bool) -> None:
    """Every compiled configuration of this dtype/zero mode on the Hopper layout, M from 1 to 300
    (partial tiles on both sides: N = 1216 is 9.5 tiles of 128), bias, NaN-poisoned outputs."""
    n, k = 1216, 1152
    qw, s, z = _w4(n, k, g, asym, dtype)
    qh = packing.to_wgmma_layout(qw)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    wd = reference.dequant_w4(qw, s, z, g, torch.float64)
    for m in (1, 7, 64, 100, 300):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ wd.t() + bias.double()
        for p in cw.candidates(dtype, asym, 4096, g):
            y = cw.run_plan(p, x, qh, s, z, g, bias, fill=math.nan)
            assert y.shape == (m, n) and y.dtype == dtype
            err = _rel(y, ref)
            assert err < TOL, f"{p} M={m}: {err:.3e}"


def test_cutlass_dispatch_graph_and_compile(cw) -> None:
    """auto on the Hopper layout (cuda_mma and cutlass_w4 plans), forced cutlass and cuda_mma,
    [..., K] input at M = 1, 16, 50 (the M = 64 bucket, where auto weighs both kernels) and 80,
    fp32 scales, torch.compile + CUDA-graph replay."""
    n, k, g = 1216, 1152, 128
    qw, s, z = _w4(n, k, g, False, torch.bfloat16)
    qh = packing.to_wgmma_layout(qw)
    for m in (1, 16, 50, 80):
        x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16)
        ref = reference.ref_linear_w4a16(x[0], qw, s, z, g, None, torch.float64)
        for backend in ("auto", "cutlass", "cuda_mma"):
            y = linear_w4a16(x, qh, s, z, g, backend=backend)
            assert y.shape == (*x.shape[:-1], n) and _rel(y.reshape(-1, n), ref) < TOL, backend
    x = torch.randn(2, 40, k, device="cuda", dtype=torch.bfloat16)
    ref = reference.ref_linear_w4a16(x.reshape(-1, k), qw, s, z, g, None, torch.float64)
    assert _rel(linear_w4a16(x, qh, s.float(), z, g).reshape(-1, n), ref) < TOL
    with pytest.raises(KernelArgumentError, match="'cutlass' reads the Hopper layout"):
        linear_w4a16(x, qw, s, z, g, backend="cutlass")
    static_x = torch.randn(5, k, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda t: linear_w4a16(t, qh, s, z, g), fullgraph=True)
    f(static_x)
    static_y, new_x = _capture_and_replay(f, static_x)
    assert _rel(static_y, reference.ref_linear_w4a16(new_x, qw, s, z, g, None, torch.float64)) < TOL


@pytest.mark.parametrize("asym", [False, True])
def test_bound_hopper_launch_equals_the_checked_call(cw, asym: bool) -> None:
    """kernels.bind_w4a16 on the Hopper layout gives linear_w4a16's outputs bit for bit (the same
    tuned plan: cuda_mma at small M, cutlass_w4 above), with bias and fp32 scales, at every M of
    a bucket, and its launch replays in a CUDA graph."""
    from quantlab.kernels import bind_w4a16

    n, k, g = 1216, 1152, 128
    qw, s, z = _w4(n, k, g, asym, torch.float16)
    qh = packing.to_wgmma_layout(qw)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    for scales in (s, s.float()):
        for m in (1, 4, 16, 50, 300):  # with m - 1: M buckets 1, 4, 16, 64, 512
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            f = bind_w4a16(x, qh, scales, z, g, bias)
            for mi in (m, max(1, m - 1)):  # another M of the same bucket reuses the binding
                xi = x[:mi]
                assert torch.equal(f(xi), linear_w4a16(xi, qh, scales, z, g, bias)), (m, mi)
    x = torch.randn(5, k, device="cuda", dtype=torch.float16)
    f = bind_w4a16(x, qh, s, z, g, bias)
    f(x)
    static_y, new_x = _capture_and_replay(f, x)
    assert torch.equal(static_y, linear_w4a16(new_x, qh, s, z, g, bias))


# ---- cuda_mma W8A16 (int8 [N, K], per-channel scales) ------------------------------------------

# 1216 = 76 tiles of 16 rows; 360 leaves a half-filled last tile; K = 18 and 36 units of 64.
W8_SHAPES = [(1216, 1152), (360, 2304)]


@pytest.mark.parametrize("shape", W8_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8_mma_every_plan_vs_fp64(cm, shape, dtype: torch.dtype) -> None:
    """Every W8A16 plan, scales in x's dtype (no bias) and fp32 (with bias), the full int8 range
    (-128 included), M from 1 to 40 (grid over M), NaN-poisoned outputs."""
    n, k = shape
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    q[0, :64] = -128  # the extremes, for certain
    q[1, :64] = 127
    s32 = torch.rand(n, device="cuda") * 0.02 + 0.005
    for scales, bias in ((s32.to(dtype), None), (s32, torch.randn(n, device="cuda", dtype=dtype))):
        wd = reference.dequant_w8(q, scales, torch.float64)
        for m in (1, 3, 8, 9, 16, 17, 32, 33, 40):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wd.t() + (bias.double() if bias is not None else 0)
            plans = cm.w8_candidates(m)
            assert plans
            for p in plans:
                y = cm.run_w8_plan(p, x, q, scales, bias, fill=math.nan)
                assert y.shape == (m, n) and y.dtype == dtype
                err = _rel(y, ref)
                assert err < TOL, f"{p} M={m} scales {scales.dtype}: {err:.3e}"


def test_w8_mma_dispatch_graph_and_compile(cm) -> None:
    """linear_w8a16 forced 'cuda_mma' and 'auto' (which tunes the CUDA plans with Triton's up to
    M = 32) on [..., K] input; a K the kernel refuses (forced: a clear error; auto: Triton);
    torch.compile + CUDA-graph replay."""
    n, k = 1216, 1152
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    s = (torch.rand(n, device="cuda") * 0.02 + 0.005).to(torch.bfloat16)
    wd = reference.dequant_w8(q, s, torch.float64)
    for m in (1, 5, 16, 30, 80):
        x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.reshape(-1, k).double() @ wd.t()
        for backend in ("cuda_mma", "auto"):
            y = linear_w8a16(x, q, s, backend=backend)
            assert y.shape == (2, m, n)
            assert _rel(y.reshape(-1, n), ref) < TOL, (backend, m)
    q2 = q[:, :1000].contiguous()  # K = 1000: not a multiple of 64
    x2 = torch.randn(3, 1000, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelArgumentError, match="'cuda_mma' K must be a multiple of 64"):
        linear_w8a16(x2, q2, s, backend="cuda_mma")
    ref2 = x2.double() @ reference.dequant_w8(q2, s, torch.float64).t()
    assert _rel(linear_w8a16(x2, q2, s), ref2) < TOL
    static_x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda t: linear_w8a16(t, q, s), fullgraph=True)
    f(static_x)
    static_y, new_x = _capture_and_replay(f, static_x)
    assert _rel(static_y, new_x.double() @ wd.t()) < TOL
    # a forced backend traces too (its argument check skips what dynamo cannot trace)
    f2 = torch.compile(lambda t: linear_w8a16(t, q, s, backend="cuda_mma"), fullgraph=True)
    assert _rel(f2(static_x), static_x.double() @ wd.t()) < TOL


def test_w8_dequant_exact_on_gpu() -> None:
    """The W8 'dequant' plan's one-pass kernel is bit-identical to q * s in fp32 rounded once
    (fp16 and bf16 out, scales in either dtype or fp32; N, K off the 32 x 256 tile)."""
    from quantlab.kernels import triton_w8a16 as t8

    n, k = 1000, 1300
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        for s in ((torch.rand(n, device="cuda") * 0.01).to(dtype), torch.rand(n, device="cuda")):
            w = t8.dequant_w8(q, s, dtype, fill=math.nan)
            assert torch.equal(w, (q.float() * s.float().reshape(-1, 1)).to(dtype))


# ---- cutlass_w8 (sm_90a mixed-input W8A16 GEMM) ------------------------------------------------


@pytest.fixture(scope="module")
def c8():
    from quantlab.kernels import cutlass_w8

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cutlass_w8 needs an sm_90 GPU")
    if not cutlass_w8.available(torch.device("cuda")):
        pytest.fail(f"cutlass_w8 did not build: {cutlass_w8._build_error}")
    return cutlass_w8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_w8_every_config_vs_fp64(c8, dtype: torch.dtype) -> None:
    """Every configuration (all of them, not only those auto offers for M) at M 1-300 on
    N = 1216 (a partial 128-row tile), K = 1152; scales in x's dtype, and fp32 with bias;
    NaN-poisoned outputs."""
    n, k = 1216, 1152
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    s32 = torch.rand(n, device="cuda") * 0.02 + 0.005
    plans = c8.candidates(dtype, 4096)
    assert len(plans) == 3
    for scales, bias in ((s32.to(dtype), None), (s32, torch.randn(n, device="cuda", dtype=dtype))):
        # the kernel multiplies by the scale in x's dtype: the reference uses the same scales
        wd = reference.dequant_w8(q, scales.to(dtype), torch.float64)
        for m in (1, 37, 64, 200, 300):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.double() @ wd.t() + (bias.double() if bias is not None else 0)
            for p in plans:
                y = c8.run_plan(p, x, q, scales, bias, fill=math.nan)
                assert y.shape == (m, n) and y.dtype == dtype
                err = _rel(y, ref)
                assert err < TOL, f"{p} M={m} scales {scales.dtype}: {err:.3e}"


def test_cutlass_w8_dispatch_graph_and_compile(c8) -> None:
    """linear_w8a16 forced 'cutlass' and 'auto' (which adds the CUTLASS plans from M = 64) on
    [..., K] input; N % 16 != 0 refused by the forced path and served elsewhere by auto;
    torch.compile + CUDA-graph replay at M = 96."""
    n, k = 1216, 1152
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    s = (torch.rand(n, device="cuda") * 0.02 + 0.005).to(torch.bfloat16)
    wd = reference.dequant_w8(q, s, torch.float64)
    for m in (8, 80, 300):
        x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.reshape(-1, k).double() @ wd.t()
        for backend in ("cutlass", "auto"):
            y = linear_w8a16(x, q, s, backend=backend)
            assert y.shape == (2, m, n)
            assert _rel(y.reshape(-1, n), ref) < TOL, (backend, m)
    q2, s2 = q[:1208].contiguous(), s[:1208].contiguous()  # N = 1208: not a multiple of 16
    x2 = torch.randn(100, k, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelArgumentError, match="'cutlass' needs N % 16 == 0"):
        linear_w8a16(x2, q2, s2, backend="cutlass")
    ref2 = x2.double() @ reference.dequant_w8(q2, s2, torch.float64).t()
    assert _rel(linear_w8a16(x2, q2, s2), ref2) < TOL
    static_x = torch.randn(96, k, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda t: linear_w8a16(t, q, s, backend="cutlass"), fullgraph=True)
    f(static_x)
    static_y, new_x = _capture_and_replay(f, static_x)
    assert _rel(static_y, new_x.double() @ wd.t()) < TOL

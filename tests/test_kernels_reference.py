"""CPU tests for quantlab.kernels packing, reference math and the dispatch point (no Triton)."""

from __future__ import annotations

import pytest
import torch
from quantlab.kernels import (
    KernelArgumentError,
    act_order_perm,
    linear_fp8,
    linear_w4a16,
    linear_w8a16,
    linear_w8a16_group,
    packing,
    reference,
)
from quantlab.kernels.ops import (
    _linear_fp8_op,
    _linear_w4a16_op,
    _linear_w8a8_op,
    _linear_w8a16_group_op,
    _linear_w8a16_op,
)


def test_asym_pack_round_trip_and_offset() -> None:
    codes = torch.randint(0, 16, (10, 24), dtype=torch.uint8)
    packed = packing.pack_int4_asym(codes)
    assert packed.shape == (5, 24) and packed.dtype == torch.int8
    assert torch.equal(packing.unpack_int4_asym(packed), codes)
    # stored as u - 8 in the exporter's signed layout
    assert torch.equal(packing.unpack_int4_rows(packed).to(torch.int16), codes.to(torch.int16) - 8)


def test_w4_from_codes_matches_codes_math() -> None:
    n, k, g = 6, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // g) + 0.1
    zero = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    qw, s, z = packing.w4_from_codes(codes, scale, zero)
    w = reference.dequant_w4(qw, s, z, g)
    expect = (codes.float() - zero.float().repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
    assert torch.equal(w, expect)
    assert torch.equal(packing.w4_to_codes(qw, z), codes)
    sym = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    qw, s, z = packing.w4_from_codes(sym, scale)
    assert z is None
    assert torch.equal(
        reference.dequant_w4(qw, s, None, g), sym.float() * scale.repeat_interleave(g, 1)
    )


def test_w4_from_codes_rejects_bad_zero() -> None:
    with pytest.raises(ValueError, match="zero"):
        packing.w4_from_codes(
            torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1), torch.full((2, 1), 16)
        )


def test_act_order_permutes_activations_not_weights() -> None:
    n, k, g = 8, 96, 32
    g_idx = torch.arange(k) // g
    g_idx = g_idx[torch.randperm(k)]  # act-order: groups scattered over K
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    s = torch.rand(n, k // g) + 0.1
    x = torch.randn(3, k).to(torch.bfloat16)
    w_true = q.float() * s[:, g_idx]  # what GPTQ's g_idx means
    perm = act_order_perm(g_idx, g)
    qw = packing.pack_int4_rows(q[:, perm].contiguous())  # exporter permutes once, offline
    y = linear_w4a16(x, qw, s, None, g, perm=perm)
    ref = x.double() @ w_true.double().t()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_act_order_rejects_uneven_groups() -> None:
    with pytest.raises(ValueError, match="exactly"):
        act_order_perm(torch.tensor([0, 0, 0, 1]), 2)


def test_dispatch_cpu_falls_back_to_reference_with_batch_dims() -> None:
    n, k, g = 48, 64, 32
    qw, s, z = packing.w4_from_codes(
        torch.randint(0, 16, (n, k), dtype=torch.uint8),
        torch.rand(n, k // g).half(),
        torch.randint(0, 16, (n, k // g), dtype=torch.uint8),
    )
    x = torch.randn(2, 5, k).half()
    bias = torch.randn(n).half()
    y = linear_w4a16(x, qw, s, z, g, bias)
    assert y.shape == (2, 5, n) and y.dtype == torch.float16
    ref = reference.ref_linear_w4a16(x.reshape(10, k), qw, s, z, g, bias, torch.float64)
    assert float((y.reshape(10, n).double() - ref).norm() / ref.norm()) < 2e-3


def test_w8a16_and_fp8_dispatch_cpu() -> None:
    n, k = 48, 64
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.01
    x = torch.randn(7, k).to(torch.bfloat16)
    y = linear_w8a16(x, q, s)
    ref = reference.ref_linear_w8a16(x, q, s, None, torch.float64)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    w8 = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    for gran, ws in (("tensor", torch.tensor([1e-3])), ("row", torch.rand(n) * 1e-3)):
        for backend in ("auto", "scaled_mm"):
            y = linear_fp8(x, w8, ws, granularity=gran, backend=backend)
            ref = reference.ref_linear_fp8(x, w8, ws, None, None, gran, torch.float64)
            assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_w8a16_group_dispatch_cpu_and_errors() -> None:
    """Group-wise int8 on CPU equals the float64 reference; bad shapes name the argument."""
    n, k, g = 48, 128, 32
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = (torch.rand(n, k // g) * 0.01).half()
    z = torch.randint(-5, 6, (n, k // g), dtype=torch.int8)
    x = torch.randn(2, 3, k).half()
    y = linear_w8a16_group(x, q, s, z, g)
    ref = reference.ref_linear_w8a16_group(x.reshape(6, k), q, s, z, g, None, torch.float64)
    assert y.shape == (2, 3, n)
    assert float((y.reshape(6, n).double() - ref).norm() / ref.norm()) < 2e-3
    # zero points shift every code of their group: (q - z) * s, element by element
    w = reference.dequant_w8_group(q, s, z, g, torch.float64)
    assert torch.equal(w[5, 40:64], (q[5, 40:64].double() - int(z[5, 1])) * float(s[5, 1]))
    x1 = torch.randn(1, k).half()
    for bad, match in (
        (dict(group_size=48), "group_size"),
        (dict(scales=s[:, :2]), "scales"),
        (dict(zeros=z.to(torch.uint8)), "zeros"),
        (dict(backend="cutlass"), "backend"),
    ):
        kw = dict(qweight=q, scales=s, zeros=z, group_size=g) | bad
        backend = kw.pop("backend", "auto")
        with pytest.raises(KernelArgumentError, match=match):
            linear_w8a16_group(x1, **kw, backend=backend)  # type: ignore[arg-type]


def test_argument_errors_are_specific() -> None:
    qw = torch.zeros(8, 64, dtype=torch.int8)
    s = torch.ones(16, 2)
    with pytest.raises(KernelArgumentError, match="backend"):
        linear_w4a16(torch.randn(1, 64).half(), qw, s, None, 32, backend="fast")
    with pytest.raises(KernelArgumentError, match="fp16 or bf16"):
        linear_w4a16(torch.randn(1, 64), qw, s, None, 32)
    with pytest.raises(KernelArgumentError, match="scales"):
        linear_w4a16(torch.randn(1, 64).half(), qw, torch.ones(16, 4), None, 32)
    with pytest.raises(KernelArgumentError, match="group sizes"):
        linear_w4a16(torch.randn(1, 64).half(), qw, torch.ones(16, 4), None, 16, backend="splitk")
    # the CUDA-only W8 paths name themselves and the reason on CPU tensors
    q8, s8 = torch.zeros(16, 64, dtype=torch.int8), torch.ones(16).half()
    for backend in ("cuda_mma", "cutlass"):
        with pytest.raises(KernelArgumentError, match=f"'{backend}' needs CUDA tensors"):
            linear_w8a16(torch.randn(1, 64).half(), q8, s8, backend=backend)


def test_custom_ops_pass_opcheck() -> None:
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    n, k, g = 32, 64, 32
    qw, s, z = packing.w4_from_codes(
        torch.randint(0, 16, (n, k), dtype=torch.uint8),
        torch.rand(n, k // g).half(),
        torch.randint(0, 16, (n, k // g), dtype=torch.uint8),
    )
    x = torch.randn(3, k).half()
    torch.library.opcheck(_linear_w4a16_op, (x, qw, s, z, g, None, "reference"))
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    torch.library.opcheck(_linear_w8a16_op, (x, q8, torch.rand(n).half(), None, "reference"))
    zg = torch.randint(-9, 10, (n, k // g), dtype=torch.int8)
    torch.library.opcheck(_linear_w8a16_group_op, (x, q8, s, zg, g, None, "reference"))
    w8 = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    # fp8 tensors break opcheck's schema-check mode on CPU (no fp8 mul kernel there): fake only.
    torch.library.opcheck(
        _linear_fp8_op,
        (x, w8, torch.rand(n), None, None, "row", "reference"),
        test_utils=("test_faketensor",),
    )
    torch.library.opcheck(
        _linear_w8a8_op,
        (x, q8, torch.rand(n), torch.randn(n).half(), None, torch.rand(k).half(), "reference"),
    )


def test_compile_traces_through_custom_op() -> None:
    n, k, g = 32, 64, 32
    qw, s, _ = packing.w4_from_codes(
        torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // g).half()
    )
    x = torch.randn(4, k).half()
    targets: list[object] = []

    def record(gm: torch.fx.GraphModule, _: object) -> object:
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    f = torch.compile(lambda t: linear_w4a16(t, qw, s, None, g), backend=record, fullgraph=True)
    torch.testing.assert_close(f(x), linear_w4a16(x, qw, s, None, g))
    assert torch.ops.quantlab.linear_w4a16.default in targets  # traced as the op, not its body


def test_eager_calls_skip_the_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside torch.compile the public function calls the implementation directly (host time of
    the engine's eager steps); QUANTLAB_KERNELS_DISPATCH=op routes it through the op again."""
    from quantlab.kernels import ops

    n, k, g = 32, 64, 32
    qw, s, _ = packing.w4_from_codes(
        torch.randint(-8, 8, (n, k), dtype=torch.int8), torch.rand(n, k // g).half()
    )
    x = torch.randn(2, k).half()
    want = ops._linear_w4a16_impl(x, qw, s, None, g, None, "auto")

    def no_dispatch(*args: object) -> torch.Tensor:
        raise AssertionError("the registered op was called")

    monkeypatch.setattr(ops, "_linear_w4a16_op", no_dispatch)
    torch.testing.assert_close(linear_w4a16(x, qw, s, None, g), want, rtol=0, atol=0)
    monkeypatch.setattr(ops, "_DISPATCH_ALWAYS", True)
    with pytest.raises(AssertionError, match="registered op"):
        linear_w4a16(x, qw, s, None, g)


def test_cuda_paths_share_one_load_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """can_load (behind every CUDA path's available()): refuses after a failed build, with
    QUANTLAB_KERNELS_NO_CUDA=1 and during a graph capture without calling load; otherwise
    reports whether load() raised."""
    from quantlab.kernels.cuda_gemv import can_load

    calls: list[int] = []

    def ok() -> None:
        calls.append(1)

    def broken() -> None:
        raise RuntimeError("nvcc failed")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("QUANTLAB_KERNELS_NO_CUDA", raising=False)
    assert can_load(None, ok) and calls == [1]
    assert not can_load(None, broken)
    assert not can_load("an earlier build failed", ok)
    monkeypatch.setenv("QUANTLAB_KERNELS_NO_CUDA", "1")
    assert not can_load(None, ok)
    monkeypatch.delenv("QUANTLAB_KERNELS_NO_CUDA")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not can_load(None, ok)
    assert calls == [1]


def test_bind_w4a16_matches_the_checked_call() -> None:
    """kernels.bind_w4a16: checks once at bind time; the bound function equals linear_w4a16
    exactly (sym and asym, bias, batch dims, a strided and a misaligned x)."""
    from quantlab.kernels import bind_w4a16

    n, k, g = 32, 64, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    zero = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
    scale = (torch.rand(n, k // g) + 0.1).half()
    bias = torch.randn(n).half()
    for qw, s, z in (
        packing.w4_from_codes(codes.to(torch.int8) - 8, scale),
        packing.w4_from_codes(codes, scale, zero),
    ):
        x = torch.randn(2, 3, k).half()
        f = bind_w4a16(x, qw, s, z, g, bias)
        wide = torch.randn(5, k + 1).half()  # rows not contiguous, then rows off 16-byte alignment
        for xi in (
            x,
            torch.randn(4, k).half(),
            wide[:, :k],
            wide.flatten()[1 : 1 + 3 * k].view(3, k),
        ):
            want = linear_w4a16(xi.contiguous(), qw, s, z, g, bias)
            assert f(xi).shape == want.shape
            torch.testing.assert_close(f(xi), want, rtol=0, atol=0)
        with pytest.raises(KernelArgumentError, match="scales"):
            bind_w4a16(x, qw, s[:, :1], z, g, bias)

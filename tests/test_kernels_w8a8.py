"""The Triton SmoothQuant W8A8 path (int8 activation quantization + int8 GEMM with its epilogue)
equals reference.ref_linear_w8a8: the codes and scales exactly, the output exactly under the CPU
interpreter and within one fp16 rounding step on the GPU (the compiler may fuse the epilogue's
multiply-add). conftest sets TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import pytest
import torch
from quantlab.kernels import KernelArgumentError, linear_w8a8
from quantlab.kernels.reference import quantize_int8_act, ref_linear_w8a8

pytest.importorskip("triton")
from quantlab.kernels import triton_w8a8 as T

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).half().to(DEV)
    x[0, 3] = 40.0  # an outlier channel, as SmoothQuant sees them
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    sw = (torch.rand(n, generator=g) * 1e-3 + 1e-4).to(DEV)
    bias = torch.randn(n, generator=g).half().to(DEV)
    pre = (torch.rand(k, generator=g) + 0.5).half().to(DEV)
    return x, qw, sw, bias, pre


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_pre", [False, True])
def test_quantize_matches_reference(static: bool, with_pre: bool) -> None:
    x, _, _, _, pre = _case(5, 8, 200)
    x[2] = 0  # a zero row takes scale 1
    x[1, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5], dtype=x.dtype)  # halves round to even
    xs = torch.tensor([0.02], device=DEV) if static else None
    p = pre if with_pre else None
    got_q, got_s = T.quantize_int8(x, xs, p)
    want_q, want_s = quantize_int8_act(x, xs, p)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q, want_q)
    if static:  # 40 / 0.02 saturates
        assert int(got_q.max()) == 127


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    if not CUDA:
        assert torch.equal(got, want)
        return
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps, atol=1e-3)


@pytest.mark.parametrize(
    "backend,m", [("gemv", 1), ("gemv", 3), ("splitk", 5), ("splitk", 33), ("tiled", 70)]
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gemm_plans_match_reference(backend: str, m: int, per_channel: bool) -> None:
    x, qw, sw, bias, pre = _case(m, 96, 320)
    sw_t = sw if per_channel else sw[:1]
    xq, sx = T.quantize_int8(x, None, pre)
    want = ref_linear_w8a8(x, qw, sw_t, bias, None, pre)
    for p in T.candidates(m):
        if p.backend != backend:
            continue
        got = T.run_plan(p, xq, sx, qw, sw_t.float(), bias, x.dtype)
        _same(got, want)


def test_linear_w8a8_static_no_bias_and_errors() -> None:
    x, qw, sw, _, _ = _case(4, 64, 128)
    xs = torch.tensor([0.03], device=DEV)
    want = ref_linear_w8a8(x, qw, sw, None, xs, None)
    got = T.w8a8_gemm(x, qw, sw, None, xs, None)
    _same(got, want)
    # the reference really depends on each input: a changed static scale changes the output
    assert not torch.equal(ref_linear_w8a8(x, qw, sw, None, xs * 2, None), want)
    with pytest.raises(KernelArgumentError, match="qweight"):
        linear_w8a8(x, qw.float(), sw)
    with pytest.raises(KernelArgumentError, match="weight_scale"):
        linear_w8a8(x, qw, sw[:3])
    with pytest.raises(KernelArgumentError, match="pre"):
        linear_w8a8(x, qw, sw, pre=torch.ones(5))


def test_reference_equals_float_math() -> None:
    """ref_linear_w8a8 is the dequantized product: (xq * sx) @ (qw * sw)^T within fp32 rounding."""
    x, qw, sw, bias, pre = _case(3, 32, 64)
    x, qw, sw, bias, pre = (t.cpu() for t in (x, qw, sw, bias, pre))
    xq, sx = quantize_int8_act(x, None, pre)
    want = (xq.double() * sx.double()) @ (qw.double() * sw.double()[:, None]).t() + bias.double()
    got = ref_linear_w8a8(x, qw, sw, bias, None, pre)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)

"""The engine's fused elementwise kernels equal their torch references (exactly: they round where
torch rounds). On CPU they run under TRITON_INTERPRET=1 (set by conftest), in fp16 and fp32; the
interpreter has no bfloat16, which the GPU run of benchmarks/engine_gpu.py check covers."""

from __future__ import annotations

import pytest
import torch
from quantlab.kernels import fused_ops as F

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# The interpreter has no bfloat16 and converts to float8 with its own rounding (not the GPU's
# cvt.rn.satfinite): those cases run on the GPU only.
DTYPES = [torch.float16, torch.float32, *([torch.bfloat16] if CUDA else [])]


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Exact under the interpreter; on the GPU within one rounding step of the dtype (the compiler
    may contract a multiply-add into an FMA, and its exp/rsqrt differ in the last bit)."""
    if not CUDA:
        assert torch.equal(got, want)
        return
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype: torch.dtype, residual: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 96, generator=g) * 3).to(DEV, dtype)
    r = torch.randn(5, 96, generator=g).to(DEV, dtype) if residual else None
    w = torch.randn(96, generator=g).to(DEV, dtype)
    got, s = F.rms_norm(x, w, 1e-6, r)
    want, s_want = F.ref_rms_norm(x, w, 1e-6, r)
    assert torch.equal(s, s_want)  # the residual add rounds once in both
    same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_in_place_and_leaves_v(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    nq, nkv, d = 4, 2, 16
    qkv = torch.randn(6, (nq + 2 * nkv) * d, generator=g).to(DEV, dtype)
    pos = torch.arange(6).float()[:, None] * (1e-2 ** (torch.arange(0, d, 2) / d))[None]
    emb = torch.cat((pos, pos), dim=-1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    want = qkv.clone()
    F.ref_rope_qk_(want, cos, sin, nq, nkv, d)
    got = qkv.clone()
    F.rope_qk_(got, cos, sin, nq, nkv, d)
    same(got, want)
    assert torch.equal(got[:, (nq + nkv) * d :], qkv[:, (nq + nkv) * d :])  # V untouched
    assert not torch.equal(got[:, : nq * d], qkv[:, : nq * d])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    gu = (torch.randn(3, 2 * 1100, generator=torch.Generator().manual_seed(2)) * 4).to(DEV, dtype)
    got, want = F.silu_mul(gu), F.ref_silu_mul(gu)
    if dtype == torch.float32 or CUDA:  # exp may differ in the last bit from torch's
        torch.testing.assert_close(
            got, want, rtol=3e-7 if dtype == torch.float32 else 8e-3, atol=1e-7
        )
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("storage", ["int8", *(["fp8"] if CUDA else []), "fp16"])
def test_kv_write_encodes_like_the_cache_and_lands_in_the_slots(storage: str) -> None:
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(3, 6 * 16, generator=g) * 3).to(DEV, torch.float16)
    if storage == "int8":  # ties round to even (fp8 ties: the interpreter rounds them away)
        qkv[0, 32:36] = torch.tensor([0.5, 1.5, -0.5, 2.5], device=DEV).half()
    k = qkv[:, 32:64].view(3, 2, 16)  # strided rows of a fused qkv
    v = qkv[:, 64:].view(3, 2, 16)
    dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "fp16": torch.float16}[storage]
    scale = {"int8": 1.0, "fp8": 0.01, "fp16": 1.0}[storage]
    k_pool = torch.zeros(4, 2, 2, 16, dtype=dtype, device=DEV)
    v_pool = torch.zeros_like(k_pool)
    slots = torch.tensor([5, 1, 7], device=DEV)
    F.kv_write(k, v, slots, k_pool, v_pool, storage, scale)
    for pool, x in ((k_pool, k), (v_pool, v)):
        flat = pool.view(-1, 2, 16)
        want = F.ref_encode(x, storage, scale, dtype)
        assert torch.equal(flat[slots].float(), want.float())
        others = [i for i in range(8) if i not in slots.tolist()]
        assert not bool(flat[others].float().any())
    if storage == "int8":  # 0.5 -> 0, 1.5 -> 2, -0.5 -> -0, 2.5 -> 2
        assert k_pool.view(-1, 32)[5, :4].tolist() == [0, 2, 0, 2]


@pytest.mark.parametrize("storage", ["int8", "fp8", "fp16"])
def test_rope_kv_write_equals_rope_then_kv_write(storage: str) -> None:
    """The one-launch rope + cache write leaves qkv and both pools as rope_qk_ then kv_write."""
    if storage == "fp8" and not CUDA:
        pytest.skip("the interpreter's e4m3 conversion misrounds values next to a binade (127.7)")
    g = torch.Generator().manual_seed(4)
    nq, nkv, d, t = 4, 2, 16, 3
    qkv = (torch.randn(t, (nq + 2 * nkv) * d, generator=g) * 3).to(DEV, torch.float16)
    pos = torch.tensor([0.0, 5.0, 11.0]).view(-1, 1)
    freqs = pos * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).view(1, -1)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(DEV, torch.float16), emb.sin().to(DEV, torch.float16)
    dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "fp16": torch.float16}[storage]
    scale = {"int8": 0.05, "fp8": 0.01, "fp16": 1.0}[storage]
    slots = torch.tensor([5, 1, 7], device=DEV)
    pools = [torch.zeros(4, 2, nkv, d, dtype=dtype, device=DEV) for _ in range(4)]
    want_qkv = qkv.clone()
    F.ref_rope_qk_(want_qkv, cos, sin, nq, nkv, d)
    k = want_qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d)
    v = want_qkv[:, (nq + nkv) * d :].view(t, nkv, d)
    for pool, x in ((pools[0], k), (pools[1], v)):
        pool.view(-1, nkv, d)[slots] = F.ref_encode(x, storage, scale, dtype)
    got_qkv = qkv.clone()
    F.rope_kv_write_(got_qkv, cos, sin, nq, nkv, d, slots, pools[2], pools[3], storage, scale)
    same(got_qkv, want_qkv)
    for got, want in ((pools[2], pools[0]), (pools[3], pools[1])):
        if CUDA:  # one rounding step of the rotation may move a code by one
            assert (got.float() - want.float()).abs().max() <= (1 if storage == "int8" else 0.1)
        else:
            assert torch.equal(got.float(), want.float())
    assert pools[0].float().abs().sum() > 0  # the comparison is not of two empty pools


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_quant_equals_norm_then_static_quant(storage: str, residual: bool) -> None:
    """The norm that writes the next linear's int8 / e4m3 input equals rms_norm then the
    linear's own static quantization (codes exactly on CPU; on the GPU within one code step)."""
    if storage == "fp8" and not CUDA:
        pytest.skip("the interpreter's e4m3 conversion misrounds values next to a binade")
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 96, generator=g) * 3).to(DEV, torch.float16)
    r = torch.randn(4, 96, generator=g).to(DEV, torch.float16) if residual else None
    w = (torch.rand(96, generator=g) + 0.5).to(DEV, torch.float16)
    scale = torch.tensor([0.02 if storage == "int8" else 0.005], device=DEV)
    got, s = F.rms_norm_quant(x, w, 1e-6, r, scale, storage)
    want, s_want = F.ref_rms_norm_quant(x, w, 1e-6, r, scale, storage)
    assert torch.equal(s, s_want)
    assert got.dtype == want.dtype
    if CUDA:  # the GPU's rsqrt may move the normed value by one rounding step
        diff = (got.float() - want.float()).abs()
        assert float((diff > 0).float().mean()) < 0.02
    else:
        assert torch.equal(got, want)
    assert int((want.float().abs() >= (127 if storage == "int8" else 448)).sum()) > 0  # saturates

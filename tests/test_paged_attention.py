"""Paged decode attention: scattered blocks equal contiguous attention; the Triton kernel (under
TRITON_INTERPRET on CPU) equals the reference for every cache dtype, with and without multi-block.
Paged prefill attention: the reference equals SDPA over each chunk's contiguous context (a chunk
behind a cached prefix, GQA, int8/fp8 caches); its Triton kernel equals the reference."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from quantlab.kernels.paged_attention import choose_splits, paged_decode_attention
from quantlab.kernels.paged_prefill import paged_prefill_attention

from quantlab.engine.kv_cache import PagedKVCache


def _scattered(
    b: int, hkv: int, d: int, lens: list[int], bs: int, storage: str, seed: int
) -> tuple[PagedKVCache, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A cache whose sequences own randomly permuted blocks, plus their contiguous K/V (fp16)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(-(-n // bs) for n in lens) + 1
    cache = PagedKVCache(1, total + 3, bs, hkv, d, storage, [0.05] * 1, torch.device("cpu"))
    perm = (torch.randperm(total + 2, generator=g) + 1).tolist()
    mb = max(-(-n // bs) for n in lens)
    tables = torch.zeros((b, mb), dtype=torch.int32)
    ks, vs = [], []
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        blocks = [perm.pop() for _ in range(nb)]
        tables[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, hkv, d, generator=g).half()
        v = torch.randn(n, hkv, d, generator=g).half()
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
        cache.write(0, slots, k, v)
        ks.append(cache.decode(cache.encode(k, 0), 0, torch.float16))  # what the cache holds
        vs.append(cache.decode(cache.encode(v, 0), 0, torch.float16))
    return cache, tables, ks, vs


@pytest.mark.parametrize("storage", ["fp16", "int8", "fp8"])
def test_scattered_blocks_equal_contiguous_attention(storage: str) -> None:
    b, h, hkv, d, bs = 3, 6, 2, 32, 16
    lens = [1, 37, 70]
    cache, tables, ks, vs = _scattered(b, hkv, d, lens, bs, storage, 0)
    q = torch.randn(b, h, d).half()
    out = paged_decode_attention(
        q,
        cache.k[0],
        cache.v[0],
        tables,
        torch.tensor(lens, dtype=torch.int32),
        0.05,
        1 / math.sqrt(d),
        backend="reference",
    )
    for i in range(b):
        kk = ks[i].float().repeat_interleave(h // hkv, 1).transpose(0, 1)
        vv = vs[i].float().repeat_interleave(h // hkv, 1).transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[i].float().unsqueeze(1), kk, vv).squeeze(1)
        assert (out[i].float() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("storage", ["fp16", "int8", "fp8"])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_kernel_matches_reference(storage: str, splits: int) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not __import__("os").environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    b, h, hkv, d, bs = 3, 8, 2, 32, 16
    lens = [5, 0, 50]  # an idle padding row (0) must give 0
    cache, tables, _, _ = _scattered(b, hkv, d, [max(n, 1) for n in lens], bs, storage, 1)
    q = torch.randn(b, h, d).half()
    ctx = torch.tensor(lens, dtype=torch.int32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the real kernel on a GPU
    args = tuple(
        a.to(dev) if isinstance(a, torch.Tensor) else a
        for a in (q, cache.k[0], cache.v[0], tables, ctx, 0.05, 1 / math.sqrt(d))
    )
    ref = paged_decode_attention(*args, backend="reference")
    got = paged_decode_attention(*args, num_splits=splits, backend="triton")
    assert torch.isfinite(got).all()
    assert (got.float() - ref.float()).abs().max() < 5e-3
    assert got[1].abs().max() == 0


def test_multi_block_policy() -> None:
    # bs 1, 32 KV heads, 16k context on 132 SMs: split; bs 32 or a short context: no split.
    assert choose_splits(1, 32, 16384, 64, 132) > 1
    assert choose_splits(32, 32, 16384, 64, 132) == 1
    assert choose_splits(1, 32, 1000, 64, 132) == 1


# (q_len, ctx_len) per sequence: a whole prompt, a chunk behind a prefix, one token, a chunk that
# ends mid-block, one longer than the kernel's 32-row tile
CHUNKS = [(5, 5), (23, 70), (1, 17), (33, 33), (40, 52)]


def _inputs(
    storage: str, seed: int
) -> tuple[torch.Tensor, PagedKVCache, list[torch.Tensor], list[torch.Tensor], tuple[Any, ...]]:
    """Packed q [T, H, D] fp16, a scattered cache and the kernel's int32 tables."""
    h, hkv, d, bs = 6, 2, 32, 16
    ctx = [c for _, c in CHUNKS]
    cache, tables, ks, vs = _scattered(len(CHUNKS), hkv, d, ctx, bs, storage, seed)
    lens = [n for n, _ in CHUNKS]
    starts = [sum(lens[:i]) + 2 * i for i in range(len(lens))]  # gaps: rows no chunk owns
    q = torch.randn(starts[-1] + lens[-1] + 3, h, d, generator=torch.Generator().manual_seed(seed))
    i32 = torch.int32
    tabs = (
        tables,
        torch.tensor(starts, dtype=i32),
        torch.tensor(lens, dtype=i32),
        torch.tensor(ctx, dtype=i32),
    )
    return q.half(), cache, ks, vs, tabs


@pytest.mark.parametrize("storage", ["fp16", "int8", "fp8"])
def test_reference_equals_sdpa_over_the_contiguous_context(storage: str) -> None:
    q, cache, ks, vs, tabs = _inputs(storage, 0)
    h, d = q.shape[1], q.shape[2]
    out = paged_prefill_attention(
        q, cache.k[0], cache.v[0], *tabs, 0.05, 1 / math.sqrt(d), 40, backend="reference"
    )
    starts = tabs[1].tolist()
    owned = torch.zeros(q.shape[0], dtype=torch.bool)
    for (n, c), s0, k, v in zip(CHUNKS, starts, ks, vs, strict=True):
        owned[s0 : s0 + n] = True
        kk = k.float().repeat_interleave(h // k.shape[1], 1).transpose(0, 1)
        vv = v.float().repeat_interleave(h // v.shape[1], 1).transpose(0, 1)
        mask = torch.arange(c).view(1, -1) <= torch.arange(c - n, c).view(-1, 1)
        ref = F.scaled_dot_product_attention(q[s0 : s0 + n].float().transpose(0, 1), kk, vv, mask)
        assert (out[s0 : s0 + n].float() - ref.transpose(0, 1)).abs().max() < 2e-3
    assert out[~owned].abs().max() == 0


@pytest.mark.parametrize("storage", ["fp16", "int8", "fp8"])
def test_triton_prefill_kernel_matches_reference(storage: str) -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    q, cache, _, _, tabs = _inputs(storage, 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the real kernel on a GPU
    args = [t.to(dev) for t in (q, cache.k[0], cache.v[0], *tabs)]
    sm = 1 / math.sqrt(q.shape[-1])
    ref = paged_prefill_attention(*args, 0.05, sm, 40, backend="reference")
    got = paged_prefill_attention(*args, 0.05, sm, 40, backend="triton")
    # fp16 probabilities in the kernel's P @ V (the reference keeps them in fp32)
    assert (got.float() - ref.float()).abs().max() < 4e-3
    assert (got.float() - ref.float()).abs().max() < 0.01 * ref.float().abs().max()


def test_prefill_bad_arguments_are_refused() -> None:
    q, cache, _, _, (tables, starts, lens, ctx) = _inputs("fp16", 2)
    k, v = cache.k[0], cache.v[0]
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k, v, tables.long(), starts, lens, ctx, 1.0, 1.0, 40)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(q[:, :5], k, v, tables, starts, lens, ctx, 1.0, 1.0, 40)
    with pytest.raises(ValueError, match="contiguous"):  # a column of [S, 3]: read as a row
        meta = torch.stack([starts, lens, ctx], 1)
        paged_prefill_attention(q, k, v, tables, meta[:, 0], meta[:, 1], meta[:, 2], 1.0, 1.0, 40)
    with pytest.raises(ValueError, match=r"\[S\]"):
        paged_prefill_attention(q, k, v, tables, starts, lens[:2], ctx, 1.0, 1.0, 40)

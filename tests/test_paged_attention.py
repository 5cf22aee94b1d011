"""Paged decode attention: scattered blocks equal contiguous attention; the Triton kernel (under
TRITON_INTERPRET on CPU) equals the reference for every cache dtype, with and without multi-block."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from quantlab.kernels.paged_attention import choose_splits, paged_decode_attention

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

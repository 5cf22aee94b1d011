"""Decode attention over a paged, optionally quantized KV cache, split across thread blocks.

One query token per sequence attends to its context, which lives in fixed-size blocks of a shared
pool: k_cache / v_cache [num_blocks, block_size, H_kv, D] in fp16, bf16, int8 or float8_e4m3fn,
with one per-tensor dequantization scale for int8/fp8 (TensorRT-LLM's kv_cache_scaling_factor:
x ~= code * scale). block_tables [B, max_blocks] int32 maps a sequence's logical block j to a pool
block; ctx_lens [B] int32 counts its cached tokens (0: an idle padding row, whose output is 0).

Why a kernel of ours: FlashInfer and torch's flex_attention read fp16/bf16/fp8 paged caches, but
neither takes an int8 cache with a per-tensor scale (INT8 KV is one of the checkpoint's two KV
formats), and neither is installed on the GPU image. Multi-block ("split-K") mode: the context of
one (sequence, KV head) is cut into `num_splits` contiguous runs of blocks, each run one program;
a second kernel merges the partial softmaxes. It pays when B x H_kv programs cannot fill the GPU
(choose_splits).

Grid: (B, H_kv, num_splits); each program serves all G = H / H_kv query heads of its KV head (GQA)
as one [16, D] tile, so K and V are read once per KV head.
"""

from __future__ import annotations

import math

import torch

try:  # the ground floor imports triton lazily elsewhere; here the kernels are the module
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None

MAX_GROUP = 16  # query heads per KV head a program serves (tl.dot needs M >= 16)


def ref_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    kv_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """Torch reference: out [B, H, D] (q's dtype) for q [B, H, D]; float32 math, one row at a time."""
    out = torch.zeros_like(q)
    for i in range(q.shape[0]):
        n = int(ctx_lens[i])
        if n == 0:
            continue
        k, v = ref_context(k_cache, v_cache, block_tables[i], n, kv_scale, q.dtype, q.shape[1])
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * sm_scale
        p = torch.softmax(s, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


def ref_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    n: int,
    kv_scale: float,
    dtype: torch.dtype,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K, V [n, heads, D] of one sequence's first n cached tokens (block table row
    `table`), dequantized, rounded to the kernels' operand dtype, KV heads repeated for GQA."""
    bs, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    blocks = table[: -(-n // bs)].long()
    k = k_cache[blocks].reshape(-1, hkv, d)[:n].float()
    v = v_cache[blocks].reshape(-1, hkv, d)[:n].float()
    if k_cache.dtype in (torch.int8, torch.float8_e4m3fn):
        k, v = k * kv_scale, v * kv_scale
    k = k.to(dtype).float().repeat_interleave(heads // hkv, dim=1)
    v = v.to(dtype).float().repeat_interleave(heads // hkv, dim=1)
    return k, v


def dot_precision(q: torch.Tensor) -> str:
    """tl.dot precision: "ieee" for fp32 q (TF32, the fp32 default, keeps 10 mantissa bits)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def choose_splits(batch: int, kv_heads: int, max_ctx: int, block_size: int, sms: int) -> int:
    """How many runs to split each context into: 1 unless B x H_kv < SMs / 2 and contexts > 1024.

    Each run keeps at least 4 blocks (256 tokens at block 64) so the merge stays cheap.
    """
    if batch * kv_heads >= sms // 2 or max_ctx <= 1024:
        return 1
    by_sm = -(-sms // (batch * kv_heads))
    by_len = max(1, max_ctx // (4 * block_size))
    return int(max(1, min(by_sm, by_len, 64)))


if triton is not None:

    @triton.jit
    def attend_block(
        q,
        K,
        V,
        off,
        kmask,
        ok,
        m_i,
        l_i,
        acc,
        sm_scale,
        kv_scale,
        QUANT: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """One KV block of an online softmax: load K, V [BS, D] at off (rows kmask), dequantize,
        score q [R, D] against them where ok [R, BS]; the updated (m_i, l_i, acc)."""
        k = tl.load(K + off, mask=kmask[:, None], other=0.0)
        v = tl.load(V + off, mask=kmask[:, None], other=0.0)
        if QUANT:
            k = (k.to(tl.float32) * kv_scale).to(q.dtype)
            v = (v.to(tl.float32) * kv_scale).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _decode_split_kernel(
        Q,
        K,
        V,
        BT,
        CL,
        Out,
        ML,
        sm_scale,
        kv_scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_bt,
        stride_ob,
        stride_oh,
        stride_os,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        QUANT: tl.constexpr,
        PREC: tl.constexpr,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(CL + b)
        n_blocks = tl.cdiv(ctx, BS)
        per = tl.cdiv(n_blocks, NUM_SPLITS)
        lo = sp * per
        hi = tl.minimum(lo + per, n_blocks)
        g = tl.arange(0, 16)
        gmask = g < GROUP
        dd = tl.arange(0, D)
        nn = tl.arange(0, BS)
        heads = hk * GROUP + g
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + dd[None, :],
            mask=gmask[:, None],
            other=0.0,
        )
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, D], tl.float32)
        j = lo
        # a while loop: the interpreter's range() cannot take these loaded (1-element) bounds
        while j < hi:
            blk = tl.load(BT + b * stride_bt + j).to(tl.int64)
            off = blk * stride_kb + nn[:, None] * stride_ks + hk * stride_kh + dd[None, :]
            nmask = (j * BS + nn) < ctx
            m_i, l_i, acc = attend_block(
                q, K, V, off, nmask, nmask[None, :], m_i, l_i, acc, sm_scale, kv_scale, QUANT, PREC
            )
            j += 1
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        obase = Out + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + dd[None, :]
        if NUM_SPLITS == 1:
            tl.store(obase, out.to(Out.dtype.element_ty), mask=gmask[:, None])
        else:
            tl.store(obase, out, mask=gmask[:, None])
            mlbase = (
                ML + ((b * (stride_ob // stride_os) + heads * (stride_oh // stride_os)) + sp) * 2
            )
            tl.store(mlbase, m_i, mask=gmask)
            tl.store(mlbase + 1, l_i, mask=gmask)

    @triton.jit
    def _decode_merge_kernel(
        P, ML, Out, H, D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr
    ):
        row = tl.program_id(0)  # b * H + h
        ss = tl.arange(0, SPLITS_P2)
        smask = ss < NUM_SPLITS
        m = tl.load(ML + (row * NUM_SPLITS + ss) * 2, mask=smask, other=float("-inf"))
        lsum = tl.load(ML + (row * NUM_SPLITS + ss) * 2 + 1, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(lsum > 0, lsum * tl.exp(tl.where(lsum > 0, m - m_max, 0.0)), 0.0)
        dd = tl.arange(0, D)
        part = tl.load(P + (row * NUM_SPLITS + ss[:, None]) * D + dd[None, :], mask=smask[:, None])
        total = tl.sum(w, 0)
        out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(Out + row * D + dd, out.to(Out.dtype.element_ty))


def _check(q, k_cache, v_cache, block_tables, ctx_lens) -> None:
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("paged attention: k_cache and v_cache must match in shape and dtype")
    if h % hkv or h // hkv > MAX_GROUP:
        raise ValueError(f"paged attention: {h} query heads over {hkv} KV heads (G <= {MAX_GROUP})")
    if d & (d - 1) or d < 16:
        raise ValueError(f"paged attention: head dim {d} must be a power of two >= 16")
    if block_tables.dtype != torch.int32 or ctx_lens.dtype != torch.int32:
        raise ValueError("paged attention: block_tables and ctx_lens must be int32")
    if block_tables.shape[0] != b or ctx_lens.shape != (b,):
        raise ValueError("paged attention: block_tables [B, max_blocks] and ctx_lens [B] expected")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    kv_scale: float,
    sm_scale: float,
    num_splits: int = 1,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [B, H, D] for q [B, H, D] fp16/bf16 over the paged cache (see the module docstring).

    backend: "auto" (Triton on CUDA, the reference on CPU), "triton" (also under TRITON_INTERPRET),
    "reference". No host sync: safe inside a CUDA graph with num_splits fixed.
    """
    _check(q, k_cache, v_cache, block_tables, ctx_lens)
    if backend == "reference" or (backend == "auto" and (not q.is_cuda or triton is None)):
        return ref_paged_decode_attention(
            q, k_cache, v_cache, block_tables, ctx_lens, kv_scale, sm_scale
        )
    b, h, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    group = h // hkv
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    quant = k_cache.dtype in (torch.int8, torch.float8_e4m3fn)
    if num_splits == 1:
        part, ml = out.view(b, h, 1, d), out  # ml unused
        stride_os = 0
    else:
        part = torch.empty((b, h, num_splits, d), device=q.device, dtype=torch.float32)
        ml = torch.empty((b, h, num_splits, 2), device=q.device, dtype=torch.float32)
        stride_os = part.stride(2)
    _decode_split_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        ctx_lens,
        part,
        ml,
        sm_scale,
        kv_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        part.stride(0),
        part.stride(1),
        stride_os,
        GROUP=group,
        D=d,
        BS=bs,
        NUM_SPLITS=num_splits,
        QUANT=quant,
        PREC=dot_precision(q),
        num_warps=4,
    )
    if num_splits > 1:
        _decode_merge_kernel[(b * h,)](
            part,
            ml,
            out,
            h,
            D=d,
            NUM_SPLITS=num_splits,
            SPLITS_P2=max(2, 1 << math.ceil(math.log2(num_splits))),
        )
    return out

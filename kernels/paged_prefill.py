"""Prefill attention over a paged, optionally quantized KV cache: many sequences, one launch.

A prefill chunk of n query tokens of one sequence attends causally to the ctx tokens cached for
it (the chunk's own K/V already written): query i sits at position ctx - n + i and sees keys
0..ctx - n + i. The chunks of S sequences are packed row after row in q [T, H, D]: sequence s
owns rows q_starts[s] .. q_starts[s] + q_lens[s]. The cache is the decode kernel's
(kernels/paged_attention.py): k_cache / v_cache [num_blocks, block_size, H_kv, D] in fp16, bf16,
int8 or float8_e4m3fn with one per-tensor scale, block_tables [S, max_blocks] int32.

Why a kernel: an in-flight step mixes decode rows with prefill chunks of different lengths, each
behind a cached prefix. torch's SDPA needs each chunk's context gathered into a contiguous,
dequantized, GQA-expanded tensor and one call per sequence and layer; this kernel reads the pool
through the block table, dequantizes int8/fp8 in registers and serves every chunk of the step in
one launch per layer.

Grid: (ceil(max_q_len / BLOCK_M), S, H); a program owns BLOCK_M query rows of one head.
"""

from __future__ import annotations

import torch
from quantlab.kernels.paged_attention import dot_precision, ref_context

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None

BLOCK_M = 32  # query rows per program


def ref_paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    kv_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """Torch reference: out [T, H, D] (q's dtype; rows no sequence owns are 0), float32 math."""
    out = torch.zeros_like(q)
    for s in range(q_starts.shape[0]):
        n, ctx, q0 = int(q_lens[s]), int(ctx_lens[s]), int(q_starts[s])
        if n == 0:
            continue
        k, v = ref_context(k_cache, v_cache, block_tables[s], ctx, kv_scale, q.dtype, q.shape[1])
        sc = torch.einsum("ihd,jhd->hij", q[q0 : q0 + n].float(), k) * sm_scale
        pos = torch.arange(ctx - n, ctx, device=q.device).view(1, -1, 1)
        sc = sc.masked_fill(torch.arange(ctx, device=q.device).view(1, 1, -1) > pos, float("-inf"))
        out[q0 : q0 + n] = torch.einsum("hij,jhd->ihd", torch.softmax(sc, -1), v).to(q.dtype)
    return out


if triton is not None:
    from quantlab.kernels.paged_attention import attend_block

    @triton.jit
    def _prefill_kernel(
        Q,
        K,
        V,
        BT,
        QS,
        QL,
        CL,
        Out,
        sm_scale,
        kv_scale,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_bt,
        stride_ot,
        stride_oh,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        BLOCK: tl.constexpr,
        QUANT: tl.constexpr,
        PREC: tl.constexpr,
    ):
        mt = tl.program_id(0)
        s = tl.program_id(1)
        h = tl.program_id(2)
        n = tl.load(QL + s)
        ctx = tl.load(CL + s)
        q0 = tl.load(QS + s)
        hk = h // GROUP
        rows = mt * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        pos = ctx - n + rows  # each query row's position in its sequence
        dd = tl.arange(0, D)
        nn = tl.arange(0, BS)
        q = tl.load(
            Q + (q0 + rows)[:, None] * stride_qt + h * stride_qh + dd[None, :],
            mask=rmask[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        # keys up to the tile's last row position; rows past n see no more than row n - 1
        last = tl.minimum(ctx, ctx - n + mt * BLOCK + BLOCK)
        hi = tl.where(mt * BLOCK < n, tl.cdiv(last, BS), 0)  # a tile past the chunk: no work
        j = 0
        while j < hi:  # a while loop: the interpreter's range() cannot take loaded bounds
            blk = tl.load(BT + s * stride_bt + j).to(tl.int64)
            off = blk * stride_kb + nn[:, None] * stride_ks + hk * stride_kh + dd[None, :]
            keys = j * BS + nn
            kmask = keys < ctx
            ok = (keys[None, :] <= pos[:, None]) & kmask[None, :]
            m_i, l_i, acc = attend_block(
                q, K, V, off, kmask, ok, m_i, l_i, acc, sm_scale, kv_scale, QUANT, PREC
            )
            j += 1
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            Out + (q0 + rows)[:, None] * stride_ot + h * stride_oh + dd[None, :],
            out.to(Out.dtype.element_ty),
            mask=rmask[:, None],
        )


def _check(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens) -> None:
    h, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("paged prefill: k_cache and v_cache must match in shape and dtype")
    if h % hkv:
        raise ValueError(f"paged prefill: {h} query heads are not a multiple of {hkv} KV heads")
    if d & (d - 1) or d < 16:
        raise ValueError(f"paged prefill: head dim {d} must be a power of two >= 16")
    for name, t in (("block_tables", block_tables), ("q_starts", q_starts), ("q_lens", q_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"paged prefill: {name} must be int32")
    s = q_starts.shape[0]
    if ctx_lens.dtype != torch.int32 or q_lens.shape != (s,) or ctx_lens.shape != (s,):
        raise ValueError("paged prefill: q_starts, q_lens, ctx_lens must be int32 [S]")
    if block_tables.shape[0] != s:
        raise ValueError("paged prefill: block_tables must be [S, max_blocks]")
    if any(t.stride(0) != 1 and s > 1 for t in (q_starts, q_lens, ctx_lens)) or (
        block_tables.stride(1) != 1 and block_tables.shape[1] > 1
    ):
        raise ValueError(
            "paged prefill: q_starts, q_lens, ctx_lens and each block_tables row must be contiguous"
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    kv_scale: float,
    sm_scale: float,
    max_q_len: int,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, H, D] for q [T, H, D] fp16/bf16/fp32: each packed chunk's causal attention over its
    paged context (module docstring). max_q_len >= max(q_lens) sizes the grid (no host sync).

    backend: "auto" (Triton on CUDA, the reference on CPU), "triton" (also under TRITON_INTERPRET),
    "reference". Rows no sequence owns are left as out holds them (zeros when out is None).
    """
    _check(q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens)
    if backend == "reference" or (backend == "auto" and (not q.is_cuda or triton is None)):
        return ref_paged_prefill_attention(
            q, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens, kv_scale, sm_scale
        )
    h, d = q.shape[1], q.shape[2]
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    q = q.contiguous()
    if out is None:
        out = torch.zeros_like(q)
    s = q_starts.shape[0]
    if s == 0 or max_q_len == 0:
        return out
    _prefill_kernel[(triton.cdiv(max_q_len, BLOCK_M), s, h)](
        q,
        k_cache,
        v_cache,
        block_tables,
        q_starts,
        q_lens,
        ctx_lens,
        out,
        sm_scale,
        kv_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=h // hkv,
        D=d,
        BS=bs,
        BLOCK=BLOCK_M,
        QUANT=k_cache.dtype in (torch.int8, torch.float8_e4m3fn),
        PREC=dot_precision(q),
        num_warps=8,
    )
    return out

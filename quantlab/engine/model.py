"""The engine's decoder for the Llama family (Llama, Mistral, Qwen2) on a flattened token batch.

A step runs T tokens of several sequences at once ([T, hidden] through every linear), writes their
K/V into the paged cache, and attends: decode rows through the paged decode kernel, a static
batch's whole prompts through one batched SDPA call, other prefill chunks through the paged
prefill kernel on CUDA (SDPA over each sequence's gathered context on CPU). Numerics follow the HF modeling
code (RMSNorm in float32, rotary tables in float32 cast to the activation dtype) so an unquantized
engine reproduces transformers' greedy tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.engine.config import ModelSpec
from quantlab.engine.kv_cache import PagedKVCache
from quantlab.engine.linear import EngineLinear
from quantlab.kernels import fused_ops
from quantlab.kernels.paged_attention import paged_decode_attention
from quantlab.kernels.paged_prefill import paged_prefill_attention

# QUANTLAB_ENGINE_FUSED=0 runs the step in plain torch ops on CUDA too (the benchmark's baseline).
FUSED = os.environ.get("QUANTLAB_ENGINE_FUSED", "1") != "0"
# QUANTLAB_ENGINE_PAGED_PREFILL=0 keeps SDPA over gathered contexts for prefill chunks on CUDA.
PAGED_PREFILL = os.environ.get("QUANTLAB_ENGINE_PAGED_PREFILL", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    """Whether this step runs the fused Triton elementwise kernels (CUDA, triton, not disabled)."""
    return FUSED and fused_ops.available(x)


@dataclass
class SeqSlice:
    """One sequence's part of a step: rows [start, start + n) of the batch, context after the step."""

    start: int
    n: int
    ctx_len: int
    blocks: torch.Tensor  # int64 [ceil(ctx_len / block_size)] pool block ids


@dataclass
class PrefillTables:
    """paged_prefill_attention's inputs for the chunks of a step that neither the decode kernel
    nor a batched SDPA call serves (int32 tensors on the step's device)."""

    block_tables: torch.Tensor  # [S, max_blocks]
    q_starts: torch.Tensor  # [S]
    q_lens: torch.Tensor  # [S]
    ctx_lens: torch.Tensor  # [S]
    max_q_len: int

    @staticmethod
    def build(seqs: list[SeqSlice], device: torch.device) -> PrefillTables:
        """Tables of seqs; their blocks padded with block 0 (the scratch block, never read)."""
        table = torch.nn.utils.rnn.pad_sequence([sq.blocks for sq in seqs], batch_first=True)
        rows = [[sq.start for sq in seqs], [sq.n for sq in seqs], [sq.ctx_len for sq in seqs]]
        meta = torch.tensor(rows, dtype=torch.int32).to(device)  # rows: each one contiguous
        return PrefillTables(
            table.to(device=device, dtype=torch.int32),
            meta[0],
            meta[1],
            meta[2],
            max(sq.n for sq in seqs),
        )


@dataclass
class StepBatch:
    """Inputs of one forward step (T tokens, B sequences)."""

    tokens: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    slots: torch.Tensor  # int64 [T] flat cache slots
    seqs: list[SeqSlice]
    logits_rows: torch.Tensor  # int64 [R]: rows of T whose logits are returned
    # The paged decode kernel's inputs: for every sequence of a decode-only step, or, in a mixed
    # step, for the one-token rows listed in decode_rows.
    block_tables: torch.Tensor | None = None  # int32 [B or Bd, max_blocks]
    ctx_lens: torch.Tensor | None = None  # int32 [B or Bd]
    num_splits: int = 1
    decode_rows: torch.Tensor | None = None  # int64 [Bd]: one-token rows of a mixed step
    # The paged prefill kernel's inputs for the step's other chunks, built by the first layer.
    prefill: PrefillTables | None = None

    @property
    def decode_only(self) -> bool:
        """Every sequence runs one token and the decode kernel's tables are set."""
        return self.block_tables is not None and self.decode_rows is None


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """float32 [D/2] rotary frequencies, with linear or llama3 scaling as HF computes them."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: long wavelengths scaled by factor, short ones kept, a smooth ramp between.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: float32 statistics, weight applied in the activation dtype. x [T, C]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DecoderLayer(nn.Module):
    """norm -> qkv -> rope -> paged attention -> dense; norm -> gate/up -> SiLU -> proj."""

    def __init__(self, spec: ModelSpec, linears: dict[str, EngineLinear]) -> None:
        super().__init__()
        self.spec = spec
        self.lin = nn.ModuleDict(linears)
        self.input_norm = nn.Parameter(torch.empty(0), requires_grad=False)
        self.post_norm = nn.Parameter(torch.empty(0), requires_grad=False)

    def mlp_split(self, h: torch.Tensor) -> torch.Tensor:
        """proj(silu(gate(h)) * up(h)) with separate gate and up linears; h [T, C]."""
        g, u = self.lin["gate"](h), self.lin["up"](h)
        return self.lin["proj"](F.silu(g) * u)

    def down(self, gu: torch.Tensor) -> torch.Tensor:
        """proj(silu(g) * u) of the fused gate|up output gu [T, 2I]."""
        if use_fused(gu):
            return self.lin["proj"](fused_ops.silu_mul(gu))
        g, u = gu.chunk(2, dim=-1)
        return self.lin["proj"](F.silu(g) * u)

    def norm_into(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        res: torch.Tensor | None,
        name: str | None,
        fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lin[name](norm(x + res)) or the norm itself when name is None, x + res): on the fused
        path a linear that quantizes its input with a static scale gets its codes from the norm
        kernel itself."""
        s = self.spec
        lin = self.lin[name] if name is not None else None
        assert lin is None or isinstance(lin, EngineLinear)
        storage = lin.static_input() if fused and lin is not None else None
        if storage is not None and lin is not None:
            xs = lin.t("x_scale")
            assert xs is not None
            codes, x = fused_ops.rms_norm_quant(x, w, s.norm_epsilon, res, xs, storage)
            return lin.forward_codes(codes, x.dtype), x
        if fused:
            h, x = fused_ops.rms_norm(x, w, s.norm_epsilon, residual=res)
        else:
            if res is not None:
                x = x + res
            h = rms_norm(x, w, s.norm_epsilon)
        return (lin(h) if lin is not None else h), x

    def forward(
        self,
        x: torch.Tensor,
        pending: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
        cache: PagedKVCache,
        index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [T, C], pending [T, C] or None) -> (x, this layer's MLP output); writes this layer's
        K/V of the T tokens into cache. The residual stream is x + pending: the previous layer's
        MLP output is added inside this layer's input norm (EngineModel adds the last one).

        On CUDA the fused kernels (kernels/fused_ops.py) run the norms (+ residual), rope with the
        KV write, and silu * up in one launch each, instead of 30-40 small torch kernels per layer.
        """
        s = self.spec
        fused = use_fused(x)
        qkv, x = self.norm_into(x, self.input_norm, pending, "qkv", fused)
        if fused:
            qkv = qkv.contiguous()
            cache.write_rope_fused(index, batch.slots, qkv, cos[:, 0], sin[:, 0], s)
        nq, nkv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q = qkv[:, :nq].reshape(-1, s.num_heads, s.head_dim)
        if not fused:
            k = qkv[:, nq : nq + nkv].reshape(-1, s.num_kv_heads, s.head_dim)
            v = qkv[:, nq + nkv :].reshape(-1, s.num_kv_heads, s.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.write(index, batch.slots, k, v)
        attn = attention(q, batch, cache, index, s)
        dense = self.lin["dense"](attn.reshape(attn.shape[0], -1))
        if "gate_up" in self.lin:
            gu, x = self.norm_into(x, self.post_norm, dense, "gate_up", fused)
            return x, self.down(gu)
        h, x = self.norm_into(x, self.post_norm, dense, None, fused)
        return x, self.mlp_split(h)


def fresh_prompt_runs(seqs: list[SeqSlice]) -> list[list[SeqSlice]]:
    """Runs of >= 2 consecutive whole prompts (n == ctx_len > 1) of one length in adjacent rows:
    their causal attention is one batched call."""
    runs: list[list[SeqSlice]] = []
    cur: list[SeqSlice] = []
    for sq in seqs:
        fresh = sq.n == sq.ctx_len and sq.n > 1
        if fresh and cur and sq.n == cur[0].n and sq.start == cur[-1].start + cur[-1].n:
            cur.append(sq)
            continue
        if len(cur) > 1:
            runs.append(cur)
        cur = [sq] if fresh else []
    if len(cur) > 1:
        runs.append(cur)
    return runs


def attention(
    q: torch.Tensor, batch: StepBatch, cache: PagedKVCache, layer: int, spec: ModelSpec
) -> torch.Tensor:
    """[T, H, D]: each row's attention over its sequence's cached context (itself included)."""
    sm_scale = 1.0 / math.sqrt(spec.head_dim)

    def paged(qd: torch.Tensor) -> torch.Tensor:  # the decode kernel over the batch's tables
        assert batch.ctx_lens is not None and batch.block_tables is not None
        return paged_decode_attention(
            qd,
            cache.k[layer],
            cache.v[layer],
            batch.block_tables,
            batch.ctx_lens,
            cache.scales[layer],
            sm_scale,
            batch.num_splits,
        )

    if batch.decode_only:
        return paged(q)
    out = torch.empty_like(q)
    rows = batch.decode_rows
    if rows is not None:  # the mixed step's one-token rows: one kernel call for all of them
        out[rows] = paged(q[rows])
    groups = spec.num_heads // spec.num_kv_heads
    batched: set[int] = set()
    for run in fresh_prompt_runs(batch.seqs):  # a static batch's prompts: one SDPA call
        n, b, s0 = run[0].n, len(run), run[0].start
        k, v = cache.gather_batch(layer, torch.stack([sq.blocks for sq in run]), n, q.dtype)
        qs = q[s0 : s0 + b * n].view(b, n, *q.shape[1:]).transpose(1, 2)  # [B, H, n, D]
        ks = k.repeat_interleave(groups, dim=2).transpose(1, 2)
        vs = v.repeat_interleave(groups, dim=2).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=sm_scale)
        out[s0 : s0 + b * n] = o.transpose(1, 2).reshape(b * n, *q.shape[1:])
        batched.update(id(sq) for sq in run)
    rest = [sq for sq in batch.seqs if not ((rows is not None and sq.n == 1) or id(sq) in batched)]
    if rest and PAGED_PREFILL and use_fused(q):  # CUDA: the other chunks in one launch
        if batch.prefill is None:
            batch.prefill = PrefillTables.build(rest, q.device)
        t = batch.prefill
        paged_prefill_attention(
            q,
            cache.k[layer],
            cache.v[layer],
            t.block_tables,
            t.q_starts,
            t.q_lens,
            t.ctx_lens,
            cache.scales[layer],
            sm_scale,
            t.max_q_len,
            backend="triton",
            out=out,
        )
        return out
    for sq in rest:
        k, v = cache.gather(layer, sq.blocks, sq.ctx_len, q.dtype)
        qs = q[sq.start : sq.start + sq.n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        ks = k.repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        vs = v.repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        if sq.n == 1:
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=sm_scale)
        elif sq.n == sq.ctx_len:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=sm_scale)
        else:  # a chunk after a cached prefix: query i sits at position ctx - n + i
            i = torch.arange(sq.n, device=q.device).view(-1, 1)
            j = torch.arange(sq.ctx_len, device=q.device).view(1, -1)
            mask = j <= (sq.ctx_len - sq.n + i)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=sm_scale)
        out[sq.start : sq.start + sq.n] = o[0].transpose(0, 1)
    return out


class EngineModel(nn.Module):
    """Embedding, decoder layers, final norm and lm_head; forward(batch, cache) -> logits."""

    def __init__(self, spec: ModelSpec, layers: list[DecoderLayer], lm_head: EngineLinear) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(layers)
        self.lm_head = lm_head
        self.embed = nn.Parameter(torch.empty(0), requires_grad=False)
        self.final_norm = nn.Parameter(torch.empty(0), requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] in dtype for int64 positions [T] (HF: float32 tables, then cast)."""
        inv = self.inv_freq
        assert isinstance(inv, torch.Tensor)
        freqs = positions.float().view(-1, 1) * inv.view(1, -1).to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """float32 logits [R, V] for batch.logits_rows."""
        x = F.embedding(batch.tokens, self.embed)
        cos, sin = self.rope(batch.positions, x.dtype)
        pending: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            x, pending = layer(x, pending, cos, sin, batch, cache, i)
        rows = batch.logits_rows
        x = x.index_select(0, rows)
        if pending is not None:
            x = x + pending.index_select(0, rows)
        x = rms_norm(x, self.final_norm, self.spec.norm_epsilon)
        return self.lm_head(x).float()

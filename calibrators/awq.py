"""AWQ: activation-aware per-input-channel weight scales, folded into the float model, then clipping.

Per decoder layer: a grid search over the exponent of the activation scale for each smoothing
group (norm -> q|k|v, norm -> gate|up) and for each producer -> consumer pair (v_proj -> o_proj,
up_proj -> down_proj), each minimizing the squared output error of the group's linears on cached
calibration inputs; the scales are folded into the float weights (the float function is
unchanged); then a per-group clip search and the final codes. Exported as W4A16_AWQ (sym,
pre-quant scale ones: the scales live in the norms / producers) or W4A16_GPTQ (asym).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from quantlab.adapters import Pair
from quantlab.calibrator import CalibratorArgs, LayerContext, param, record_fold
from quantlab.errors import InputError
from quantlab.formats import PRESETS, QuantFormat
from quantlab.primitives import compute_qparams, dequantize, qparams_from_range, quantize
from quantlab.state import FOLD_IN, FOLD_OUT, ModuleState

log = logging.getLogger(__name__)

FORMATS = ("int4_channel", *(f"int4_g{g}_{k}" for g in (32, 64, 128) for k in ("sym", "asym")))


class AWQArgs(CalibratorArgs):
    """format: int4_g{32,64,128}_{sym,asym} or int4_channel; grid: candidates per search."""

    format: str = "int4_g64_sym"
    grid: int = Field(20, ge=2, le=200)
    # s = mean|x|^a / mean|w_norm|^(1-a) instead of mean|x|^a (AutoAWQ's "duo scaling").
    duo_scaling: bool = False
    clip_search: bool = True
    max_clip_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    # Raw inputs kept per observed module (every 2^k-th calibration token; see TokenSample).
    max_tokens: int = Field(4096, ge=16)
    # An MoE expert linear that saw fewer calibration tokens (the router rarely picks it) gets no
    # scale or clip search: plain round-to-nearest, counted in the run's summary.
    min_tokens: int = Field(16, ge=1)

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"AWQ supports the formats {', '.join(FORMATS)}; got '{v}'")
        return v


def fake_quant_weight(w: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of w [N, K] at fmt (float32 out)."""
    scale, zero = compute_qparams(w, fmt, "weight", scale_dtype)
    return dequantize(quantize(w, scale, zero, fmt), scale, zero, fmt)


def output_error_fn(x: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """e [N, K] -> ||x e^T||^2 for inputs x [T, K] float32; through the Gram x^T x when T > K (cheaper)."""
    if x.shape[0] > x.shape[1]:
        h = x.T @ x
        return lambda e: float(((e @ h) * e).sum())
    return lambda e: float((x @ e.T).pow(2).sum())


def channel_mean(v: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of v [K] over the channels mapped to each of n scale channels by index [K] (int64)."""
    total = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, index, v)
    count = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, index, torch.ones_like(v))
    return total / count


@dataclass
class ScaleResult:
    """Chosen scales s [S] (float32; ones when nothing beat RTN), exponent and output errors."""

    scale: torch.Tensor
    alpha: float | None
    err_rtn: float
    err_awq: float


def search_scale(
    x: torch.Tensor,
    x_mean: torch.Tensor,
    w: torch.Tensor,
    fmt: QuantFormat,
    grid: int = 20,
    duo_scaling: bool = False,
    index: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> ScaleResult:
    """Per-channel scales for the linears w [N, K] reading x [T, K] (mean |x| over all tokens: x_mean [K]).

    index [K] (int64) maps input channels onto S shared scale channels (GQA: the o_proj channels of
    query heads that read one KV head share a scale); None means one scale per channel. The output
    of x / s @ Q(w * s)^T is compared with x @ w^T for s = s(a), a in {0, 1/grid, ..., 1 - 1/grid}.
    """
    w = w.float()
    index = torch.arange(w.shape[1], device=w.device) if index is None else index.to(w.device)
    n = int(index.max()) + 1
    xs = channel_mean(x_mean.float(), index, n)
    if duo_scaling and fmt.group_size:
        g = w.abs().reshape(w.shape[0], -1, fmt.group_size)
        g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)
        ws = channel_mean(g.reshape(w.shape).mean(dim=0), index, n)
    else:
        ws = None
    err = output_error_fn(x.float())
    err_rtn = err(w - fake_quant_weight(w, fmt, scale_dtype))
    best = ScaleResult(torch.ones(n, device=w.device), None, err_rtn, err_rtn)
    for i in range(grid):
        a = i / grid
        s = xs.pow(a) if ws is None else xs.pow(a) / ws.pow(1 - a).clamp(min=1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (log scale)
        sf = s[index]
        e = err(w - fake_quant_weight(w * sf, fmt, scale_dtype) / sf)
        if e < best.err_awq:
            best = ScaleResult(s, a, err_rtn, e)
    return best


def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    fmt: QuantFormat,
    grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped range (lo, hi) [N, K/G] float32 of w [N, K]: per group, the shrink of its (min, max) in
    [1 - max_shrink, 1] minimizing that group's share of the output error on inputs x [T, K].
    """
    w = w.float()
    gs = fmt.group_size or w.shape[1]
    wg = w.reshape(w.shape[0], -1, gs)
    xg = x.float().reshape(x.shape[0], -1, gs).transpose(0, 1)  # [K/G, T, G]
    h = xg.transpose(1, 2) @ xg  # per-group Gram [K/G, G, G]: cross-group terms ignored
    lo0, hi0 = wg.amin(dim=-1), wg.amax(dim=-1)
    if fmt.symmetric:
        hi0 = torch.maximum(-lo0, hi0)
        lo0 = -hi0
    best = torch.full_like(lo0, float("inf"))
    lo, hi = lo0.clone(), hi0.clone()
    for i in range(grid + 1):
        r = 1.0 - max_shrink * i / grid
        scale, zero = qparams_from_range(lo0 * r, hi0 * r, fmt, scale_dtype)
        e = (w - dequantize(quantize(w, scale, zero, fmt), scale, zero, fmt)).reshape(wg.shape)
        e = e.transpose(0, 1)  # [K/G, N, G]
        err = ((e @ h) * e).sum(dim=-1).T  # [N, K/G]
        better = err < best
        best = torch.where(better, err, best)
        lo, hi = torch.where(better, lo0 * r, lo), torch.where(better, hi0 * r, hi)
    shape = lo.shape if fmt.group_size else lo.shape[:1]  # channel scales are [N]
    return lo.reshape(shape), hi.reshape(shape)


@dataclass
class TokenSample:
    """Streaming per-module statistics: mean |x| over every token, raw rows of every stride-th token.

    stride doubles whenever more than cap rows are kept, so the sample is every stride-th token of
    the whole stream (deterministic, spread over all windows) and holds between cap/2 and cap rows.
    """

    cap: int
    abs_sum: torch.Tensor | None = None
    seen: int = 0
    stride: int = 1
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        """Add x [..., K] (any float dtype)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(dim=0, dtype=torch.float64)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.rows.append(x[(-self.seen) % self.stride :: self.stride].clone())
        self.seen += x.shape[0]
        while sum(r.shape[0] for r in self.rows) > self.cap:
            self.rows, self.stride = [torch.cat(self.rows)[::2].clone()], self.stride * 2

    def tokens(self) -> torch.Tensor:
        """Kept rows [T, K] float32."""
        return torch.cat(self.rows)

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per channel over every token seen [K] float32."""
        assert self.abs_sum is not None
        return (self.abs_sum / self.seen).float()


@torch.no_grad()
def fold_scale(
    ctx: LayerContext,
    producer: str | None,
    consumers: tuple[str, ...],
    s: torch.Tensor,
    rows: tuple[int, int] | None = None,
) -> None:
    """Divide producer's output channels (norm weight/bias or linear rows/bias; only rows [start,
    stop) of a fused linear when rows is given) by s [C] and multiply each consumer's input columns
    [N, C] by s [C] (float32); the layer's float output is unchanged. A norm of an adapter with
    norm_offset o computes x_hat * (o + w): its weight becomes (o + w) / s - o.
    """
    prod = ctx.module(producer) if producer is not None else None
    if isinstance(prod, nn.Linear) and producer is not None:
        full = torch.ones(prod.out_features, device=s.device)
        a, b = rows if rows is not None else (0, prod.out_features)
        full[a:b] = s
        record_fold(ctx, producer, FOLD_OUT, full)
    offset = 0.0 if isinstance(prod, nn.Linear) else ctx.adapter.norm_offset
    for attr in ("weight", "bias") if prod is not None else ():
        t = getattr(prod, attr, None)
        if isinstance(t, torch.Tensor):
            d = t.detach()
            a, b = rows if rows is not None else (0, d.shape[0])
            part = d[a:b]
            div = s if d.dim() == 1 else s[:, None]
            off = offset if attr == "weight" else 0.0
            part.copy_(((part.float() + off) / div - off).to(d.dtype))
    for c in consumers:
        w = param(ctx.module(c), "weight")
        w.copy_((w.float() * s[None, :]).to(w.dtype))
        record_fold(ctx, c, FOLD_IN, s)


def pair_index(ctx: LayerContext, pair: Pair, who: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(index [K_consumer] int64 onto the producer's feeding rows, their (start, stop) range).

    GQA: the o_proj channels of query heads that read one KV head map onto that head's V rows.
    """
    a, b = pair.row_range(ctx.weight(pair.producer).shape[0])
    n_out, n_in = b - a, ctx.weight(pair.consumer).shape[1]
    dev = ctx.weight(pair.consumer).device
    if n_out == n_in:
        return torch.arange(n_in, device=dev), (a, b)
    hd = getattr(ctx.module(pair.producer.rpartition(".")[0]), "head_dim", None)
    if not isinstance(hd, int):
        raise InputError(
            f"{who}: {pair.producer} has {n_out} outputs for {n_in} inputs of {pair.consumer} and "
            "its parent module has no integer head_dim to map grouped-query heads; set "
            "fold_pairs: false (SmoothQuant) or fix the adapter's pair."
        )
    return gqa_index(n_in, n_out, hd).to(dev), (a, b)


def gqa_index(n_in: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Map [n_in] (int64) of o_proj input channels onto v_proj output channels: query head h reads
    KV head h // (heads / kv_heads); identity without GQA.
    """
    c = torch.arange(n_in)
    return (c // head_dim) // (n_in // n_kv) * head_dim + c % head_dim


class AWQCalibrator:
    """AWQ weight-only INT4. Edits float weights: it folds its scales into the norms, q/k/v, v/o,
    gate/up and up/down of each layer (float function unchanged) before quantizing.
    """

    name: ClassVar[str] = "awq"
    Args: ClassVar[type[CalibratorArgs]] = AWQArgs
    edits_weights: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True

    def __init__(self, args: AWQArgs) -> None:
        self.args = args
        self.fmt = PRESETS[args.format]
        self._obs: dict[str, TokenSample] = {}

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(int4 weight format, None): weight-only."""
        return self.fmt, None

    def targets(self, ctx: LayerContext) -> list[str]:
        """First linear of each smoothing group with a quantized member, and each pair's consumer."""
        first = [m[0] for _, m in ctx.adapter.smoothing_groups if set(m) & set(ctx.linears)]
        pairs = [p.consumer for p in ctx.adapter.pairs if p.consumer in ctx.linears]
        # Each expert's gate|up input: the tokens routed to it, for its clip search.
        experts = [g[0] for g in ctx.adapter.expert_groups() if g[0] in ctx.linears]
        return first + pairs + experts

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Mean |x| over all tokens and at most max_tokens raw rows of x [..., K]."""
        self._obs.setdefault(name, TokenSample(self.args.max_tokens)).add(x)

    def _search(
        self, ctx: LayerContext, src: str, members: list[str], index: torch.Tensor | None = None
    ) -> ScaleResult:
        obs, a = self._obs[src], self.args
        w = torch.cat([ctx.weight(m) for m in members])
        return search_scale(
            obs.tokens(), obs.mean_abs(), w, self.fmt, a.grid, a.duo_scaling, index, ctx.scale_dtype
        )

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Search and fold scales group by group, then clip-search and quantize each linear."""
        lin = set(ctx.linears)
        src: dict[str, str] = {}  # linear -> the observed module whose input it reads
        found: list[tuple[tuple[str, ...], ScaleResult]] = []
        for norm, members in ctx.adapter.smoothing_groups:
            src.update({m: members[0] for m in members})
            if members[0] in self._obs:
                res = self._search(ctx, members[0], [m for m in members if m in lin])
                fold_scale(ctx, norm, members, res.scale)
                self._obs[members[0]].rows = [self._obs[members[0]].tokens() / res.scale]
                found.append((members, res))
        for pair in ctx.adapter.pairs:
            consumer = pair.consumer
            seen = self._obs[consumer].seen if consumer in self._obs else 0
            if seen == 0 or (seen < self.args.min_tokens and ctx.adapter.is_expert(consumer)):
                continue
            index, rows = pair_index(ctx, pair, "AWQ")
            res = self._search(ctx, consumer, [consumer], index)
            fold_scale(ctx, pair.producer, (), res.scale, rows)
            fold_scale(ctx, None, (consumer,), res.scale[index])
            self._obs[consumer].rows = [self._obs[consumer].tokens() / res.scale[index]]
            found.append(((consumer,), res))
        src.update({m: g[0] for g in ctx.adapter.expert_groups() for m in g})
        out = {n: self._quantize(ctx, n, src.get(n, n)) for n in ctx.linears}
        self._obs.clear()
        for members, r in found:
            ratio = r.err_awq / max(r.err_rtn, 1e-30)
            for m in set(members) & set(out):
                out[m].meta.update(awq_alpha=r.alpha, awq_err_vs_rtn=ratio)
        log.info(
            "layer %d awq (exponent, output error / RTN's): %s",
            ctx.index,
            ", ".join(
                f"{m[0]} {r.alpha} {r.err_awq / max(r.err_rtn, 1e-30):.3f}" for m, r in found
            ),
        )
        return out

    def _quantize(self, ctx: LayerContext, name: str, src: str) -> ModuleState:
        w = ctx.weight(name).float()
        seen = self._obs[src].seen if src in self._obs else 0
        meta: dict[str, object] = {"calib_tokens": seen}
        short = seen == 0 or (seen < self.args.min_tokens and ctx.adapter.is_expert(name))
        if short:
            meta["fallback"] = "rtn"
        if self.args.clip_search and not short:
            a = self.args
            x = self._obs[src].tokens()
            lo, hi = search_clip(x, w, self.fmt, a.grid, a.max_clip_shrink, ctx.scale_dtype)
            scale, zero = qparams_from_range(lo, hi, self.fmt, ctx.scale_dtype)
        else:
            scale, zero = compute_qparams(w, self.fmt, name, ctx.scale_dtype)
        tensors = {"qweight": quantize(w, scale, zero, self.fmt), "weight_scale": scale}
        if zero is not None:
            tensors["weight_zero"] = zero
        return ModuleState(weight_format=self.fmt, tensors=tensors, meta=meta)

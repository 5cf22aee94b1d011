"""SmoothQuant W8A8: migrate activation outliers into the weights, then INT8 weights and activations.

Xiao et al. 2022 (arXiv:2211.10438). Per input channel j of a linear group reading one activation,
s_j = max|X_j|^a / max|W_j|^(1-a); the activation is divided by s and the weight columns are
multiplied by it, which leaves the float function unchanged when s is folded into the producer of
the activation: the norm before q|k|v and before gate|up, and (fold_pairs) v_proj's rows before
o_proj (GQA-aware) and up_proj's rows before down_proj. The exponent a is fixed (recipe) or searched
per group on the squared output error of the group's linears under W8A8 fake quantization, on a
capped token sample. Then every linear gets INT8 codes (per-tensor or per-channel scales) and an
INT8 input format: static per-tensor with `input_scale` measured on the smoothed activation, or
dynamic per-token. `migrate: false` is plain W8A8 (the baseline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from quantlab.calibrators.awq import TokenSample, fold_scale, pair_index

from quantlab.calibrator import CalibratorArgs, LayerContext
from quantlab.errors import InputError
from quantlab.formats import PRESETS, QuantFormat
from quantlab.primitives import (
    check_finite,
    compute_qparams,
    dequantize,
    fake_quant,
    fake_quant_static,
    quantize,
)
from quantlab.state import ModuleState

log = logging.getLogger(__name__)

INT8_QMAX = 127.0


class SmoothQuantArgs(CalibratorArgs):
    """alpha: migration strength in [0, 1] or "search"; weights/activations: the W8A8 granularity."""

    alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["search"] = 0.5
    grid: int = Field(20, ge=1, le=100)  # search candidates: a in {0, 1/grid, ..., 1}, plus s = 1
    weights: Literal["tensor", "channel"] = "channel"
    activations: Literal["static_tensor", "dynamic_token"] = "static_tensor"
    fold_pairs: bool = True  # also v_proj -> o_proj and up_proj -> down_proj
    # With an INT8 KV cache after kv_equalize: scale the v -> o factors so that V keeps its range
    # (keep_range). Off by default: the common factor is exact only in exact arithmetic; the fp16
    # weight scales then round differently (measured: 24.946 -> 25.031 on the per-token a = 0.5 row).
    keep_v_range: bool = False
    migrate: bool = True  # false: plain W8A8, no smoothing (the baseline)
    # A fused runtime computes q|k|v (and gate|up) in one GEMM with one per-tensor weight scale.
    share_fused_scales: bool = True
    # Per-window smoothed maxima -> static scale: "max" clips no calibration token, "mean" of the
    # window maxima trades rare clipping for a finer grid.
    activation_amax: Literal["max", "mean"] = "max"
    max_tokens: int = Field(4096, ge=16)  # raw rows kept per observed module for the search


def migration_scale(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = act_amax^alpha / w_amax^(1 - alpha) (float32) from per-channel maxima [K].

    s = 1 where either maximum is 0: no calibration token (or no weight) reaches that channel, so
    there is nothing to migrate, and a tiny s would blow the folded norm weight up.
    """
    a, w = act_amax.float(), w_amax.float()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s))


def channel_amax(v: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Max of v [K] over the channels index [K] (int64) maps onto each of n channels; 0 if none."""
    return torch.zeros(n, dtype=v.dtype, device=v.device).scatter_reduce_(
        0, index, v, "amax", include_self=False
    )


def static_input_scale(
    window_amax: torch.Tensor, s: torch.Tensor, how: Literal["max", "mean"] = "max"
) -> torch.Tensor:
    """Per-tensor INT8 scale [1] (float32) of the smoothed activation x / s.

    window_amax [W, K]: max |x_j| per calibration window and channel. max_j amax_j / s_j is exactly
    the per-tensor max of x / s, so no smoothed activation is needed; "max" over windows clips no
    calibration token, "mean" averages the window maxima.
    """
    per_window = (window_amax.float() / s.float()).amax(dim=1)
    a = per_window.amax() if how == "max" else per_window.mean()
    return (torch.where(a > 0, a, torch.ones_like(a)) / INT8_QMAX).reshape(1)


def int8_weights(
    ws: list[torch.Tensor], fmt: QuantFormat, shared: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(codes int8 [N, K], float32 scale) of each w [N, K]; per-tensor scales are one max when shared."""
    scales = [compute_qparams(w, fmt, "weight")[0] for w in ws]
    if shared and fmt.granularity == "tensor":
        top = torch.stack(scales).amax(dim=0)
        # One value in separate tensors: safetensors refuses to save aliased tensors.
        scales = [top.clone() for _ in ws]
    return [(quantize(w, s, None, fmt), s) for w, s in zip(ws, scales, strict=True)]


def group_error(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    s: torch.Tensor,
    wfmt: QuantFormat,
    afmt: QuantFormat,
    window_amax: torch.Tensor,
    ref: torch.Tensor,
    how: Literal["max", "mean"] = "max",
    shared: bool = True,
) -> float:
    """||ref - Qa(x / s) Qw(W s)^T||^2 for tokens x [T, K], weights ws ([N_i, K]) and scales s [K].

    Qa is the deployed activation quantizer: static per-tensor with the scale from every calibration
    token (window_amax [W, K]), or dynamic per-token; Qw round-to-nearest INT8 at wfmt.
    """
    xs = x / s
    if afmt.granularity == "tensor":
        xq = fake_quant_static(xs, static_input_scale(window_amax, s, how), afmt)
    else:
        xq = fake_quant(xs, afmt, "activation")
    wq = [
        dequantize(q, sc, None, wfmt) for q, sc in int8_weights([w * s for w in ws], wfmt, shared)
    ]
    return float((xq @ torch.cat(wq).T - ref).pow(2).sum())


@dataclass
class AlphaResult:
    """Migration scales [S] (float32), the exponent (None: s = 1) and output errors (nan: not measured)."""

    scale: torch.Tensor
    alpha: float | None
    err_plain: float = math.nan
    err_best: float = math.nan


def smooth_scale(
    window_amax: torch.Tensor, ws: list[torch.Tensor], alpha: float, index: torch.Tensor
) -> torch.Tensor:
    """Scales [S] for the channels index [K] maps to (GQA: o_proj columns -> v channels), exponent alpha."""
    n = int(index.max()) + 1
    act = channel_amax(window_amax.float().amax(dim=0), index, n)
    wmax = channel_amax(torch.cat(ws).float().abs().amax(dim=0), index, n)
    return migration_scale(act, wmax, alpha)


def keep_range(amax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s [S] times the common factor that keeps max_j amax_j / s_j equal to max_j amax_j.

    amax [S] holds the producer's output channel maxima (v_proj's V). A common factor on s changes
    no INT8 code of a W8A8 linear in exact arithmetic (every weight and activation scale follows
    it), but it restores the producer's output range: V is what an INT8 KV cache stores under the
    one scale K and V share, and kv_equalize has already set V to K's range.
    """
    a = amax.float()
    before, after = float(a.max()), float((a / s).max())
    return s if before <= 0 or after <= 0 else s * (after / before)


def search_alpha(
    x: torch.Tensor,
    window_amax: torch.Tensor,
    ws: list[torch.Tensor],
    wfmt: QuantFormat,
    afmt: QuantFormat,
    grid: int = 20,
    index: torch.Tensor | None = None,
    how: Literal["max", "mean"] = "max",
    shared: bool = True,
) -> AlphaResult:
    """The exponent in {0, 1/grid, ..., 1} (or none, s = 1) minimizing group_error on x [T, K].

    window_amax [W, K] holds every calibration token's channel maxima; x is the capped sample.
    """
    x = x.float()
    ws = [w.float() for w in ws]
    index = torch.arange(x.shape[1], device=x.device) if index is None else index
    ref = x @ torch.cat(ws).T

    def err(s: torch.Tensor) -> float:
        return group_error(x, ws, s[index], wfmt, afmt, window_amax, ref, how, shared)

    ones = torch.ones(int(index.max()) + 1, device=x.device)
    plain = err(ones)
    best = AlphaResult(ones, None, plain, plain)
    for i in range(grid + 1):
        s = smooth_scale(window_amax, ws, i / grid, index)
        e = err(s)
        if e < best.err_best:
            best = AlphaResult(s, i / grid, plain, e)
    return best


class SmoothQuantCalibrator:
    """SmoothQuant + INT8 W8A8. Edits float weights: it folds its scales into the norms, q/k/v,
    v/o, gate/up and up/down of each layer (float function unchanged) before quantizing.
    """

    name: ClassVar[str] = "smoothquant"
    Args: ClassVar[type[CalibratorArgs]] = SmoothQuantArgs
    edits_weights: ClassVar[bool] = True

    def __init__(self, args: SmoothQuantArgs) -> None:
        self.args = args
        self.wfmt = PRESETS[f"int8_{args.weights}"]
        self.afmt = PRESETS["int8_tensor" if args.activations == "static_tensor" else "int8_token"]
        self.search = args.alpha == "search"
        # Plain W8A8 with dynamic per-token activations needs no calibration data.
        self.needs_data = args.migrate or self.afmt.granularity == "tensor"
        self._amax: dict[str, list[torch.Tensor]] = {}  # module -> per-window channel maxima [K]
        self._sample: dict[str, TokenSample] = {}
        self._v_amax: torch.Tensor | None = None  # V's channel maxima over this layer's windows

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(int8 weight format, int8 input format)."""
        return self.wfmt, self.afmt

    @staticmethod
    def _sources(ctx: LayerContext) -> dict[str, str]:
        """Linear -> the observed module whose input it reads (q/k/v read q_proj's, gate/up gate_proj's)."""
        src = {m: members[0] for _, members in ctx.adapter.smoothing_groups for m in members}
        return {n: src.get(n, n) for n in ctx.linears}

    def targets(self, ctx: LayerContext) -> list[str]:
        """One linear per distinct input of the quantized linears (none for plain per-token)."""
        return list(dict.fromkeys(self._sources(ctx).values())) if self.needs_data else []

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Channel maxima of x [..., K] (one entry per call = per window); the capped sample if searching."""
        check_finite(x, f"input of {name}")
        xs = x.detach().reshape(-1, x.shape[-1])
        self._amax.setdefault(name, []).append(xs.abs().amax(dim=0).float())
        if self.search:
            self._sample.setdefault(name, TokenSample(self.args.max_tokens)).add(xs)

    def _scale(
        self, ctx: LayerContext, src: str, members: list[str], index: torch.Tensor
    ) -> AlphaResult:
        a = self.args
        windows = torch.stack(self._amax[src])
        ws = [ctx.weight(m) for m in members]
        if not self.search:
            return AlphaResult(smooth_scale(windows, ws, float(a.alpha), index), float(a.alpha))
        shared = a.share_fused_scales and len(ws) > 1
        x = self._sample[src].tokens()
        return search_alpha(
            x, windows, ws, self.wfmt, self.afmt, a.grid, index, a.activation_amax, shared
        )

    def observe_attention(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Channel maxima of V (value [B, H_kv, L, D]) per window, as v_proj's [H_kv * D] outputs."""
        del name, key
        v = value.detach().abs().amax(dim=(0, 2)).reshape(-1).float()
        self._v_amax = v if self._v_amax is None else torch.maximum(self._v_amax, v)

    def _producer_amax(
        self, ctx: LayerContext, producer: str, consumer: str, index: torch.Tensor
    ) -> torch.Tensor:
        """Output channel maxima [S] of producer: V as attention saw it for v_proj, else the
        consumer's input maxima mapped through index (attention averages V; the MLP does not)."""
        v = self._v_amax
        if (
            producer == ctx.adapter.pairs[0].producer
            and v is not None
            and v.numel() == int(index.max()) + 1
        ):
            return v.to(index.device)
        a = torch.stack(self._amax[consumer]).float().amax(dim=0)
        return channel_amax(a, index, int(index.max()) + 1)

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Fold the migration scales group by group, then INT8 codes + input format for each linear."""
        lin = set(ctx.linears)
        div: dict[str, torch.Tensor] = {}  # observed module -> the s its input is now divided by
        found: list[tuple[tuple[str, ...], AlphaResult]] = []
        if self.args.migrate:
            for norm, members in ctx.adapter.smoothing_groups:
                q = [m for m in members if m in lin]
                if not q or members[0] not in self._amax:
                    continue
                w0 = ctx.weight(members[0])
                res = self._scale(ctx, members[0], q, torch.arange(w0.shape[1], device=w0.device))
                fold_scale(ctx, norm, members, res.scale)
                div[members[0]] = res.scale
                found.append((tuple(q), res))
            for pair in ctx.adapter.pairs if self.args.fold_pairs else ():
                producer, consumer = pair.producer, pair.consumer
                if consumer not in lin or consumer not in self._amax:
                    continue
                index, rows = pair_index(ctx, pair, "SmoothQuant")
                res = self._scale(ctx, consumer, [consumer], index)
                if self.args.keep_v_range and pair == ctx.adapter.pairs[0]:
                    v = self._producer_amax(ctx, producer, consumer, index)
                    res.scale = keep_range(v, res.scale)
                fold_scale(ctx, producer, (), res.scale, rows)
                fold_scale(ctx, None, (consumer,), res.scale[index])
                div[consumer] = res.scale[index]
                found.append(((consumer,), res))
        out = self._quantize(ctx, div)
        for members, r in found:
            meta: dict[str, float | None] = {"sq_alpha": r.alpha}
            if not math.isnan(r.err_plain):
                meta["sq_err_vs_plain"] = r.err_best / max(r.err_plain, 1e-30)
            for m in members:
                out[m].meta.update(meta)
        if found:  # exponent (None: s = 1) and, when searched, output error / plain W8A8's
            log.info(
                "layer %d smoothquant: %s",
                ctx.index,
                ", ".join(f"{m[0]} {out[m[0]].meta}" for m, _ in found),
            )
        self._amax.clear()
        self._sample.clear()
        self._v_amax = None
        return out

    def _quantize(self, ctx: LayerContext, div: dict[str, torch.Tensor]) -> dict[str, ModuleState]:
        src = self._sources(ctx)
        share = self.args.share_fused_scales
        groups = [g for g in ctx.adapter.fused_groups if share and all(n in src for n in g)]
        shared = {n: g for g in groups for n in g}
        codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for n in ctx.linears:
            if n not in codes:
                members = shared.get(n, (n,))
                ws = [ctx.weight(m) for m in members]
                codes.update(zip(members, int8_weights(ws, self.wfmt, len(ws) > 1), strict=True))
        out: dict[str, ModuleState] = {}
        for n in ctx.linears:
            tensors = {"qweight": codes[n][0], "weight_scale": codes[n][1]}
            if self.afmt.granularity == "tensor":
                # An expert no calibration token was routed to: its peers' inputs bound it.
                peers = [m for m in ctx.adapter.expert_peers(src[n]) if m in self._amax]
                obs = [src[n]] if src[n] in self._amax else peers
                if not obs:
                    raise InputError(
                        f"SmoothQuant: no calibration input reached {ctx.prefix}.{n} or any peer "
                        "expert; use more calibration windows or dynamic_token activations."
                    )
                windows = torch.stack([w for m in obs for w in self._amax[m]])
                s = div.get(src[n], torch.ones(windows.shape[1], device=windows.device))
                tensors["input_scale"] = static_input_scale(windows, s, self.args.activation_amax)
            out[n] = ModuleState(weight_format=self.wfmt, input_format=self.afmt, tensors=tensors)
        return out


__all__ = [
    "AlphaResult",
    "SmoothQuantArgs",
    "SmoothQuantCalibrator",
    "group_error",
    "int8_weights",
    "migration_scale",
    "search_alpha",
    "smooth_scale",
    "static_input_scale",
]

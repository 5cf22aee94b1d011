"""KV cache INT8 / FP8: one per-tensor scale per attention layer from the keys and values it caches.

Keys are observed after the rotary embedding (what a runtime writes into its cache), values as
projected. Conventions (docs/kvcache.md cites the sources):
  INT8 (TensorRT-LLM)  kv_cache_scaling_factor = max(k_amax, v_amax) / 127
  FP8  (ModelOpt)      k_scale = k_amax / 448 and v_scale = v_amax / 448, each clamped to >= 1.0,
                       kv_cache_scaling_factor = max(k_scale, v_scale)

Two calibrators:
  kv_cache     the scales; edits no weights, sets no weight or input format. Put it last, after any
               step that edits v_proj (AWQ, SmoothQuant fold into it), so it sees the cached V.
  kv_equalize  one scale serves K and V, but SmolLM2's V is up to 18x smaller than its K (layer 0:
               max |K| 10.6, max |V| 0.6), so INT8 V would keep a handful of levels. It multiplies
               V by c = k_amax / v_amax, folded exactly into v_proj (rows, bias) and o_proj
               (columns). Edits float weights: put it first, before any weight step. c is one
               number per layer, so per-channel, per-group and per-tensor quantization of v_proj and
               o_proj is unchanged by it (both scale uniformly).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from quantlab.attention import KV_FORMAT_KEY, KV_SCALE_KEY
from quantlab.calibrator import CalibratorArgs, LayerContext, param
from quantlab.errors import QuantlabError
from quantlab.formats import FP8_E4M3_MAX, QuantFormat
from quantlab.primitives import check_finite
from quantlab.state import ModuleState

INT8_MAX = 127.0


def int8_kv_scale(k_amax: torch.Tensor, v_amax: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM INT8 KV-cache scale [1]: max(k_amax, v_amax) / 127 (1.0 when both are 0)."""
    a = torch.maximum(k_amax.float(), v_amax.float()).reshape(1)
    return torch.where(a > 0, a / INT8_MAX, torch.ones_like(a))


def fp8_kv_scale(k_amax: torch.Tensor, v_amax: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """ModelOpt FP8 KV-cache scale [1]: max of amax / 448 over K and V, each floored at 1.0 when clamp."""
    k, v = k_amax.float().reshape(1) / FP8_E4M3_MAX, v_amax.float().reshape(1) / FP8_E4M3_MAX
    if clamp:
        one = torch.ones_like(k)
        k, v = torch.maximum(k, one), torch.maximum(v, one)
    s = torch.maximum(k, v)
    return torch.where(s > 0, s, torch.ones_like(s))


def v_equalize_factor(k_amax: torch.Tensor, v_amax: torch.Tensor) -> torch.Tensor:
    """c [1] such that max |c V| = max |K| (1.0 when either is 0)."""
    k, v = k_amax.float().reshape(1), v_amax.float().reshape(1)
    return torch.where((k > 0) & (v > 0), k / v.clamp(min=1e-30), torch.ones_like(k))


class _KVAmax:
    """max |K| and max |V| per attention module and window: one scalar each, bounded memory."""

    def __init__(self) -> None:
        self._k: dict[str, list[torch.Tensor]] = {}
        self._v: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        check_finite(key, f"keys of {name}")
        check_finite(value, f"values of {name}")
        self._k.setdefault(name, []).append(key.detach().abs().amax().float().cpu())
        self._v.setdefault(name, []).append(value.detach().abs().amax().float().cpu())

    def pop(self, ctx: LayerContext, who: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """(k_amax [1], v_amax [1], windows) per module over everything added; then empty."""
        if not self._k:
            raise QuantlabError(
                f"{who}: no attention call was observed in {ctx.prefix}; its attention does not go "
                "through transformers' AttentionInterface, so its keys and values cannot be seen."
            )
        out = {
            n: (
                torch.stack(self._k[n]).amax().reshape(1),
                torch.stack(self._v[n]).amax().reshape(1),
                len(self._k[n]),
            )
            for n in self._k
        }
        self._k.clear()
        self._v.clear()
        return out


class KVCacheArgs(CalibratorArgs):
    """format: how K and V are stored; clamp_fp8_scale: ModelOpt's FP8 floor of 1.0 on each scale."""

    format: Literal["int8", "fp8"] = "int8"
    # ModelOpt clamps FP8 KV scales to >= 1.0 ("we recommend default kv cache scaling factor to be
    # 1"); E4M3's relative precision is the same over its normal range, so the floor only costs
    # resolution below 2^-6 * scale. false keeps amax / 448 (ModelOpt's clamp_fp8_scales=False).
    clamp_fp8_scale: bool = True


class _KVObserver:
    """Shared part of the KV steps: no formats, no linear targets, max |K| / max |V| per layer.

    planned_formats returns (None, None): the KV cache is exported separately (kv_cache_quant_algo).
    """

    def __init__(self) -> None:
        self.needs_data = True
        self._amax = _KVAmax()

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """No weight or input format."""
        return None, None

    def targets(self, ctx: LayerContext) -> list[str]:
        """No linear inputs: keys and values come through observe_attention."""
        return []

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Unused (targets is empty)."""

    def observe_attention(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        """Record max |key| and max |value| of one window (key [B, H_kv, L, D] after rope)."""
        self._amax.add(name, key, value)


class KVCacheCalibrator(_KVObserver):
    """Per-layer KV-cache scale from max |K| (after rope) and max |V| over the calibration windows."""

    name: ClassVar[str] = "kv_cache"
    Args: ClassVar[type[CalibratorArgs]] = KVCacheArgs
    edits_weights: ClassVar[bool] = False

    def __init__(self, args: KVCacheArgs) -> None:
        super().__init__()
        self.args = args

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """k_amax, v_amax and the exported kv_cache_scaling_factor for each attention module."""
        out: dict[str, ModuleState] = {}
        for name, (k_amax, v_amax, windows) in self._amax.pop(ctx, self.name).items():
            if self.args.format == "int8":
                scale = int8_kv_scale(k_amax, v_amax)
                rule = "max(k_amax, v_amax) / 127"
            else:
                scale = fp8_kv_scale(k_amax, v_amax, self.args.clamp_fp8_scale)
                floor = ", 1.0" if self.args.clamp_fp8_scale else ""
                rule = f"max(k_amax / 448, v_amax / 448{floor})"
            out[name] = ModuleState(
                tensors={"k_amax": k_amax, "v_amax": v_amax, KV_SCALE_KEY: scale},
                meta={
                    KV_FORMAT_KEY: self.args.format,
                    "k_point": "after_rope",
                    "kv_scale_rule": rule,
                    "kv_windows": windows,
                },
            )
        return out


class KVEqualizeArgs(CalibratorArgs):
    """No hyper-parameters: c = k_amax / v_amax per layer."""


class KVEqualizeCalibrator(_KVObserver):
    """Scale V to K's range so one KV-cache scale fits both. Edits float weights (v_proj rows and
    bias times c, o_proj columns divided by c): place it before the weight steps."""

    name: ClassVar[str] = "kv_equalize"
    Args: ClassVar[type[CalibratorArgs]] = KVEqualizeArgs
    edits_weights: ClassVar[bool] = True

    def __init__(self, args: KVEqualizeArgs) -> None:
        super().__init__()
        self.args = args

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Fold c = k_amax / v_amax into v_proj and o_proj; records c as v_equalize_scale."""
        out: dict[str, ModuleState] = {}
        for name, (k_amax, v_amax, windows) in self._amax.pop(ctx, self.name).items():
            c = v_equalize_factor(k_amax, v_amax)
            # The adapter's first pair is V's producer -> o_proj (rows: the V rows of a fused qkv).
            pair = ctx.adapter.pairs[0]
            v_proj, o_proj = ctx.module(pair.producer), ctx.module(pair.consumer)
            a, b = pair.row_range(param(v_proj, "weight").shape[0])
            with torch.no_grad():
                # V = x W_v^T + b_v feeds softmax(...) V W_o^T: (c V)(W_o / c)^T is the same output.
                param(v_proj, "weight")[a:b].mul_(float(c))
                bias = getattr(v_proj, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.detach()[a:b].mul_(float(c))
                param(o_proj, "weight").div_(float(c))
            out[name] = ModuleState(
                tensors={"v_equalize_scale": c},
                meta={"v_equalized_from": [float(k_amax), float(v_amax)], "kv_windows": windows},
            )
        return out

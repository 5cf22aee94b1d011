"""Round-to-nearest weight-only quantization: no data, scales from the weights alone."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import field_validator

from quantlab.calibrator import CalibratorArgs, LayerContext
from quantlab.formats import PRESETS, QuantFormat, ScaleMethod
from quantlab.primitives import compute_qparams, quantize
from quantlab.state import ModuleState


class RTNArgs(CalibratorArgs):
    """format: a weight preset (int8_channel, int4_channel, int4_g{32,64,128}_{sym,asym}, ...)."""

    format: str = "int8_channel"
    # absmax: s = amax/qmax; half_step: s = amax/(qmax+0.5); full_range: both grid ends used.
    scale_method: ScaleMethod = "absmax"

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PRESETS or PRESETS[v].granularity == "token" or not PRESETS[v].is_int:
            valid = sorted(k for k, f in PRESETS.items() if f.is_int and f.granularity != "token")
            raise ValueError(
                f"'{v}' is not an integer weight format; use one of {', '.join(valid)}"
            )
        return v


def rtn_quantize(
    w: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Codes and scales of w [N, K] at fmt: {'qweight', 'weight_scale'[, 'weight_zero']}."""
    scale, zero = compute_qparams(w, fmt, "weight", scale_dtype)
    out = {"qweight": quantize(w, scale, zero, fmt), "weight_scale": scale}
    if zero is not None:
        out["weight_zero"] = zero
    return out


class RTNCalibrator:
    """Plain round-to-nearest of each linear's weight; reads no data and edits no float weight."""

    name: ClassVar[str] = "rtn"
    Args: ClassVar[type[CalibratorArgs]] = RTNArgs
    edits_weights: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False

    def __init__(self, args: RTNArgs) -> None:
        p = PRESETS[args.format]
        self.fmt = QuantFormat(p.dtype, p.granularity, p.group_size, p.symmetric, args.scale_method)

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(weight format, None): weight-only."""
        return self.fmt, None

    def targets(self, ctx: LayerContext) -> list[str]:
        """Nothing to observe."""
        return []

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Never called: RTN observes nothing."""

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Quantize each linear's current weight [N, K] to self.fmt."""
        out: dict[str, ModuleState] = {}
        for n in ctx.linears:
            w = ctx.weight(n)
            out[n] = ModuleState(
                weight_format=self.fmt, tensors=rtn_quantize(w, self.fmt, ctx.scale_dtype)
            )
        return out


__all__ = ["RTNArgs", "RTNCalibrator", "rtn_quantize"]

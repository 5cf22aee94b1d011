"""FP8 E4M3: weight amax scales and static activation amax from calibration data (or dynamic per token)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from quantlab.calibrator import CalibratorArgs, LayerContext
from quantlab.errors import InputError
from quantlab.formats import FP8_E4M3_MAX, QuantFormat
from quantlab.primitives import check_finite, compute_qparams, quantize
from quantlab.state import ModuleState


class FP8Args(CalibratorArgs):
    """weights: per-tensor or per-channel scales; activations: static per-tensor or dynamic per-token."""

    weights: Literal["tensor", "channel"] = "tensor"
    activations: Literal["static_tensor", "dynamic_token"] = "static_tensor"
    # A runtime fuses q|k|v (and gate|up) into one GEMM with one per-tensor scale: share it so the
    # accuracy we report is the accuracy that runtime sees.
    share_fused_scales: bool = True
    # How per-window activation amaxes combine into the static scale: "max" never clips a
    # calibration token; "mean" (the average window's amax) trades rare clipping for a finer grid.
    activation_amax: Literal["max", "mean"] = "max"


class FP8Calibrator:
    """FP8 weights (amax / 448) and activations (calibrated amax / 448); edits no float weight."""

    name: ClassVar[str] = "fp8"
    Args: ClassVar[type[CalibratorArgs]] = FP8Args
    edits_weights: ClassVar[bool] = False

    def __init__(self, args: FP8Args) -> None:
        self.args = args
        self.wfmt = QuantFormat("fp8_e4m3", args.weights)
        self.afmt = QuantFormat(
            "fp8_e4m3", "tensor" if args.activations == "static_tensor" else "token"
        )
        # Dynamic per-token activations need no calibration data.
        self.needs_data = args.activations == "static_tensor"
        self._amax: dict[str, list[torch.Tensor]] = {}

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(fp8 weight format, fp8 input format)."""
        return self.wfmt, self.afmt

    def targets(self, ctx: LayerContext) -> list[str]:
        """Every quantized linear's input, when activations are static."""
        return list(ctx.linears) if self.afmt.granularity == "tensor" else []

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Record max |x| of one calibration window (a scalar per module and window)."""
        check_finite(x, f"input of {name}")
        self._amax.setdefault(name, []).append(x.detach().abs().amax().float().cpu())

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Codes + scales for each linear; fused groups share per-tensor scales."""
        groups = [g for g in ctx.adapter.fused_groups if all(n in ctx.linears for n in g)]
        shared = {n: g for g in groups for n in g} if self.args.share_fused_scales else {}
        out: dict[str, ModuleState] = {}
        for n in ctx.linears:
            w = ctx.weight(n)
            members = shared.get(n, (n,))
            if self.wfmt.granularity == "tensor":
                scale = torch.stack(
                    [compute_qparams(ctx.weight(m), self.wfmt, f"{m}.weight")[0] for m in members]
                ).amax(dim=0)
            else:
                scale = compute_qparams(w, self.wfmt, f"{n}.weight")[0]
            tensors = {"qweight": quantize(w, scale, None, self.wfmt), "weight_scale": scale}
            meta: dict[str, object] = {}
            if self.afmt.granularity == "tensor":
                if all(m in self._amax for m in members):
                    per_window = torch.stack([torch.stack(self._amax[m]) for m in members])
                    per_window = per_window.amax(dim=0)
                else:  # an expert no calibration token was routed to: its peers' inputs bound it
                    peers = [p for p in ctx.adapter.expert_peers(n) if p in self._amax]
                    if not peers:
                        raise InputError(
                            f"FP8: no calibration input reached {ctx.prefix}.{n} or any peer "
                            "expert; use more calibration windows or dynamic activations."
                        )
                    per_window = torch.stack([a for p in peers for a in self._amax[p]])
                    meta = {"calib_tokens": 0, "fallback": "peer_input_scale"}
                a = per_window.amax() if self.args.activation_amax == "max" else per_window.mean()
                tensors["input_scale"] = (
                    torch.where(a > 0, a, torch.ones_like(a)) / FP8_E4M3_MAX
                ).reshape(1)
            out[n] = ModuleState(
                weight_format=self.wfmt, input_format=self.afmt, tensors=tensors, meta=meta
            )
        self._amax.clear()
        return out

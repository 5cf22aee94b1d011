"""Activation statistics for exploring outliers (notebooks, reports): plain functions over a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantlab.adapters import adapter_for
from quantlab.runner import decoder_layers


@torch.no_grad()
def visit_linear_inputs(
    model: nn.Module, windows: Sequence[torch.Tensor], visit: Callable[[str, torch.Tensor], None]
) -> None:
    """Run model over windows (int64 [L] each), calling visit(module name, input [1, L, K]) at
    every decoder-layer linear."""
    adapter = adapter_for(model)
    handles = []
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for n in adapter.linears:
            full = f"{adapter.layers}.{i}.{n}"

            def hook(_m: nn.Module, args: tuple[Any, ...], full: str = full) -> None:
                visit(full, args[0].detach())

            handles.append(layer.get_submodule(n).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(input_ids=w.view(1, -1).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def activation_absmax(model: nn.Module, windows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| (float32 [K]) of every decoder-layer linear, over windows (int64 [L] each)."""
    stats: dict[str, torch.Tensor] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        a = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float().cpu()
        stats[name] = torch.maximum(stats[name], a) if name in stats else a

    visit_linear_inputs(model, windows, visit)
    return stats


@dataclass
class OutlierRow:
    """How strongly one module's input is dominated by a few channels."""

    module: str
    max_over_median: float  # max channel amax / median channel amax
    top_channels: list[int]  # channel indices, largest amax first
    top_values: list[float]


def outlier_table(stats: dict[str, torch.Tensor], top: int = 3) -> list[OutlierRow]:
    """Rows sorted by max/median channel ratio (largest first) from activation_absmax's output."""
    rows = []
    for name, a in stats.items():
        vals, idx = a.topk(min(top, a.numel()))
        med = float(a.median())
        rows.append(
            OutlierRow(
                name, float(vals[0]) / med if med > 0 else float("inf"), idx.tolist(), vals.tolist()
            )
        )
    return sorted(rows, key=lambda r: r.max_over_median, reverse=True)

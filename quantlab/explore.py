"""Exploration helpers for the notebooks: per-linear input statistics (per-channel max |x| and
kurtosis), what a run's SmoothQuant/AWQ scale migration did to them, and samples of one linear's
weights and inputs. Position 0 (BOS, the attention sink) is left out of every statistic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantlab.inspect import visit_linear_inputs
from quantlab.state import FOLD_IN, QuantState


@dataclass
class InputStats:
    """One linear's input over the windows: amax float32 [K] per channel and moments of all values."""

    amax: torch.Tensor
    count: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x - mu)^4] / var^2 of every input value (3 for a Gaussian)."""
        n = self.count
        mu = self.s1 / n
        var = self.s2 / n - mu * mu
        m4 = self.s4 / n - 4 * mu * self.s3 / n + 6 * mu * mu * self.s2 / n - 3 * mu**4
        return m4 / (var * var) if var > 0 else float("nan")

    @property
    def max_over_median(self) -> float:
        """Largest channel amax over the median channel amax."""
        med = float(self.amax.median())
        return float(self.amax.max()) / med if med > 0 else float("inf")


def input_stats(model: nn.Module, windows: Sequence[torch.Tensor]) -> dict[str, InputStats]:
    """InputStats of every decoder-layer linear of model over windows (int64 [L] each)."""
    stats: dict[str, InputStats] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        x = x[:, 1:].reshape(-1, x.shape[-1]).double()
        a = x.abs().amax(dim=0).float().cpu()
        st = stats.setdefault(name, InputStats(torch.zeros_like(a)))
        st.amax = torch.maximum(st.amax, a)
        st.count += x.numel()
        st.s1 += float(x.sum())
        x2 = x * x
        st.s2 += float(x2.sum())
        st.s3 += float((x2 * x).sum())
        st.s4 += float((x2 * x2).sum())

    visit_linear_inputs(model, windows, visit)
    return stats


def migrated_amax(stats: dict[str, InputStats], state: QuantState) -> dict[str, torch.Tensor]:
    """Per-channel amax float32 [K] each linear sees after the run's folds (x / fold_in_scale), for
    the linears the run folded a scale into (SmoothQuant, AWQ); from the float model's stats."""
    out = {}
    for name, st in stats.items():
        ms = state.modules.get(name)
        if ms is not None and FOLD_IN in ms.tensors:
            out[name] = st.amax / ms.tensors[FOLD_IN].float().cpu()
    return out


@torch.no_grad()
def linear_sample(
    model: nn.Module, windows: Sequence[torch.Tensor], name: str, max_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float32 [N, K], inputs float32 [T, K] with T <= max_tokens) of the linear `name`."""
    mod = model.get_submodule(name)
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach()[:, 1:].reshape(-1, args[0].shape[-1]).float().cpu())

    h = mod.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for w in windows:
            if sum(s.shape[0] for s in seen) >= max_tokens:
                break
            model(input_ids=w.view(1, -1).to(device), use_cache=False)
    finally:
        h.remove()
    weight = getattr(mod, "weight", None)
    if weight is None:
        raise ValueError(f"{name} has no weight")
    return weight.detach().float().cpu(), torch.cat(seen)[:max_tokens]

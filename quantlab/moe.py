"""Sparse MoE experts as one nn.Linear per expert, so every calibrator sees each expert's linears.

transformers stores a Mixtral / Qwen-MoE block's experts fused: gate_up_proj [E, 2I, H] (gate rows
first) and down_proj [E, H, I]. `unfuse_experts` replaces that module by `UnfusedExperts`, which
computes the same function with experts.{e}.gate_proj / up_proj / down_proj linears. Each expert
linear then runs on the tokens the router sends to it, which is what its calibration observes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quantlab.adapters import ModelAdapter
from quantlab.errors import QuantlabError

log = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), x [T, H] -> [T, H]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: nn.Module) -> None:
        super().__init__()
        inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
        kw = {"bias": False, "device": gate_up.device, "dtype": gate_up.dtype}
        self.gate_proj = nn.Linear(hidden, inter, **kw)  # type: ignore[arg-type]
        self.up_proj = nn.Linear(hidden, inter, **kw)  # type: ignore[arg-type]
        self.down_proj = nn.Linear(inter, hidden, **kw)  # type: ignore[arg-type]
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H] in x's dtype."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts: forward(hidden [T, H], top_k_index [T, k] int64,
    top_k_weights [T, k]) -> [T, H], each expert applied to the tokens routed to it."""

    def forward(  # type: ignore[override]
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tok, slot = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            y = expert(hidden[tok]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, adapter: ModelAdapter) -> int:
    """Replace each layer's fused experts module by UnfusedExperts (same function); returns how many."""
    ex = adapter.experts
    if ex is None:
        return 0
    layers = model.get_submodule(adapter.layers)
    assert isinstance(layers, nn.ModuleList)
    n = 0
    for i, layer in enumerate(layers):
        fused = layer.get_submodule(ex.fused)
        if isinstance(fused, UnfusedExperts):
            continue
        gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
        act = getattr(fused, "act_fn", None)
        if (
            not isinstance(gate_up, torch.Tensor)
            or not isinstance(down, torch.Tensor)
            or act is None
        ):
            raise QuantlabError(
                f"{adapter.layers}.{i}.{ex.fused} ({type(fused).__name__}) has no fused "
                "gate_up_proj / down_proj / act_fn: this transformers release lays MoE experts "
                "out differently from the one quantlab's adapter expects; please report it."
            )
        experts = UnfusedExperts(
            ExpertMLP(gate_up[e].detach(), down[e].detach(), act) for e in range(gate_up.shape[0])
        )
        parent, _, child = ex.fused.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, experts)
        n += 1
    log.info("unfused the experts of %d MoE layers into one linear each", n)
    return n


def prepare_model(model: nn.Module) -> None:
    """What quantlab does to every loaded model of a known architecture: unfuse MoE experts and tag
    layer types (sliding / global); a model without an adapter is left as it is."""
    from quantlab.adapters import ADAPTERS
    from quantlab.runner import tag_layer_types

    archs = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    known = [a for a in archs if a in ADAPTERS]
    if not known:
        return
    adapter = ADAPTERS[known[0]]
    unfuse_experts(model, adapter)
    tag_layer_types(model, adapter)

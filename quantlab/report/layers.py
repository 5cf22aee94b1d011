"""Where the error comes from: per-linear SQNR on captured inputs, residual-stream error growth, per-layer sensitivity.

Position 0 (the BOS token: the attention sink, whose activations are orders of magnitude larger
than any other's and which is never a predicted token) is left out of the linear and hidden-state
statistics; it still takes part in attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantlab.adapters import ModelAdapter
from quantlab.primitives import sqnr
from quantlab.qmodules import QuantLinear
from quantlab.report.metrics import ErrorStats
from quantlab.runner import LayerInput, capture_layer_inputs, decoder_layers, run_layer
from quantlab.state import FOLD_IN, FOLD_OUT, QuantState


@dataclass
class RefPasses:
    """The reference model's decoder-layer inputs for the analysis windows, shared by every variant.

    inputs[i][w] is the input of decoder layer i for window w (inputs[L] the last layer's output);
    logprobs[w] are the reference next-token log-probs [L-1, V] (float32).
    """

    inputs: list[list[LayerInput]]
    logprobs: list[torch.Tensor]
    targets: list[torch.Tensor]  # the next token [L-1] (int64) at each predicted position


@torch.no_grad()
def reference_passes(
    model: nn.Module, adapter: ModelAdapter, windows: Sequence[torch.Tensor]
) -> RefPasses:
    """Run the reference once, layer by layer, keeping every layer's input and the final log-probs."""
    current = capture_layer_inputs(model, adapter, windows)
    inputs = [current]
    for layer in decoder_layers(model, adapter):
        current = _advance(layer, current)
        inputs.append(current)
    lps = [_head_logprobs(model, adapter, h) for h, _ in current]
    return RefPasses(inputs, lps, [w[1:].cpu() for w in windows])


def _advance(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The next layer's inputs: this layer's outputs with the same keyword arguments."""
    return _with_kwargs(run_layer(layer, inputs), inputs)


def _with_kwargs(hidden: list[torch.Tensor], like: list[LayerInput]) -> list[LayerInput]:
    return [(h, kw) for h, (_, kw) in zip(hidden, like, strict=True)]


def _head_logprobs(model: nn.Module, adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    h = model.get_submodule(adapter.final_norm)(hidden)
    logits = model.get_submodule(adapter.lm_head)(h)[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


@dataclass
class LinearRecord:
    """Accumulated output error of one quantized linear and the SQNR of its weight codes."""

    stats: ErrorStats = field(default_factory=ErrorStats)
    weight_sqnr_db: float | None = None
    weight_format: str = "float"
    input_format: str = "float"


def _fold(state: QuantState, name: str, key: str, n: int, like: torch.Tensor) -> torch.Tensor:
    ms = state.modules.get(name)
    t = ms.tensors.get(key) if ms is not None else None
    return torch.ones(n, dtype=like.dtype, device=like.device) if t is None else t.to(like)


def _linear_hooks(
    ref_layer: nn.Module,
    quant_layer: nn.Module,
    prefix: str,
    state: QuantState,
    records: dict[str, LinearRecord],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on the reference layer's linears that run each quantized counterpart on the same input."""
    handles = []
    for rel, mod in ref_layer.named_modules():
        qmod = quant_layer.get_submodule(rel) if rel else None
        if not isinstance(mod, nn.Linear) or not isinstance(qmod, QuantLinear):
            continue
        name = f"{prefix}.{rel}"
        rec = records.setdefault(name, LinearRecord())
        w_ref = mod.weight.detach()
        fin = _fold(state, name, FOLD_IN, w_ref.shape[1], w_ref)
        fout = _fold(state, name, FOLD_OUT, w_ref.shape[0], w_ref)
        w_folded = w_ref * fin[None, :] / fout[:, None]
        if isinstance(qmod.pre_quant_scale, torch.Tensor):  # the codes hold W / pre_quant_scale
            w_folded = w_folded / qmod.pre_quant_scale.to(w_folded)[None, :]
        wq = sqnr(w_folded, qmod.weight.detach())
        rec.weight_sqnr_db = None if wq == float("inf") else wq
        rec.weight_format = qmod.weight_format.describe() if qmod.weight_format else "float"
        rec.input_format = qmod.input_format.describe() if qmod.input_format else "float"

        def hook(
            _m: nn.Module,
            args: tuple[Any, ...],
            out: torch.Tensor,
            q: QuantLinear = qmod,
            r: LinearRecord = rec,
            fin: torch.Tensor = fin,
            fout: torch.Tensor = fout,
        ) -> None:
            x = args[0][:, 1:]
            r.stats.add(out[:, 1:], q(x / fin) * fout)

        handles.append(mod.register_forward_hook(hook))
    return handles


@dataclass
class LayerAnalysis:
    """Per-linear rows and per-decoder-layer rows of one variant (JSON-ready dicts)."""

    linears: list[dict[str, Any]]
    layers: list[dict[str, Any]]


@torch.no_grad()
def analyse_layers(
    reference: nn.Module,
    quantized: nn.Module,
    state: QuantState,
    adapter: ModelAdapter,
    ref: RefPasses,
    sensitivity: bool = True,
    show_progress: bool = True,
) -> LayerAnalysis:
    """Per-linear output SQNR / relative error / cosine on the reference's captured inputs, the
    residual stream's error after each layer with the whole model quantized (growth), the error a
    layer adds when fed the reference input (local), and the output KL and NLL change when only
    that layer is quantized (sensitivity)."""
    ref_layers, q_layers = decoder_layers(reference, adapter), decoder_layers(quantized, adapter)
    records: dict[str, LinearRecord] = {}
    rows: list[dict[str, Any]] = []
    # quantlab never quantizes the embedding, so both streams start from the reference's input.
    stream = list(ref.inputs[0])
    n = len(ref_layers)
    for i in tqdm(range(n), desc="layers", unit="layer", disable=not show_progress):
        prefix = f"{adapter.layers}.{i}"
        handles = _linear_hooks(ref_layers[i], q_layers[i], prefix, state, records)
        try:
            run_layer(ref_layers[i], ref.inputs[i])
        finally:
            for h in handles:
                h.remove()
        target = [h for h, _ in ref.inputs[i + 1]]
        local, growth = ErrorStats(), ErrorStats()
        local_out = run_layer(q_layers[i], ref.inputs[i])
        for t, o in zip(target, local_out, strict=True):
            local.add(t[:, 1:], o[:, 1:])
        stream = _advance(q_layers[i], stream)
        for t, (o, _) in zip(target, stream, strict=True):
            growth.add(t[:, 1:], o[:, 1:])
        row: dict[str, Any] = {
            "layer": i,
            "growth_rel_error": growth.rel_error,
            "growth_cosine": growth.cosine,
            "local_rel_error": local.rel_error,
            "local_cosine": local.cosine,
        }
        if sensitivity:
            row.update(_only_layer(reference, adapter, ref, i, local_out))
        rows.append(row)
    linears = [
        {
            "name": name,
            "layer": int(name[len(adapter.layers) + 1 :].split(".")[0]),
            "module": name[len(adapter.layers) + 1 :].split(".", 1)[1],
            "weight_format": rec.weight_format,
            "input_format": rec.input_format,
            **rec.stats.to_dict(),
            "weight_sqnr_db": rec.weight_sqnr_db,
        }
        for name, rec in records.items()
    ]
    return LayerAnalysis(linears, rows)


def _only_layer(
    reference: nn.Module,
    adapter: ModelAdapter,
    ref: RefPasses,
    index: int,
    first_out: list[torch.Tensor],
) -> dict[str, float]:
    """KL(ref || model with only layer `index` quantized) and its mean NLL change, per predicted token."""
    layers = decoder_layers(reference, adapter)
    current = _with_kwargs(first_out, ref.inputs[index])
    for j in range(index + 1, len(layers)):
        current = _advance(layers[j], current)
    kl = nll = 0.0
    tokens = 0
    for (h, _), lp_r, target in zip(current, ref.logprobs, ref.targets, strict=True):
        lp = _head_logprobs(reference, adapter, h)
        kl += float((lp_r.exp() * (lp_r - lp)).sum())
        t = target.view(-1, 1)
        nll += float(lp_r.gather(1, t).sum() - lp.gather(1, t).sum())
        tokens += lp.shape[0]
    # exp(mean NLL change) - 1 is the perplexity change this layer alone causes on these windows.
    return {"sensitivity_kl": kl / tokens, "sensitivity_nll_delta": nll / tokens}

"""Accuracy-budget mixed precision: keep the fewest decoder layers in float so that the measured
perplexity increase over the float model stays within a budget.

The ranking is the report's sensitivity (quantlab.report.layers): the mean NLL change per token
when only that layer is quantized, measured on `sensitivity_windows` evaluation windows. The
search then keeps the top-k layers of that ranking in float (their linears and the norms that
SmoothQuant/AWQ folded scales into, copied from the float model) and measures the perplexity of
the whole model on the evaluation windows; k is the smallest that meets the budget (binary
search: the ppl is treated as non-increasing in k, and every k tried is recorded).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.adapters import ModelAdapter
from quantlab.errors import InputError
from quantlab.evaluate import window_logprobs
from quantlab.runner import decoder_layers, run_layer
from quantlab.state import QuantState

if TYPE_CHECKING:
    from quantlab.recipe import Recipe

log = logging.getLogger("quantlab")
KV_STEPS = ("kv_cache", "kv_equalize")


def parse_budget(text: str | float) -> float:
    """'1%' -> 0.01, '0.5 %' -> 0.005, 0.02 -> 0.02; InputError for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise InputError(
                f"max_ppl_increase {text!r} is not a number: give a relative increase such as "
                "'1%' or 0.01."
            )
        value = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    if not 0.0 <= value < 10.0 or math.isnan(value):
        raise InputError(
            f"max_ppl_increase {text!r} is out of range: give a relative increase between 0 and "
            "1000 %, e.g. '1%'."
        )
    return value


@dataclass
class BudgetResult:
    """What the search measured and chose (JSON-ready through to_dict)."""

    budget: float
    ref_ppl: float
    ppl_all_quantized: float
    ranking: list[dict[str, float]]  # {"layer", "sensitivity_nll_delta"}, most sensitive first
    float_layers: list[int] = field(default_factory=list)
    ppl: float = math.nan
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"k", "layers", "ppl", "increase"}

    @property
    def increase(self) -> float:
        """Relative ppl increase of the chosen mixed model over the float model."""
        return self.ppl / self.ref_ppl - 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the increase."""
        return {**asdict(self), "increase": self.increase, "met": self.increase <= self.budget}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Sequence[torch.Tensor]) -> float:
    """exp(mean NLL) over every predicted token of the windows (each [T] int64)."""
    nll, n = 0.0, 0
    for w in windows:
        lp = window_logprobs(model, w)
        nll -= float(lp.gather(1, w[1:].view(-1, 1).to(lp.device)).sum())
        n += lp.shape[0]
    return math.exp(nll / n)


@torch.no_grad()
def layer_ranking(
    reference: nn.Module,
    quant: nn.Module,
    adapter: ModelAdapter,
    windows: Sequence[torch.Tensor],
    show_progress: bool = True,
) -> list[dict[str, float]]:
    """Per decoder layer, the NLL change with only that layer quantized; most sensitive first."""
    from quantlab.report.layers import _only_layer, reference_passes

    ref = reference_passes(reference, adapter, windows)
    rows = []
    q_layers = decoder_layers(quant, adapter)
    for i in tqdm(range(len(q_layers)), desc="sensitivity", disable=not show_progress):
        out = run_layer(q_layers[i], ref.inputs[i])
        s = _only_layer(reference, adapter, ref, i, out)
        rows.append({"layer": i, "sensitivity_nll_delta": s["sensitivity_nll_delta"]})
    return sorted(rows, key=lambda r: -r["sensitivity_nll_delta"])


def float_modules(adapter: ModelAdapter) -> list[str]:
    """Layer-relative names restored from the float model: every linear and every folded norm."""
    return [*adapter.linears, *(norm for norm, _ in adapter.smoothing_groups)]


class LayerSwap:
    """Swap whole decoder layers' linears and norms between the quantized and the float model."""

    def __init__(self, quant: nn.Module, reference: nn.Module, adapter: ModelAdapter) -> None:
        self.q = decoder_layers(quant, adapter)
        self.r = decoder_layers(reference, adapter)
        self.names = float_modules(adapter)
        self.saved: dict[int, dict[str, nn.Module]] = {}

    def to_float(self, layers: Sequence[int]) -> None:
        """Layers `layers` of the quantized model compute in float (copies of the float modules)."""
        for i in layers:
            if i in self.saved:
                continue
            self.saved[i] = {n: self.q[i].get_submodule(n) for n in self.names}
            for n in self.names:
                self.q[i].set_submodule(n, copy.deepcopy(self.r[i].get_submodule(n)))

    def restore(self) -> None:
        """Every swapped layer back to its quantized modules."""
        for i, mods in self.saved.items():
            for n, m in mods.items():
                self.q[i].set_submodule(n, m)
        self.saved.clear()


def choose_float_layers(
    reference: nn.Module,
    quant: nn.Module,
    adapter: ModelAdapter,
    windows: Sequence[torch.Tensor],
    budget: float,
    sensitivity_windows: int = 4,
    show_progress: bool = True,
    ranking: list[dict[str, float]] | None = None,
    keep: bool = True,
    measured: dict[int, float] | None = None,
) -> BudgetResult:
    """Rank the layers (unless `ranking` is given), search the fewest to keep in float, and leave
    them in float in `quant` (unless keep is False). `measured` (k -> ppl with the top-k layers in
    float, for this ranking and these windows) is reused and filled, so searches for several
    budgets share their measurements."""
    if ranking is None:
        ranking = layer_ranking(
            reference, quant, adapter, windows[:sensitivity_windows], show_progress
        )
    order = [int(r["layer"]) for r in ranking]
    ref_ppl = perplexity(reference, windows)
    swap = LayerSwap(quant, reference, adapter)
    known: dict[int, float] = {} if measured is None else measured
    tried: dict[int, float] = {}

    def ppl_with(k: int) -> float:
        if k not in known:
            swap.to_float(order[:k])
            known[k] = perplexity(quant, windows)
            swap.restore()
        tried[k] = known[k]
        return tried[k]

    def ok(k: int) -> bool:
        return ppl_with(k) / ref_ppl - 1.0 <= budget

    with tqdm(desc="budget search", disable=not show_progress) as bar:
        lo, hi = 0, len(order)  # invariant: ok(hi) (all float is the float model)
        if ok(0):
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
            bar.update()
    res = BudgetResult(budget, ref_ppl, ppl_with(0), ranking)
    res.float_layers = sorted(order[:hi])
    res.ppl = ppl_with(hi)
    res.tried = [
        {
            "k": k,
            "layers": sorted(order[:k]),
            "ppl": p,
            "increase": p / ref_ppl - 1.0,
        }
        for k, p in sorted(tried.items())
    ]
    if keep:
        swap.to_float(order[:hi])  # the chosen mixed model stays in `quant`
    return res


def drop_layers(state: QuantState, adapter: ModelAdapter, layers: Sequence[int]) -> int:
    """Remove the quantization records of the float layers' modules; how many were removed."""
    names = float_modules(adapter)
    gone = [
        m
        for m in state.modules
        for i in layers
        if any(m == f"{adapter.layers}.{i}.{n}" for n in names)
    ]
    for m in gone:
        del state.modules[m]
    return len(gone)


def check_recipe_steps(calibrators: Sequence[str]) -> None:
    """InputError when a step's results cannot be undone per layer (KV-cache scales and folds)."""
    bad = [c for c in calibrators if c in KV_STEPS]
    if bad:
        raise InputError(
            f"max_ppl_increase cannot be combined with the {', '.join(bad)} step: the KV-cache "
            "scales (and kv_equalize's v->o fold) were measured on the quantized layers, and "
            "keeping a layer in float would leave them inconsistent. Remove the KV step or the "
            "budget."
        )


def budget_of(recipe: Recipe) -> float | None:
    """The recipe's max_ppl_increase as a fraction, after checking it can be served (no work yet)."""
    if recipe.budget.max_ppl_increase is None:
        return None
    check_recipe_steps([s.calibrator for s in recipe.steps])
    if not (recipe.evaluation.enabled and recipe.evaluation.data is not None):
        raise InputError(
            f"recipe '{recipe.name}': budget.max_ppl_increase needs evaluation data to measure "
            "the perplexity on; enable the evaluation section and give it data."
        )
    if recipe.export.pp_size > 1:
        raise InputError(
            f"recipe '{recipe.name}': budget.max_ppl_increase keeps single layers in float, which "
            "TensorRT-LLM cannot express per pipeline rank; use export.pp_size 1."
        )
    return parse_budget(recipe.budget.max_ppl_increase)


def apply_budget(
    model: nn.Module,
    quant: nn.Module,
    adapter: ModelAdapter,
    state: QuantState,
    windows: Sequence[torch.Tensor],
    budget: float,
    recipe: Recipe,
    show_progress: bool = True,
) -> BudgetResult:
    """Choose the float layers, leave them in float in `quant`, drop their QuantState records."""
    res = choose_float_layers(
        model, quant, adapter, windows, budget, recipe.budget.sensitivity_windows,
        show_progress=show_progress,
    )  # fmt: skip
    dropped = drop_layers(state, adapter, res.float_layers)
    log.info(
        "accuracy budget %.2f %%: %d of %d layers kept in float (%s), ppl %.4f vs float %.4f "
        "(+%.2f %%; all quantized +%.2f %%), %d module records dropped",
        100 * budget,
        len(res.float_layers),
        len(res.ranking),
        res.float_layers,
        res.ppl,
        res.ref_ppl,
        100 * res.increase,
        100 * (res.ppl_all_quantized / res.ref_ppl - 1),
        dropped,
    )
    return res

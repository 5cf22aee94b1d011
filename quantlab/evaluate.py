"""Accuracy of a quantized model against its reference: perplexity, token KL divergence, top-1 agreement."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class AccuracyReport:
    """Metrics over all predicted tokens of the evaluation windows."""

    windows: int
    window_len: int
    tokens: int  # predicted tokens: sum of (len - 1) over windows
    ppl_ref: float
    ppl_quant: float
    kl_mean: float  # mean over tokens of KL(reference || quantized), nats
    top1_agreement: float  # fraction of tokens where both models' argmax agree

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


@torch.no_grad()
def window_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [L-1, V] (float32, CPU) of the next token at each position of ids [L]."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.view(1, -1).to(device), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


class ReferenceCache:
    """Reference log-probs [L-1, V] (float32) kept across recipes that share model and evaluation data.

    Saves one reference forward per window and recipe; bounded by budget_bytes (16 SmolLM2 windows
    of 511 x 49152 float32 take 1.6 GB), beyond which windows are recomputed.
    """

    def __init__(self, budget_bytes: int = 4 << 30) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._store: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: str, index: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor for (key, index), computing and storing it when it fits the budget."""
        hit = self._store.get((key, index))
        if hit is not None:
            return hit
        t = compute()
        size = t.numel() * t.element_size()
        if self.used + size <= self.budget:
            self._store[(key, index)] = t
            self.used += size
        return t


@torch.no_grad()
def compare_models(
    reference: nn.Module,
    quantized: nn.Module,
    windows: Sequence[torch.Tensor],
    show_progress: bool = True,
    cache: ReferenceCache | None = None,
    cache_key: str = "",
) -> AccuracyReport:
    """Evaluate both models on windows (each int64 [L]) in float32 log-space; one window at a time."""
    nll_ref = nll_q = kl = 0.0
    agree = n = 0
    for i, w in enumerate(
        tqdm(windows, desc="evaluating", unit="window", disable=not show_progress)
    ):
        target = w[1:].view(-1, 1)
        lp_r = (
            cache.get(cache_key, i, partial(window_logprobs, reference, w))
            if cache
            else window_logprobs(reference, w)
        )
        lp_q = window_logprobs(quantized, w)
        nll_ref -= float(lp_r.gather(1, target).sum())
        nll_q -= float(lp_q.gather(1, target).sum())
        kl += float((lp_r.exp() * (lp_r - lp_q)).sum())
        agree += int((lp_r.argmax(-1) == lp_q.argmax(-1)).sum())
        n += target.shape[0]
    return AccuracyReport(
        windows=len(windows),
        window_len=max((len(w) for w in windows), default=0),
        tokens=n,
        ppl_ref=math.exp(nll_ref / n),
        ppl_quant=math.exp(nll_q / n),
        kl_mean=kl / n,
        top1_agreement=agree / n,
    )


def format_table(rows: Sequence[tuple[str, AccuracyReport]]) -> str:
    """A plain-text table of (label, report) rows."""
    head = f"{'recipe':<34} {'ppl ref':>9} {'ppl quant':>10} {'Δppl':>8} {'KL (nats)':>10} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    for label, r in rows:
        lines.append(
            f"{label:<34} {r.ppl_ref:>9.3f} {r.ppl_quant:>10.3f} {r.ppl_quant - r.ppl_ref:>+8.3f} "
            f"{r.kl_mean:>10.5f} {r.top1_agreement:>7.2%}"
        )
    if rows:
        r0 = rows[0][1]
        lines.append(
            f"({r0.windows} windows x {r0.window_len} tokens, {r0.tokens} predicted tokens each)"
        )
    return "\n".join(lines)

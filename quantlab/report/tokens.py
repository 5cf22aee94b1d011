"""Per-token comparison of a quantized model with its reference: NLL, KL, top-1, and the worst tokens."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quantlab.evaluate import ReferenceCache, window_logprobs
from quantlab.report.metrics import block_ids, ppl_diff_interval

TOP_TOKENS = 20
CONTEXT_TOKENS = 12
KL_QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass
class TokenStats:
    """Per predicted token [T] (float64): reference and quantized NLL, KL(ref || quant), top-1 agreement."""

    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_quant: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    worst: list[tuple[float, int, int, int, int, int]] = field(default_factory=list)

    def add(self, window: int, ids: torch.Tensor, lp_r: torch.Tensor, lp_q: torch.Tensor) -> None:
        """Add one window: ids [L] (int64), log-probs [L-1, V] of both models."""
        target = ids[1:].view(-1, 1)
        kl = (lp_r.exp() * (lp_r - lp_q)).sum(-1).double()
        self.nll_ref.append(-lp_r.gather(1, target)[:, 0].double())
        self.nll_quant.append(-lp_q.gather(1, target)[:, 0].double())
        self.kl.append(kl)
        top_r, top_q = lp_r.argmax(-1), lp_q.argmax(-1)
        self.agree.append((top_r == top_q).double())
        k = min(TOP_TOKENS, kl.numel())
        vals, pos = kl.topk(k)
        for v, p in zip(vals.tolist(), pos.tolist(), strict=True):
            item = (v, window, p, int(ids[p + 1]), int(top_r[p]), int(top_q[p]))
            if len(self.worst) < TOP_TOKENS:
                heapq.heappush(self.worst, item)
            else:
                heapq.heappushpop(self.worst, item)

    def summary(
        self, tok: PreTrainedTokenizerBase, windows: Sequence[torch.Tensor]
    ) -> dict[str, object]:
        """Perplexities with the bootstrap interval of their difference, KL mean/quantiles/histogram,
        top-1 agreement and the tokens of largest KL with their text."""
        nll_r, nll_q, kl = torch.cat(self.nll_ref), torch.cat(self.nll_quant), torch.cat(self.kl)
        blocks = block_ids([t.numel() for t in self.kl])
        out: dict[str, object] = {"tokens": int(kl.numel())}
        out.update(ppl_diff_interval(nll_r, nll_q, blocks))
        q = torch.quantile(kl, torch.tensor(KL_QUANTILES, dtype=torch.float64))
        out["kl_mean"] = float(kl.mean())
        out["kl_quantiles"] = {
            f"p{str(p * 100).rstrip('0').rstrip('.')}": float(v)
            for p, v in zip(KL_QUANTILES, q, strict=True)
        }
        out["kl_max"] = float(kl.max())
        out["top1_agreement"] = float(torch.cat(self.agree).mean())
        out["kl_histogram"] = kl_histogram(kl)
        out["top_kl_tokens"] = [
            _describe(tok, windows[w], w, p, kl_v, t, r, qq)
            for kl_v, w, p, t, r, qq in sorted(self.worst, reverse=True)
        ]
        return out


def kl_histogram(kl: torch.Tensor, bins_per_decade: int = 4) -> dict[str, list[float] | int]:
    """Counts of per-token KL [T] in log-spaced bins from 1e-6 up; `below` counts smaller values."""
    lo = 1e-6
    top = max(float(kl.max()), lo * 10)
    n = max(1, math.ceil(math.log10(top / lo) * bins_per_decade))
    edges = [lo * 10 ** (i / bins_per_decade) for i in range(n + 1)]
    counts = torch.histc(
        torch.log10(kl.clamp_min(lo)).float(), bins=n, min=math.log10(lo), max=math.log10(edges[-1])
    )
    below = int((kl < lo).sum())
    counts[0] -= below  # histc put the clamped values into the first bin
    return {"edges": edges, "counts": [int(c) for c in counts], "below": below}


def _describe(
    tok: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    window: int,
    pos: int,
    kl: float,
    target: int,
    ref_top: int,
    quant_top: int,
) -> dict[str, object]:
    ctx = ids[max(0, pos + 1 - CONTEXT_TOKENS) : pos + 1].tolist()
    return {
        "window": window,
        "position": pos + 1,
        "kl": kl,
        "context": tok.decode(ctx),
        "target": tok.decode([target]),
        "reference_top": tok.decode([ref_top]),
        "quantized_top": tok.decode([quant_top]),
    }


@torch.no_grad()
def compare_tokens(
    reference: nn.Module,
    quantized: nn.Module,
    windows: Sequence[torch.Tensor],
    cache: ReferenceCache,
    cache_key: str,
    show_progress: bool = True,
) -> TokenStats:
    """TokenStats of quantized against reference on windows (each int64 [L]); reference log-probs cached."""
    stats = TokenStats()
    for i, w in enumerate(tqdm(windows, desc="tokens", unit="window", disable=not show_progress)):
        lp_r = cache.get(cache_key, i, partial(window_logprobs, reference, w))
        stats.add(i, w, lp_r, window_logprobs(quantized, w))
    return stats

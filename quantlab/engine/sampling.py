"""Sampling parameters and the per-request sampler (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantlab.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks run every request to max_new_tokens

    def check(self) -> None:
        """InputError for values out of range."""
        probs = []
        if self.max_new_tokens < 1:
            probs.append("max new tokens must be >= 1")
        if self.temperature < 0:
            probs.append("temperature must be >= 0")
        if self.top_k < 0:
            probs.append("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            probs.append("top-p must lie in (0, 1]")
        if probs:
            raise InputError("Sampling: " + "; ".join(probs) + ".")

    @property
    def greedy(self) -> bool:
        """True when the argmax is taken (temperature 0 or top-k 1)."""
        return self.temperature == 0 or self.top_k == 1


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded for this request (None for greedy); draws depend on this request only."""
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """One token id from float32 logits [V] (on any device; sampled on CPU for reproducibility)."""
    if params.greedy or gen is None:
        return int(logits.argmax())
    x = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(x, min(params.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sx, idx = torch.sort(x, descending=True)
        cum = torch.softmax(sx, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sx, dim=-1) >= params.top_p  # keep the smallest prefix >= p
        x = x.scatter(0, idx, sx.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))

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


_M32 = 0xFFFFFFFF


def request_seed(params: SamplingParams) -> int | None:
    """The seed of one request's draws (None for greedy; a random one where none was given)."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix of int64 h in [0, 2^32) (xor-shift / multiply rounds)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [S, V] in (0, 1): a counter-based hash of (seed, step, token id) per row, so a
    request's draws depend on its seed and step alone, never on the batch it runs in.

    seeds, steps: int64 [S] (seeds of up to 62 bits) on the device the noise is wanted on."""
    key = _hash32((seeds & _M32) ^ _hash32((seeds >> 32) & _M32))
    key = _hash32(key ^ (steps & _M32))
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _hash32(key[:, None] ^ _hash32(tok)[None, :])
    return ((h >> 8).float() + 0.5) * (1.0 / 2**24)


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> list[int]:
    """One token id per row of float32 logits [S, V] (sample_rows_t's draw, on the host)."""
    return sample_rows_t(logits, params, seeds, steps).tolist()


def sample_rows_t(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> torch.Tensor:
    """int64 [S]: one token id per row of float32 logits [S, V], on their device (one batch of ops).

    Temperature, then top-k, then top-p on what top-k left (the smallest prefix of the sorted
    probabilities reaching p), then a Gumbel-max draw with uniform_noise(seed, step)."""
    dev, v = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=dev).reshape(-1, 1)
    x = logits.float() / temps
    g = -torch.log(-torch.log(uniform_noise(_i64(seeds, dev), _i64(steps, dev), v)))
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        return (x + g).argmax(-1)
    sx, idx = torch.sort(x, dim=-1, descending=True)
    pos = torch.arange(v, device=dev).reshape(1, -1)
    k = _i64([p.top_k if p.top_k > 0 else v for p in params], dev).reshape(-1, 1)
    sx = sx.masked_fill(pos >= k, float("-inf"))
    prob = torch.softmax(sx, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev).reshape(-1, 1)
    drop = (prob.cumsum(-1) - prob >= top_p) & (top_p < 1.0)
    sx = sx.masked_fill(drop, float("-inf"))
    choice = (sx + g.gather(1, idx)).argmax(-1, keepdim=True)
    return idx.gather(1, choice).reshape(-1)


def _i64(vals: list[int], dev: torch.device) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64, device=dev)


def sample(logits: torch.Tensor, params: SamplingParams, seed: int | None, step: int = 0) -> int:
    """One token id from float32 logits [V]: the argmax when greedy, else sample_rows' draw."""
    if params.greedy or seed is None:
        return int(logits.argmax())
    return sample_rows(logits.reshape(1, -1), [params], [seed], [step])[0]

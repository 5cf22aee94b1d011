"""Error and interval statistics of the report: SQNR, relative error, cosine, bootstrap and Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

CONFIDENCE = 0.95
RESAMPLES = 2000
BLOCK_TOKENS = 64  # the bootstrap resamples blocks of consecutive predicted tokens
SEED = 0


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise) from summed squares; None when either is exactly 0 (no noise: infinite)."""
    if noise == 0.0 or signal == 0.0:
        return None
    return 10.0 * math.log10(signal / noise)


@dataclass
class ErrorStats:
    """Running sums comparing test rows with reference rows [T, C]: energy, noise and per-row cosine."""

    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    rows: int = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        """Accumulate ref / test [..., C] (any float dtype; computed in float64), one row per token."""
        r = ref.detach().reshape(-1, ref.shape[-1]).double()
        t = test.detach().reshape(-1, test.shape[-1]).double()
        self.signal += float(r.pow(2).sum())
        self.noise += float((r - t).pow(2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(r, t, dim=-1, eps=1e-30).sum())
        self.rows += r.shape[0]

    @property
    def sqnr_db(self) -> float | None:
        """SQNR in dB over everything added (None: identical)."""
        return sqnr_db(self.signal, self.noise)

    @property
    def rel_error(self) -> float:
        """||ref - test|| / ||ref|| over everything added."""
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else 0.0

    @property
    def cosine(self) -> float:
        """Mean per-row cosine similarity."""
        return self.cos_sum / self.rows if self.rows else 1.0

    def to_dict(self) -> dict[str, float | None]:
        """{sqnr_db, rel_error, cosine} for JSON."""
        return {"sqnr_db": self.sqnr_db, "rel_error": self.rel_error, "cosine": self.cosine}


def block_ids(lengths: list[int], block: int = BLOCK_TOKENS) -> torch.Tensor:
    """Block index [sum(lengths)] (int64) of each token: blocks of `block` tokens never cross windows."""
    ids, start = [], 0
    for n in lengths:
        per = torch.arange(n) // block
        ids.append(per + start)
        start += int(per.max()) + 1 if n else 0
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def block_bootstrap(
    columns: list[torch.Tensor],
    blocks: torch.Tensor,
    stat: Callable[[list[torch.Tensor]], torch.Tensor],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of stat over a paired block bootstrap.

    columns: per-token values [T] (float64) that are resampled together (paired); blocks [T]
    (int64) the block of each token; stat maps column sums per resample [R] (one tensor per
    column, plus the token count as the last element) to the statistic [R].
    """
    n_blocks = int(blocks.max()) + 1
    sums = [torch.zeros(n_blocks, dtype=torch.float64).index_add_(0, blocks, c) for c in columns]
    counts = torch.bincount(blocks, minlength=n_blocks).double()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, n_blocks, (resamples, n_blocks), generator=g)
    weights = torch.zeros(resamples, n_blocks, dtype=torch.float64)
    weights.scatter_add_(1, pick, torch.ones_like(pick, dtype=torch.float64))
    values = stat([weights @ s for s in sums] + [weights @ counts])
    alpha = (1.0 - confidence) / 2
    lo, hi = torch.quantile(values, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def ppl_diff_interval(
    nll_ref: torch.Tensor, nll_quant: torch.Tensor, blocks: torch.Tensor
) -> dict[str, float | list[float]]:
    """Perplexity difference (quant - ref, absolute and in %) and its paired bootstrap 95 % interval.

    nll_ref / nll_quant: per-token negative log-likelihood [T] (float64) of the same tokens.
    """
    n = nll_ref.numel()
    ppl_r = math.exp(float(nll_ref.sum()) / n)
    ppl_q = math.exp(float(nll_quant.sum()) / n)

    def diff(s: list[torch.Tensor]) -> torch.Tensor:
        return torch.exp(s[1] / s[2]) - torch.exp(s[0] / s[2])

    def pct(s: list[torch.Tensor]) -> torch.Tensor:
        return 100.0 * (torch.exp((s[1] - s[0]) / s[2]) - 1.0)

    cols = [nll_ref.double(), nll_quant.double()]
    lo, hi = block_bootstrap(cols, blocks, diff)
    plo, phi = block_bootstrap(cols, blocks, pct)
    return {
        "ppl_ref": ppl_r,
        "ppl_quant": ppl_q,
        "ppl_delta": ppl_q - ppl_r,
        "ppl_delta_ci": [lo, hi],
        "ppl_delta_pct": 100.0 * (ppl_q / ppl_r - 1.0),
        "ppl_delta_pct_ci": [plo, phi],
    }


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval [lo, hi] of a binomial proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    z = _z(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_diff_interval(
    ref: torch.Tensor, quant: torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED
) -> list[float]:
    """95 % paired bootstrap interval of mean(quant) - mean(ref) over examples (each [n], 0/1 or real)."""
    n = ref.numel()
    blocks = torch.arange(n)
    lo, hi = block_bootstrap(
        [ref.double(), quant.double()],
        blocks,
        lambda s: (s[1] - s[0]) / s[2],
        resamples=resamples,
        seed=seed,
    )
    return [lo, hi]


def excludes_zero(interval: list[float]) -> bool:
    """True when the interval [lo, hi] lies entirely on one side of 0."""
    return interval[0] > 0.0 or interval[1] < 0.0


def _z(confidence: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2)))

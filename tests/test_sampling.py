"""The engine's sampler: greedy, temperature, top-k, top-p, seeds; batched rows draw what each
row draws alone (counter-based noise of seed and step)."""

from __future__ import annotations

import math

import pytest
import torch

from quantlab.engine.sampling import (
    SamplingParams,
    request_seed,
    sample,
    sample_rows,
    uniform_noise,
)
from quantlab.errors import InputError

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def _draws(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    seed = request_seed(params)
    return torch.tensor([sample(LOGITS, params, seed, step) for step in range(n)])


def test_greedy_takes_the_argmax_and_needs_no_generator() -> None:
    p = SamplingParams(temperature=0.0)
    assert request_seed(p) is None
    assert sample(LOGITS, p, None) == 0
    assert SamplingParams(temperature=2.0, top_k=1).greedy


def test_temperature_one_draws_the_softmax() -> None:
    d = _draws(SamplingParams(temperature=1.0, seed=3))
    freq = torch.bincount(d, minlength=5).float() / len(d)
    want = torch.softmax(LOGITS, -1)
    sd = torch.sqrt(want * (1 - want) / len(d))
    assert bool(((freq - want).abs() < 4 * sd + 1e-3).all()), (freq, want)


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2, seed=1)).tolist()) == {0, 1}
    # cumulative 0.5, 0.75, 0.90: top-p 0.7 keeps the smallest prefix reaching 0.7 -> {0, 1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7, seed=1)).tolist()) == {0, 1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.4, seed=1)).tolist()) == {0}


def test_high_temperature_flattens() -> None:
    d = _draws(SamplingParams(temperature=100.0, seed=5))
    freq = torch.bincount(d, minlength=5).float() / len(d)
    assert float(freq.min()) > 0.15 and math.isclose(float(freq.sum()), 1.0)


def test_a_seed_fixes_the_draws() -> None:
    p = SamplingParams(temperature=0.9, seed=11)
    assert torch.equal(_draws(p, 200), _draws(p, 200))
    assert not torch.equal(_draws(p, 200), _draws(SamplingParams(temperature=0.9, seed=12), 200))


@pytest.mark.parametrize(
    "bad", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}]
)
def test_out_of_range_values_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(InputError, match="Sampling"):
        SamplingParams(**bad).check()  # type: ignore[arg-type]


def test_batched_rows_draw_what_each_row_draws_alone() -> None:
    """A request's token does not depend on the other rows of its batch (in-flight batching
    reproduces a request run alone) and the noise of one step differs from the next."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.0, top_k=20, seed=2),
        SamplingParams(temperature=1.3, top_p=0.6, seed=3),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.9, seed=2**61 + 7),
        SamplingParams(temperature=1.0, seed=1),
    ]
    seeds, steps = [p.seed or 0 for p in params], [4, 0, 9, 2, 5]
    both = sample_rows(logits, params, seeds, steps)
    alone = [
        sample_rows(logits[i : i + 1], [p], [seeds[i]], [steps[i]])[0] for i, p in enumerate(params)
    ]
    assert both == alone
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 1000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02  # 3000 draws: sd of the mean ~0.005
    # distinct (seed, step) give unrelated rows: correlation near 0 (sd ~0.03)
    c = torch.corrcoef(u)
    assert float(c[0, 1].abs()) < 0.12 and float(c[0, 2].abs()) < 0.12

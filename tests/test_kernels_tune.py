"""The autotuner's choice logic on CPU, with its timer replaced by scripted timings."""

from __future__ import annotations

import pytest
import torch
from quantlab.kernels import _tune
from quantlab.kernels._tune import REFINE, Tuner, plan


def test_tuner_refines_close_plans_and_skips_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first pass (rep 20) ranks A < B < C < D; B is within REFINE of A, C is not, D fails.
    The refined pass (rep 100) reverses A and B, so B is picked; C is never re-timed; the cache
    serves the second call without timing."""
    a, b, c, d = (plan("t", ID=i) for i in range(4))
    first = {a: 1.00, b: 1.00 + REFINE / 2, c: 1.00 + 2 * REFINE}
    refined = {a: 1.10, b: 1.05}
    calls: list[tuple[int, int]] = []
    current: list = []

    def run(p):
        current[:] = [p]
        if p == d:
            raise RuntimeError("does not fit")

    def fake_bench(fn, rep: float) -> float:
        fn()
        p = current[0]
        calls.append((p.get("ID"), rep))
        return (refined if rep > 20 else first)[p]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_tune, "_time_ms", fake_bench)
    tuner = Tuner("test")
    assert tuner.pick("k", [a, b, c, d], run) == b
    assert sorted(calls) == [(0, 20), (0, 100), (1, 20), (1, 100), (2, 20)]
    assert any("failed" in name for name, _ in tuner.timings["k"])
    calls.clear()
    assert tuner.pick("k", [a, b, c, d], run) == b and not calls
    # with nothing close, the first pass decides and nothing is re-timed
    first[b] = 2.0
    tuner2 = Tuner("test2")
    assert tuner2.pick("k", [a, b, c], run) == a
    assert all(rep == 20 for _, rep in calls)

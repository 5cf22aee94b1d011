"""Scheduler.would_admit: the look-ahead decode's test that the next step's batch cannot change."""

from __future__ import annotations

from quantlab.engine.kv_cache import BlockAllocator
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.scheduler import Scheduler, Sequence


def _sched(num_blocks: int, max_batch: int) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks), 16, max_batch, 64)


def _seq(rid: int, n: int) -> Sequence:
    return Sequence(rid, list(range(3, 3 + n)), SamplingParams(max_new_tokens=8))


def _step(s: Scheduler) -> bool:
    """would_admit(), checked against what the schedule() right after it does."""
    said, waiting = s.would_admit(), len(s.waiting)
    s.schedule()
    assert said == (len(s.waiting) < waiting)
    return said


def test_would_admit_matches_what_schedule_then_does() -> None:
    """would_admit() is True exactly when the next schedule() admits a waiting request: an empty
    queue, a short pool, a full batch and room are each checked against schedule() itself."""
    s = _sched(num_blocks=6, max_batch=2)  # 5 usable blocks of 16 tokens
    assert not _step(s)  # nothing waits
    s.add(_seq(0, 20))  # 2 blocks
    assert _step(s)
    s.add(_seq(1, 60))  # needs 4 blocks (61 tokens), 3 are free
    assert not _step(s)
    s.release(s.running[0])
    assert _step(s)  # the pool has room again
    s.add(_seq(2, 4))
    s.add(_seq(3, 4))
    assert _step(s)  # one slot left in the batch and one free block: rid 2 joins
    assert [q.rid for q in s.running] == [1, 2]
    assert not _step(s)  # the batch is full: rid 3 waits
    s.release(s.running[1])
    assert _step(s)
    assert [q.rid for q in s.running] == [1, 3]


def test_would_admit_respects_a_closed_static_batch() -> None:
    """Under static batching a request waits while the running batch is closed."""
    s = _sched(num_blocks=10, max_batch=4)
    s.static_batching = True
    s.add(_seq(0, 4))
    s.schedule()  # the batch closes: nothing else waited
    s.add(_seq(1, 4))
    assert not s.would_admit()
    s.schedule()
    assert [q.rid for q in s.running] == [0]
    s.release(s.running[0])
    s.schedule()  # the batch emptied: a new one opens
    assert [q.rid for q in s.running] == [1]

"""Decode one step ahead of the host: the next decode step is queued before this one's tokens are read.

Between two decode steps the host reads the tokens, checks stops, plans the next step and fills
its inputs: at batch 1 that is about a tenth of a W4A16 step, time the GPU would sit idle. With
look-ahead, once a decode step is queued the engine queues the following one at once, its tokens
taken on the device from the first step's (argmax or the seeded draw, no host round trip), and
only then waits for the first step's tokens. A sequence that stops on a token of the first step
has its row of the second step dropped: the work is wasted, never the output, so every request
gets the tokens it gets without look-ahead.

A step is queued ahead only when nothing would change the batch: every sequence decodes, none
reaches max_new_tokens or max_seq_len on the step in flight, no waiting request would be admitted,
and the pool has each sequence's next block without preempting anyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quantlab.engine.sampling import sample_rows_t

if TYPE_CHECKING:
    from quantlab.engine.runtime import Engine
    from quantlab.engine.scheduler import Sequence


@dataclass
class InFlight:
    """A queued decode step: its sequences (one row each) and its tokens, on device and host."""

    seqs: list[Sequence]
    tokens_dev: torch.Tensor  # int64 [R] on the engine's device
    tokens_host: torch.Tensor  # int64 [R], pinned on CUDA, filled by a queued copy
    event: torch.cuda.Event | None  # recorded after that copy (None on CPU)
    t0: float

    def tokens(self) -> list[int]:
        """The step's tokens (waits for this step only, not for one queued after it)."""
        if self.event is not None:
            self.event.synchronize()
        return self.tokens_host.tolist()


def device_tokens(seqs: list[Sequence], logits: torch.Tensor, ahead: int) -> torch.Tensor:
    """int64 [R]: each row's next token on the device (argmax, or the seeded draw of sampled
    requests at their draw index len(output) + ahead)."""
    toks = logits.argmax(-1)
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy and s.seed is not None]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        picked = sample_rows_t(
            logits.index_select(0, idx),
            [seqs[i].params for i in drawn],
            [seqs[i].seed for i in drawn],  # type: ignore[misc]
            [len(seqs[i].output) + ahead for i in drawn],
        )
        toks = toks.index_copy(0, idx, picked)
    return toks


def queueable(e: Engine, seqs: list[Sequence]) -> bool:
    """True when a decode step of seqs can go through the look-ahead path (graphs serve it)."""
    return bool(seqs) and (e.graphs.serves(len(seqs)) if e.graphs is not None else True)


def launch(e: Engine, seqs: list[Sequence], prev: InFlight | None = None) -> InFlight:
    """Queue one decode step of seqs: from the host's tokens, or (prev given) one position further,
    its tokens taken on the device from prev, which is still in flight."""
    t0 = time.perf_counter()
    ahead = int(prev is not None)
    src = prev.tokens_dev if prev is not None else None
    rows = None
    if prev is not None:  # by identity: Sequence's dataclass == compares every field
        at = {id(q): i for i, q in enumerate(prev.seqs)}
        rows = [at[id(q)] for q in seqs]
    if e.graphs is not None:
        logits = e.graphs.run(seqs, ahead, src, rows)
    else:
        batch = e.decode_batch(seqs, ahead)
        if src is not None:
            batch.tokens = src.index_select(0, torch.tensor(rows, device=src.device))
        logits = e.model(batch, e.cache)
    toks = device_tokens(seqs, logits, ahead)
    if e.device.type != "cuda":
        return InFlight(seqs, toks, toks, None, t0)
    e.token_turn ^= 1  # two pinned buffers: the other holds the step before, not yet read
    host = e.token_host[e.token_turn, : len(seqs)]
    host.copy_(toks, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return InFlight(seqs, toks, host, ev, t0)


def follow(e: Engine, cur: InFlight) -> InFlight | None:
    """Queue the step after cur (still in flight) when nothing can change the batch; else None."""
    s = e.scheduler
    alive = [q for q in cur.seqs if q.finish_reason is None]
    if not alive or not queueable(e, alive):
        return None
    for q in alive:  # cur appends one token to each: would any reach a length limit?
        if len(q.output) + 1 >= q.params.max_new_tokens or q.num_tokens + 1 >= e.cfg.max_seq_len:
            return None
    if s.would_admit():
        return None
    for q in alive:  # the next step writes position computed + 1
        if not s._grow(q, q.computed + 2):
            return None
    return launch(e, alive, cur)

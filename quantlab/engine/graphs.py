"""CUDA graphs of the decode step, one per batch bucket (1, 2, 4, ... max_batch_size).

A decode step of B sequences replays the graph of the smallest bucket >= B. Padding rows run token
0 at position 0 into the scratch block 0 with context length 0 (the attention kernel returns 0 for
them) and their logits are dropped. The multi-block split count is fixed per bucket from
max_seq_len; the kernel sizes each split from the live context, so short contexts stay correct.
Each graph is captured on first use after two eager warm-up runs (which also let the kernels'
tuner pick its plans for that M): `capture_all` moves that cost out of timed regions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quantlab.engine.model import StepBatch

if TYPE_CHECKING:
    from quantlab.engine.runtime import Engine
    from quantlab.engine.scheduler import Sequence


def buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class DecodeGraphs:
    """Captured decode steps of one engine, with their static input buffers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buckets = buckets(engine.cfg.build.max_batch_size)
        n, mb, dev = self.buckets[-1], engine.max_blocks_per_seq, engine.device
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros((n, mb), dtype=torch.int32, device=dev)
        self.ctx_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)
        # token, position, slot, context length, source row, block table
        self.host = torch.zeros((2, n, 5 + mb), dtype=torch.long).pin_memory()
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None  # the graphs share one memory pool handle

    def serves(self, n: int) -> bool:
        """True when a decode step of n sequences has a bucket."""
        return n <= self.buckets[-1]

    def _batch(self, b: int) -> StepBatch:
        return StepBatch(
            self.tokens[:b],
            self.positions[:b],
            self.slots[:b],
            [],
            self.rows[:b],
            self.block_tables[:b],
            self.ctx_lens[:b],
            self.engine.splits_for(b, self.engine.cfg.max_seq_len),
        )

    def capture(self, b: int) -> None:
        """Warm up and capture the decode step of bucket b."""
        e = self.engine
        self.ctx_lens.zero_()
        batch = self._batch(b)
        side = torch.cuda.Stream(e.device)
        side.wait_stream(torch.cuda.current_stream(e.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                e.model(batch, e.cache)
        torch.cuda.current_stream(e.device).wait_stream(side)
        torch.cuda.synchronize(e.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self.logits[b] = e.model(batch, e.cache)
        self.pool = g.pool()
        self.graphs[b] = g

    def capture_all(self) -> None:
        """Capture every bucket now (largest first, so smaller ones reuse its memory pool)."""
        for b in reversed(self.buckets):
            if b not in self.graphs:
                self.capture(b)

    def run(
        self,
        seqs: list[Sequence],
        ahead: int = 0,
        src: torch.Tensor | None = None,
        src_rows: list[int] | None = None,
    ) -> torch.Tensor:
        """float32 logits [len(seqs), V] of one decode step: sequence i runs position
        computed + ahead, with its token from the host, or (src given: int64 [R] on the device,
        a step still in flight) src[src_rows[i]], so no host round trip sits between the steps."""
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        if b not in self.graphs:
            self.capture(b)
        bs = self.engine.cfg.build.block_size
        self.turn ^= 1  # two staging buffers: the other may still feed a queued copy
        h = self.host[self.turn, :b]
        hn = h.numpy()  # numpy element writes: ~30x cheaper than torch indexing (bs 64: 2.4 ms)
        hn.fill(0)
        for i, seq in enumerate(seqs):
            p = seq.computed + ahead
            row = hn[i]
            if src is None:
                row[0] = seq.prompt[p] if p < len(seq.prompt) else seq.output[p - len(seq.prompt)]
            else:
                row[4] = src_rows[i] if src_rows is not None else i
            row[1] = p
            row[2] = seq.blocks[p // bs] * bs + p % bs
            row[3] = p + 1
            row[5 : 5 + len(seq.blocks)] = seq.blocks
        d = h.to(self.engine.device, non_blocking=True)
        self.tokens[:b].copy_(d[:, 0])
        if src is not None:
            self.tokens[:n].copy_(src.index_select(0, d[:n, 4]))
        self.positions[:b].copy_(d[:, 1])
        self.slots[:b].copy_(d[:, 2])
        self.ctx_lens[:b].copy_(d[:, 3])
        self.block_tables[:b].copy_(d[:, 5:])
        self.graphs[b].replay()
        return self.logits[b][:n]

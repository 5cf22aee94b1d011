"""In-flight batching: requests join and leave the running batch at every step.

Each step the scheduler gives every running sequence its next tokens (one for a decoding sequence,
the rest of its prompt for one still in prefill), then admits waiting requests while the batch has
room (max_batch_size) and the step's token budget (max_num_tokens) is not spent: long prompts are
prefilled in chunks across steps (chunked prefill). A finished sequence frees its KV blocks at once.
When a decoding sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it waits to be recomputed (prompt + tokens so far), which
changes no token it has produced.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from quantlab.engine.kv_cache import BlockAllocator
from quantlab.engine.sampling import SamplingParams, request_seed


@dataclass
class Sequence:
    """One request's state."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    seed: int | None = None  # of the sampled draws (None: greedy)

    def __post_init__(self) -> None:
        self.seed = request_seed(self.params)

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        """len(tokens), without building the list."""
        return len(self.prompt) + len(self.output)


class Scheduler:
    """Waiting queue + running batch over one block allocator; schedule() plans one step."""

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_batch_size: int,
        max_num_tokens: int,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.peak_running = 0  # the largest running batch seen (the KV pool's real capacity)
        # Static batching (the baseline in-flight batching is measured against): new requests
        # join only when every request of the running batch has finished.
        self.static_batching = False
        self._batch_open = True

    def add(self, seq: Sequence) -> None:
        """Queue a request (admitted at the next step with room)."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.waiting or self.running)

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Give seq blocks for n_tokens cached tokens; False when the pool is short."""
        need = self._blocks_for(n_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.free:
            return False
        seq.blocks += self.allocator.allocate(need)
        return True

    def release(self, seq: Sequence) -> None:
        """Free seq's blocks and drop it from the running batch."""
        self.allocator.release(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)

    def _preempt(self) -> Sequence:
        victim = self.running[-1]
        self.release(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def would_admit(self) -> bool:
        """True when the next schedule() would admit a waiting request into the running batch."""
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return False
        if self.static_batching and not self._batch_open:
            return False
        return self._blocks_for(self.waiting[0].num_tokens + 1) <= self.allocator.free

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) pairs for one step: running sequences first, then new ones."""
        budget = self.max_num_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below by an earlier sequence
                continue
            n = min(seq.num_tokens - seq.computed, budget)
            if n <= 0:
                continue
            while not self._grow(seq, seq.computed + n):
                if self._preempt() is seq:
                    break
            if seq not in self.running:
                continue
            plan.append((seq, n))
            budget -= n
        if self.static_batching and not self.running:
            self._batch_open = True
        admit = not self.static_batching or self._batch_open
        while admit and self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            # Admit only when the whole prompt (and the first generated token) fits the free pool,
            # so a prompt in chunked prefill does not starve the batch of blocks.
            if self._blocks_for(seq.num_tokens + 1) > self.allocator.free:
                break
            n = min(seq.num_tokens, budget)
            self._grow(seq, n)
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        if len(self.running) >= self.max_batch_size or not self.waiting:
            self._batch_open = False  # static batching: this batch is complete
        self.peak_running = max(self.peak_running, len(self.running))
        return plan

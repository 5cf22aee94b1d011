"""`quantlab bench`: static-batch rows (latency, tokens/s, peak memory) and an in-flight trace.

Static rows time a whole generation (context phase + every decode step) of batch_size prompts of
input_len random tokens, each run to exactly output_len tokens, after a warm-up that captures the
CUDA graphs and an untimed run of the same batch that lets the kernels' tuner pick its plans for
that context-phase M (so neither is inside a timed region).
The trace sends N requests with seeded lengths and reports throughput and per-request latency
percentiles, with in-flight batching and with static batching (a batch admits new requests only
when all of its requests are done).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quantlab.engine.runtime import Engine
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import InputError


@dataclass
class BenchRow:
    """One static-batch measurement."""

    batch_size: int
    input_len: int
    output_len: int
    latency_ms: float
    tokens_per_s: float
    peak_mem_gb: float

    def line(self) -> str:
        """The row in the seed benchmark's [BENCHMARK] line format."""
        return (
            f"[BENCHMARK] batch_size {self.batch_size} input_length {self.input_len} "
            f"output_length {self.output_len} latency(ms) {self.latency_ms:.2f} "
            f"tokensPerSec {self.tokens_per_s:.2f} gpu_peak_mem(gb) {self.peak_mem_gb:.2f}"
        )


def _sync(e: Engine) -> None:
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)


def random_prompts(e: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of `length` token ids drawn uniformly from the vocabulary (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, e.cfg.model.vocab_size, (n, length), generator=g).tolist()


def warm_up(e: Engine) -> None:
    """Capture every CUDA-graph bucket, run one short request, and one context phase per M bucket
    up to max_num_tokens (the tuner's picks and the allocations happen here, untimed)."""
    if e.graphs is not None:
        e.graphs.capture_all()
    e.generate(random_prompts(e, 1, 8, 0), SamplingParams(max_new_tokens=4, ignore_eos=True))
    # context-phase steps of 16 .. max_num_tokens tokens: the tuner picks a plan per M bucket
    b, m = e.cfg.build, 16
    while m <= b.max_num_tokens:
        n = min(m, e.cfg.max_input_len)
        k = min(max(1, m // n), b.max_batch_size)
        e.generate(random_prompts(e, k, n, 0), SamplingParams(max_new_tokens=1, ignore_eos=True))
        m *= 2
    _sync(e)


def check_row(e: Engine, bs: int, inp: int, out: int) -> str | None:
    """Why (bs, inp, out) does not fit this engine, else None."""
    b = e.cfg.build
    if bs > b.max_batch_size:
        return f"batch size {bs} > max_batch_size {b.max_batch_size}"
    if inp > e.cfg.max_input_len:
        return f"input {inp} > max_input_len {e.cfg.max_input_len}"
    if inp + out > e.cfg.max_seq_len:
        return f"input + output {inp + out} > max_seq_len {e.cfg.max_seq_len}"
    return None


def bench_static(e: Engine, bs: int, inp: int, out: int, seed: int = 1) -> BenchRow:
    """Time one static batch (see the module docstring)."""
    prompts = random_prompts(e, bs, inp, seed)
    # untimed: the kernels' tuner picks its plans for this context-phase M (bs x inp tokens)
    e.generate(prompts, SamplingParams(max_new_tokens=min(out, 2), ignore_eos=True))
    params = SamplingParams(max_new_tokens=out, ignore_eos=True)
    if e.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(e.device)
    _sync(e)
    t0 = time.perf_counter()
    outs = e.generate(prompts, params)
    _sync(e)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == out for o in outs)
    peak = torch.cuda.max_memory_allocated(e.device) / 1e9 if e.device.type == "cuda" else 0.0
    return BenchRow(bs, inp, out, dt * 1e3, bs * out / dt, peak)


@dataclass
class TraceResult:
    """An in-flight (or static-batching) trace run."""

    mode: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    p50_latency_s: float
    p99_latency_s: float
    steps: dict[str, list[float]]  # step kind -> [steps, seconds, tokens run] (Engine.step_stats)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


def trace_lengths(
    n: int, inp: tuple[int, int], out: tuple[int, int], seed: int
) -> list[tuple[int, int]]:
    """n (input_len, output_len) pairs drawn uniformly from the two ranges (seeded)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(inp[0], inp[1] + 1, (n,), generator=g).tolist()
    o = torch.randint(out[0], out[1] + 1, (n,), generator=g).tolist()
    return list(zip(i, o, strict=True))


def bench_trace(
    e: Engine, lengths: list[tuple[int, int]], static: bool, seed: int = 2
) -> TraceResult:
    """All requests arrive at t = 0; latency = finish - arrival per request."""
    for inp, out in lengths:
        why = check_row(e, 1, inp, out)
        if why:
            raise InputError(f"trace: a request does not fit the engine ({why}).")
    g = torch.Generator().manual_seed(seed)
    e.scheduler.static_batching = static
    e.step_stats = {}
    try:
        _sync(e)
        t0 = time.perf_counter()
        for inp, out in lengths:
            ids = torch.randint(3, e.cfg.model.vocab_size, (inp,), generator=g).tolist()
            e.add_request(ids, SamplingParams(max_new_tokens=out, ignore_eos=True))
        done = []
        while e.scheduler.has_work():
            done += e.step()
        _sync(e)
        dt = time.perf_counter() - t0
    finally:
        e.scheduler.static_batching = False
    lat = torch.tensor([d.latency for d in done])
    toks = sum(len(d.token_ids) for d in done)
    return TraceResult(
        "static" if static else "inflight",
        len(done),
        toks,
        dt,
        toks / dt,
        float(lat.quantile(0.5)),
        float(lat.quantile(0.99)),
        {k: list(v) for k, v in e.step_stats.items()},
    )

"""The engine at run time: load an engine folder, then add requests and step (or generate / score).

On CUDA the linears run quantlab's kernels and decode steps replay CUDA graphs captured per batch
bucket; on CPU the same code runs the torch reference kernels (slow, exact: what CI tests).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quantlab.engine import ahead
from quantlab.engine.config import ENGINE_WEIGHTS, EngineConfig
from quantlab.engine.graphs import DecodeGraphs
from quantlab.engine.kv_cache import PagedKVCache, kv_bytes_per_block
from quantlab.engine.linear import EngineLinear
from quantlab.engine.model import DecoderLayer, EngineModel, SeqSlice, StepBatch
from quantlab.engine.sampling import SamplingParams
from quantlab.engine.scheduler import Scheduler, Sequence
from quantlab.errors import InputError
from quantlab.kernels.paged_attention import choose_splits

log = logging.getLogger(__name__)
LOOKAHEAD_ENV = "QUANTLAB_ENGINE_LOOKAHEAD"


@dataclass
class RequestOutput:
    """A finished request: its tokens, why it stopped, and its timings (seconds)."""

    rid: int
    prompt_len: int
    token_ids: list[int]
    finish_reason: str
    latency: float
    time_to_first_token: float
    preemptions: int


def load_engine_config(engine_dir: Path) -> EngineConfig:
    """config.json of an engine folder; InputError when it is not one."""
    cfile = Path(engine_dir) / "config.json"
    if not cfile.is_file():
        raise InputError(
            f"{engine_dir} is not an engine folder (no config.json); make one with "
            "`quantlab build CHECKPOINT_DIR --output ENGINE_DIR`."
        )
    return EngineConfig.from_dict(json.loads(cfile.read_text()), str(engine_dir))


def engine_device(name: str | None) -> torch.device:
    """The device to run on: name ('cpu', 'cuda', 'cuda:N'), or CUDA when torch sees a GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: the engine runs on cpu or cuda only.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {name!r}, but torch {torch.__version__} sees no CUDA GPU on this machine; "
            "use --device cpu (the reference kernels) or run where a GPU is visible."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return dev


def build_model(cfg: EngineConfig, tensors: dict[str, torch.Tensor]) -> EngineModel:
    """EngineModel from the engine tensors (names as build.convert_layers writes them)."""

    def linear(name: str) -> EngineLinear:
        pre = name + "."
        own = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
        return EngineLinear(cfg.linears[name], own)

    layers = []
    for i in range(cfg.model.num_layers):
        names = [n.split(".")[2] for n in cfg.linears if n.startswith(f"layers.{i}.")]
        layer = DecoderLayer(cfg.model, {n: linear(f"layers.{i}.{n}") for n in names})
        layer.input_norm.data = tensors[f"layers.{i}.input_norm"]
        layer.post_norm.data = tensors[f"layers.{i}.post_norm"]
        layers.append(layer)
    model = EngineModel(cfg.model, layers, linear("lm_head"))
    model.embed.data = tensors["embed"]
    model.final_norm.data = tensors["final_norm"]
    return model.eval()


class Engine:
    """A loaded engine: model + paged KV cache + scheduler."""

    def __init__(
        self,
        engine_dir: Path,
        device: str | None = None,
        use_cuda_graphs: bool = True,
        multi_block: bool = True,
        kv_cache_mem_gb: float | None = None,
        lookahead: bool | None = None,
    ) -> None:
        self.dir = Path(engine_dir)
        self.cfg = load_engine_config(self.dir)
        self.device = engine_device(device)
        try:
            tensors = load_file(str(self.dir / ENGINE_WEIGHTS), device=str(self.device))
        except (SafetensorError, OSError, FileNotFoundError) as e:
            raise InputError(
                f"Engine {self.dir}: {ENGINE_WEIGHTS} cannot be read ({e}); rebuild the engine."
            ) from None
        self.model = build_model(self.cfg, tensors).to(self.device)
        self.cache = self._make_cache(kv_cache_mem_gb)
        b = self.cfg.build
        self.scheduler = Scheduler(
            self.cache.allocator, b.block_size, b.max_batch_size, b.max_num_tokens
        )
        self.max_blocks_per_seq = -(-self.cfg.max_seq_len // b.block_size)
        self.multi_block = multi_block
        self.graphs: DecodeGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self)
        # Decode one step ahead of the host (quantlab/engine/ahead.py): on by default on CUDA;
        # QUANTLAB_ENGINE_LOOKAHEAD=0 turns it off.
        if lookahead is None:
            lookahead = self.device.type == "cuda" and os.environ.get(LOOKAHEAD_ENV, "1") != "0"
        self.lookahead = lookahead
        self._ahead: ahead.InFlight | None = None
        self.ahead_dropped = 0  # rows of queued steps whose sequence had stopped (wasted work)
        n = b.max_batch_size
        pin = self.device.type == "cuda"
        self.token_host = torch.zeros((2, n), dtype=torch.long, pin_memory=pin)
        self.token_turn = 0
        self._next_id = 0
        self.finished: list[RequestOutput] = []
        self.tokenizer: Any = None
        # step kind -> [steps, seconds, tokens run]: where a trace's time goes (each step's time
        # ends at the logits' host copy, which waits for the GPU)
        self.step_stats: dict[str, list[float]] = {}

    # ---- setup ---------------------------------------------------------------------------------

    def _make_cache(self, mem_gb: float | None) -> PagedKVCache:
        m, b = self.cfg.model, self.cfg.build
        per_block = kv_bytes_per_block(
            m.num_layers, b.block_size, m.num_kv_heads, m.head_dim, self.cfg.kv_storage
        )
        want = b.max_batch_size * -(-self.cfg.max_seq_len // b.block_size) + 1
        budget = mem_gb if mem_gb is not None else b.kv_cache_mem_gb
        if budget is not None:
            blocks = min(want, int(budget * (1 << 30)) // per_block)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # 90 % of what the weights left, minus room for activations and logits.
            act = b.max_num_tokens * (m.hidden_size * 8 + m.intermediate_size * 6) * 2
            act += b.max_batch_size * m.vocab_size * 8
            blocks = min(want, int((free - act) * 0.9) // per_block)
        else:
            blocks = want
        need = -(-self.cfg.max_seq_len // b.block_size) + 1
        if blocks < need:
            raise InputError(
                f"The KV-cache budget ({blocks} blocks of {per_block / 2**20:.1f} MiB) cannot "
                f"hold one sequence of max_seq_len {self.cfg.max_seq_len} ({need} blocks); rebuild "
                "with a smaller --max-seq-len, an int8/fp8 KV cache, or a larger --kv-cache-mem-gb."
            )
        scales = self.cfg.source.get("kv_scales")
        return PagedKVCache(
            m.num_layers,
            blocks,
            b.block_size,
            m.num_kv_heads,
            m.head_dim,
            self.cfg.kv_storage,
            scales,
            self.device,
        )

    def load_tokenizer(self, path: Path | None = None) -> Any:
        """The engine's tokenizer (its tokenizer/ folder) or the one at path."""
        from transformers import AutoTokenizer

        src = path or (self.dir / self.cfg.tokenizer if self.cfg.tokenizer else None)
        if src is None:
            raise InputError(
                f"Engine {self.dir} holds no tokenizer; pass --tokenizer DIR (a Hugging Face "
                "tokenizer folder, e.g. the run's quantlab/ folder)."
            )
        if not Path(src).is_dir():  # never a hub name: the engine reads local folders only
            raise InputError(
                f"Tokenizer folder {src} does not exist; pass --tokenizer DIR (a Hugging Face "
                "tokenizer folder, e.g. the run's quantlab/ folder)."
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            raise InputError(f"Tokenizer {src} cannot be loaded ({e}).") from None
        return self.tokenizer

    def kernel_backend(self, backend: str) -> None:
        """Force the linears' kernel backend ("auto", "reference", ...)."""
        for mod in self.model.modules():
            if isinstance(mod, EngineLinear):
                mod.backend = backend

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: list[int], params: SamplingParams) -> int:
        """Queue a prompt (token ids); its request id."""
        params.check()
        if not prompt:
            raise InputError("A request needs at least one prompt token.")
        if len(prompt) > self.cfg.max_input_len:
            raise InputError(
                f"The prompt has {len(prompt)} tokens; this engine was built with --max-input-len "
                f"{self.cfg.max_input_len}. Shorten it or rebuild with a larger --max-input-len."
            )
        if any(t < 0 or t >= self.cfg.model.vocab_size for t in prompt):
            raise InputError(
                f"A prompt token lies outside the vocabulary [0, {self.cfg.model.vocab_size})."
            )
        rid = self._next_id
        self._next_id += 1
        self.scheduler.add(Sequence(rid, list(prompt), params))
        return rid

    def decode_batch(self, seqs: list[Sequence], ahead: int = 0) -> StepBatch:
        """The eager inputs of one decode step of seqs at position computed + ahead (ahead 1: the
        tokens are left 0 for the caller to fill on the device)."""
        return self._batch([(s, 1) for s in seqs], ahead)

    def _batch(self, plan: list[tuple[Sequence, int]], ahead: int = 0) -> StepBatch:
        bs = self.cfg.build.block_size
        toks, pos, slots, seqs, rows = [], [], [], [], []
        start = 0
        for seq, n in plan:
            c = seq.computed + ahead
            p = list(range(c, c + n))
            toks += seq.tokens[c : c + n] if not ahead else [0] * n
            pos += p
            slots += [seq.blocks[i // bs] * bs + i % bs for i in p]
            ctx = c + n
            blocks = torch.tensor(seq.blocks[: -(-ctx // bs)], dtype=torch.long)
            seqs.append(SeqSlice(start, n, ctx, blocks.to(self.device)))
            if ctx - ahead == seq.num_tokens:
                rows.append(start + n - 1)
            start += n
        dev = self.device

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long).to(dev)

        batch = StepBatch(t(toks), t(pos), t(slots), seqs, t(rows))
        one = [i for i, (_, n) in enumerate(plan) if n == 1]
        if len(one) == len(plan) or len(one) > 1:  # decode-only, or a mixed step's decode rows
            bt = torch.zeros((len(one), self.max_blocks_per_seq), dtype=torch.int32)
            for r, i in enumerate(one):
                owned = plan[i][0].blocks
                bt[r, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
            batch.block_tables = bt.to(dev)
            lens = [seqs[i].ctx_len for i in one]
            batch.ctx_lens = torch.tensor(lens, dtype=torch.int32).to(dev)
            batch.num_splits = self.splits_for(len(one), max(lens))
            if len(one) < len(plan):
                batch.decode_rows = t([seqs[i].start for i in one])
        return batch

    def splits_for(self, batch: int, max_ctx: int) -> int:
        """Multi-block split count for a decode step (1 when multi-block is off or on CPU)."""
        if not self.multi_block or self.device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return choose_splits(
            batch, self.cfg.model.num_kv_heads, max_ctx, self.cfg.build.block_size, sms
        )

    def _next_tokens(self, plan: list[tuple[Sequence, int]], logits: torch.Tensor) -> list[int]:
        """The token of each logits row (rows: the plan's sequences that finish their prompt or
        decode, in order): the argmax for greedy requests, one batched draw for the others."""
        if not logits.shape[0]:
            return []
        rows = [s for s, n in plan if s.computed + n >= s.num_tokens]
        return ahead.device_tokens(rows, logits, 0).tolist()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; the requests that finished in it."""
        if self._ahead is not None:  # a decode step queued ahead by the previous call
            cur, self._ahead = self._ahead, None
            cur.t0 = time.perf_counter()  # its time: what this call waits and records
            return self._finish(cur, "decode (ahead)")
        plan = self.scheduler.schedule()
        if not plan:
            if self.scheduler.waiting and not self.scheduler.running:
                raise InputError(
                    "A waiting request does not fit the KV-cache pool even alone; rebuild with a "
                    "larger --kv-cache-mem-gb or a smaller --max-seq-len."
                )
            return []
        decode = all(n == 1 for _, n in plan)
        seqs = [s for s, _ in plan]
        graphs = self.graphs is not None and self.graphs.serves(len(plan))
        if decode and self.lookahead and ahead.queueable(self, seqs):
            cur = ahead.launch(self, seqs)
            return self._finish(cur, "decode (graph)" if graphs else "decode (eager)")
        t0 = time.perf_counter()
        if decode and graphs:
            logits = self.graphs.run(seqs)  # type: ignore[union-attr]
            kind = "decode (graph)"
        else:
            logits = self.model(self._batch(plan), self.cache)
            kind = (
                "decode (eager)"
                if decode
                else "mixed"
                if any(n == 1 for _, n in plan)
                else "prefill"
            )
        return self._record(plan, self._next_tokens(plan, logits), t0, kind)

    def _finish(self, cur: ahead.InFlight, kind: str) -> list[RequestOutput]:
        """Queue the step after cur when it can go ahead, then read cur's tokens and record them
        (a sequence that finished on the step before cur gets its row dropped)."""
        self._ahead = ahead.follow(self, cur)
        toks = cur.tokens()
        keep = [(s, t) for s, t in zip(cur.seqs, toks, strict=True) if s.finish_reason is None]
        self.ahead_dropped += len(cur.seqs) - len(keep)
        done = self._record([(s, 1) for s, _ in keep], [t for _, t in keep], cur.t0, kind)
        if self._ahead is not None and all(s.finish_reason for s in self._ahead.seqs):
            self.ahead_dropped += len(self._ahead.seqs)
            self._ahead = None  # every row of the queued step stopped: nothing to read
        return done

    def _record(
        self, plan: list[tuple[Sequence, int]], toks: list[int], t0: float, kind: str
    ) -> list[RequestOutput]:
        """Advance the plan's sequences by the step's tokens (one per row: the sequences that
        finish their prompt or decode) and release those that finished."""
        done = []
        row = 0
        now = time.perf_counter()
        st = self.step_stats.setdefault(kind, [0, 0.0, 0])
        st[0] += 1
        st[1] += now - t0
        st[2] += sum(n for _, n in plan)
        for seq, n in plan:
            seq.computed += n
            if seq.computed < seq.num_tokens:
                continue  # prefill chunk: no token yet
            p = seq.params
            tok = toks[row]
            row += 1
            seq.output.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = None
            eos = self.eos_ids if not p.ignore_eos else ()
            if tok in p.stop_token_ids or tok in eos:
                reason = "stop"
            elif len(seq.output) >= p.max_new_tokens:
                reason = "length"
            elif seq.num_tokens >= self.cfg.max_seq_len:
                reason = "max_seq_len"
            if reason is not None:
                seq.finish_reason, seq.finish_time = reason, now
                self.scheduler.release(seq)
                done.append(
                    RequestOutput(
                        seq.rid,
                        len(seq.prompt),
                        list(seq.output),
                        reason,
                        now - seq.arrival,
                        (seq.first_token_time or now) - seq.arrival,
                        seq.preemptions,
                    )
                )
        self.finished += done
        return done

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids of the tokenizer, when one is loaded."""
        tok = self.tokenizer
        if tok is None or tok.eos_token_id is None:
            return ()
        return (int(tok.eos_token_id),)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion with in-flight batching; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        got: dict[int, RequestOutput] = {}
        while self.scheduler.has_work():
            for out in self.step():
                got[out.rid] = out
        return [got[i] for i in ids]

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [L, V] of every position of ids (one prefill, blocks freed after)."""
        bs = self.cfg.build.block_size
        if len(ids) > self.cfg.max_seq_len:
            raise InputError(f"score: {len(ids)} tokens exceed max_seq_len {self.cfg.max_seq_len}.")
        blocks = self.cache.allocator.allocate(-(-len(ids) // bs))
        try:
            n = len(ids)
            slots = [blocks[i // bs] * bs + i % bs for i in range(n)]
            dev = self.device
            batch = StepBatch(
                torch.tensor(ids, dtype=torch.long, device=dev),
                torch.arange(n, dtype=torch.long, device=dev),
                torch.tensor(slots, dtype=torch.long, device=dev),
                [SeqSlice(0, n, n, torch.tensor(blocks, dtype=torch.long, device=dev))],
                torch.arange(n, dtype=torch.long, device=dev),
            )
            return self.model(batch, self.cache)
        finally:
            self.cache.allocator.release(blocks)

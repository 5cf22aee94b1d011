"""`quantlab mem`: the memory an engine needs, by the usual formula (weights + KV cache +
activations, divided by the parallelism), per quant_algo and KV dtype.

weights      sum over linears of N*K*bits/8 + scale/zero bytes, plus embedding, lm_head, norms
kv cache     2 * layers * kv_heads * head_dim * kv_bytes * max_batch_size * max_seq_len
activations  max_num_tokens * (3 * hidden + qkv_out + 3 * intermediate) * act_bytes
             + max_batch_size * vocab * 8 (float32 logits and their softmax)
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.engine.config import EngineConfig, ModelSpec

# quant_algo -> (weight bits, scale bytes per output row per group or channel, group-wise?)
ALGO_BITS: dict[str | None, tuple[int, float, bool]] = {
    None: (16, 0, False),
    "W8A16": (8, 2, False),
    "W4A16": (4, 2, False),
    "W4A16_AWQ": (4, 2, True),
    "W4A16_GPTQ": (4, 3, True),  # scale + integer zero
    "W8A16_GPTQ": (8, 3, True),  # scale + int8 zero (power-of-two groups; others: float)
    "FP8": (8, 0, False),
    "FP8_PER_CHANNEL_PER_TOKEN": (8, 4, False),
    "W8A8_SQ_PER_CHANNEL": (8, 4, False),
    "W8A8_SQ_PER_TENSOR_PLUGIN": (8, 4, False),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (8, 4, False),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": (8, 4, False),
}
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part and their sum (per device)."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        """weights + kv_cache + activations."""
        return self.weights + self.kv_cache + self.activations


def weight_bytes(m: ModelSpec, algo: str | None, group_size: int = 128) -> int:
    """Weight bytes of model m stored as quant_algo (lm_head and embedding in the model dtype)."""
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    shapes = [
        (q + 2 * kv, m.hidden_size),
        (m.hidden_size, q),
        (2 * m.intermediate_size, m.hidden_size),
        (m.hidden_size, m.intermediate_size),
    ]
    bits, scale_bytes, grouped = ALGO_BITS[algo]
    act = 4 if m.dtype == "float32" else 2
    per_layer = 0.0
    for n, k in shapes:
        per_layer += n * k * (bits if bits < 16 else act * 8) / 8
        per_layer += n * scale_bytes * ((k // group_size) if grouped else 1)
    per_layer += 2 * m.hidden_size * act
    rest = (2 * m.vocab_size * m.hidden_size + m.hidden_size) * act
    return int(per_layer * m.num_layers + rest)


def estimate(cfg: EngineConfig, algo: str | None, kv: str, parallel: int = 1) -> MemoryEstimate:
    """The formula of the module docstring for cfg's model and limits, at quant_algo / KV dtype."""
    m, b = cfg.model, cfg.build
    act_b = 4 if m.dtype == "float32" else 2
    kvb = 2 * m.num_layers * m.num_kv_heads * m.head_dim * KV_BYTES[kv]
    kvb *= b.max_batch_size * cfg.max_seq_len
    qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    act = b.max_num_tokens * (3 * m.hidden_size + qkv + 3 * m.intermediate_size) * act_b
    act += b.max_batch_size * m.vocab_size * 8
    g = int(cfg.linears.get("layers.0.qkv", {}).get("group_size", 128))
    return MemoryEstimate(weight_bytes(m, algo, g) // parallel, kvb // parallel, act // parallel)


def format_table(cfg: EngineConfig, measured_weights: int | None = None) -> str:
    """Rows per quant_algo x KV dtype for cfg's model and limits (GiB); cfg's own row marked *."""
    gib = 1 << 30
    head = f"{'quant_algo':<38} {'kv':>5} {'weights':>9} {'kv cache':>9} {'activ.':>8} {'total':>8}"
    lines = [head, "-" * len(head)]
    rows = [
        (a, k)
        for a in ("None", "W8A16", "W4A16_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL")
        for k in ("fp16", "int8")
    ]
    own = (str(cfg.quant_algo), cfg.kv_storage)
    if own not in rows:
        rows.insert(0, own)
    for a, k in rows:
        e = estimate(cfg, None if a == "None" else a, k)
        mark = "*" if (a, k) == own else " "
        lines.append(
            f"{mark}{a:<37} {k:>5} {e.weights / gib:>9.3f} {e.kv_cache / gib:>9.3f} "
            f"{e.activations / gib:>8.3f} {e.total / gib:>8.3f}"
        )
    b = cfg.build
    lines.append(
        f"(GiB; max_batch_size {b.max_batch_size}, max_seq_len {cfg.max_seq_len}, max_num_tokens "
        f"{b.max_num_tokens}; * = this engine)"
    )
    if measured_weights is not None:
        lines.append(f"this engine's weight file: {measured_weights / gib:.3f} GiB")
    return "\n".join(lines)

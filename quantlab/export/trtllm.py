"""TensorRT-LLM checkpoint export: config.json + rank{N}.safetensors with tp/pp sharding.

Conventions (see docs/export.md): dequantization scales (w ~= (q - z) * s); rank r has
tp_rank = r % tp and pp_rank = r // tp; each pp rank numbers its layers from 0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import quantlab
from quantlab.adapters import ModelAdapter
from quantlab.attention import KV_FORMAT_KEY, KV_SCALE_KEY
from quantlab.calibrator import param
from quantlab.errors import InputError
from quantlab.export.mixed_gemm import GPTQ_ALGOS, gather_index, to_trtllm_gptq
from quantlab.formats import FP8_E4M3_MAX, QuantFormat
from quantlab.kernels.packing import pack_int4_rows
from quantlab.primitives import dequantize
from quantlab.state import ModuleState, QuantState

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QKV = "self_attn.qkv"

# (weight format, input format) -> quant_algo. Formats compared without scale_method.
_ALGOS: list[tuple[str, QuantFormat, QuantFormat | None]] = [
    ("W8A16", QuantFormat("int8", "channel"), None),
    ("W4A16", QuantFormat("int4", "channel"), None),
    ("FP8", QuantFormat("fp8_e4m3", "tensor"), QuantFormat("fp8_e4m3", "tensor")),
    (
        "FP8_PER_CHANNEL_PER_TOKEN",
        QuantFormat("fp8_e4m3", "channel"),
        QuantFormat("fp8_e4m3", "token"),
    ),
    # INT8 W8A8 (SmoothQuant). Per-channel weights + static activations use ModelOpt's flow, the
    # other three granularities TensorRT-LLM's SmoothQuant plugin flow (docs/smoothquant.md).
    ("W8A8_SQ_PER_CHANNEL", QuantFormat("int8", "channel"), QuantFormat("int8", "tensor")),
    ("W8A8_SQ_PER_TENSOR_PLUGIN", QuantFormat("int8", "tensor"), QuantFormat("int8", "tensor")),
    (
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
        QuantFormat("int8", "channel"),
        QuantFormat("int8", "token"),
    ),
    (
        "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
        QuantFormat("int8", "tensor"),
        QuantFormat("int8", "token"),
    ),
]
SQ_PLUGIN_ALGOS = (
    "W8A8_SQ_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
)


def _plain(f: QuantFormat | None) -> QuantFormat | None:
    return None if f is None else QuantFormat(f.dtype, f.granularity, f.group_size, f.symmetric)


def quant_algo_for(wf: QuantFormat | None, af: QuantFormat | None) -> str | None:
    """TensorRT-LLM quant_algo for a (weight, input) format pair; InputError when it has none."""
    if wf is None and af is None:
        return None
    if wf is not None and wf.dtype == "int4" and wf.granularity == "group" and af is None:
        return "W4A16_AWQ" if wf.symmetric else "W4A16_GPTQ"
    if wf is not None and wf.dtype == "int8" and wf.granularity == "group" and af is None:
        return "W8A16_GPTQ"
    for algo, w, a in _ALGOS:
        if _plain(wf) == w and _plain(af) == a:
            return algo
    got = f"weights {wf.describe() if wf else 'float'}, activations {af.describe() if af else 'float'}"
    raise InputError(
        f"The TensorRT-LLM checkpoint has no quant_algo for {got}. Exportable combinations: int8 "
        "per-channel sym weight-only (W8A16), int4 per-channel sym (W4A16), int4 group sym (W4A16_AWQ), "
        "int4 group asym (W4A16_GPTQ), int8 group sym or asym (W8A16_GPTQ), fp8 per-tensor weights + static per-tensor fp8 activations (FP8), "
        "fp8 per-channel weights + dynamic per-token fp8 activations (FP8_PER_CHANNEL_PER_TOKEN), "
        "int8 per-channel or per-tensor weights + static per-tensor or dynamic per-token int8 "
        "activations (W8A8_SQ_PER_CHANNEL, W8A8_SQ_PER_TENSOR_PLUGIN, "
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN, W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN)."
    )


@dataclass(frozen=True)
class ExportConfig:
    """Where and how to write the checkpoint."""

    output_dir: Path
    dtype: str = "float16"
    tp_size: int = 1
    pp_size: int = 1
    sm: int | None = None  # GPTQ weights in TensorRT-LLM's preprocessed layout for this SM
    trtllm: bool = True  # False: only HF-layout folders are written (no TensorRT-LLM padding rule)


@dataclass
class ExportPlan:
    """Everything checked before calibration: the quant_algo and the model dimensions."""

    quant_algo: str | None
    dims: dict[str, int]
    hf_config: dict[str, Any] = field(default_factory=dict)


def model_dims(config: Any) -> dict[str, int]:
    """The dimensions sharding depends on, from an HF config."""
    heads = int(config.num_attention_heads)
    return {
        "hidden": int(config.hidden_size),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "intermediate": int(config.intermediate_size),
        "vocab": int(config.vocab_size),
        "layers": int(config.num_hidden_layers),
    }


def linear_shapes(d: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(N, K) of each layer-relative linear of a Llama-family layer."""
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return {
        "self_attn.q_proj": (q, d["hidden"]),
        "self_attn.k_proj": (kv, d["hidden"]),
        "self_attn.v_proj": (kv, d["hidden"]),
        "self_attn.o_proj": (d["hidden"], q),
        "mlp.gate_proj": (d["intermediate"], d["hidden"]),
        "mlp.up_proj": (d["intermediate"], d["hidden"]),
        "mlp.down_proj": (d["hidden"], d["intermediate"]),
    }


WEIGHT_ONLY_ALGOS = ("W8A16", "W4A16", "W4A16_AWQ", "W4A16_GPTQ", "W8A16_GPTQ")


def weight_only_multiple(algo: str | None, wf: QuantFormat | None, tp: int) -> int | None:
    """The multiple TensorRT-LLM pads a weight-only linear's global N and K to (None: no padding).

    From its WeightOnlyQuantLinear (64 * tp) and WeightOnlyGroupwiseQuantLinear
    (max(64, group) * tp) in tensorrt_llm/quantization/layers.py.
    """
    if algo not in WEIGHT_ONLY_ALGOS or wf is None:
        return None
    g = wf.group_size if wf.granularity == "group" and wf.group_size else 0
    return max(64, g) * tp


def kv_head_copies(d: dict[str, int], tp: int) -> int:
    """How many times each KV head is repeated for tp (TensorRT-LLM's dup_kv_weight): 1 if tp <= KV heads."""
    return tp // d["kv_heads"] if tp > d["kv_heads"] else 1


def _shard_problems(
    d: dict[str, int],
    tp: int,
    pp: int,
    wf: QuantFormat | None,
    adapter: ModelAdapter,
    algo: str | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
    trtllm: bool = True,
) -> list[str]:
    shapes = shapes if shapes is not None else linear_shapes(d)
    probs = []
    for key, label in (
        ("heads", "num_attention_heads"),
        ("intermediate", "intermediate_size"),
        ("vocab", "vocab_size (lm_head rows)"),
    ):
        if d[key] % tp:
            probs.append(f"tp_size {tp} does not divide {label} = {d[key]}")
    # Fewer KV heads than ranks: TensorRT-LLM repeats each KV head tp / kv_heads times.
    if tp <= d["kv_heads"] and d["kv_heads"] % tp:
        probs.append(f"tp_size {tp} does not divide num_key_value_heads = {d['kv_heads']}")
    elif tp > d["kv_heads"] and tp % d["kv_heads"]:
        probs.append(
            f"tp_size {tp} is above num_key_value_heads = {d['kv_heads']} and not a multiple of "
            "it, so the KV heads cannot be repeated evenly across ranks"
        )
    if d["layers"] % pp:
        probs.append(f"pp_size {pp} does not divide num_hidden_layers = {d['layers']}")
    if wf is None:
        return probs
    mult = weight_only_multiple(algo, wf, tp) if trtllm else None
    if mult is not None:
        fused_n = (d["heads"] + 2 * d["kv_heads"] * kv_head_copies(d, tp)) * d["head_dim"]
        padded = {**shapes, "self_attn.qkv": (fused_n, d["hidden"])}
        for name in ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            if name not in padded or adapter.trtllm_architecture is None:
                continue
            n, k = padded[name]
            if n % mult or k % mult:
                probs.append(
                    f"TensorRT-LLM pads the weight-only layers.*.{name} (N = {n}, K = {k}) to "
                    f"multiples of {mult} at tp_size {tp}, and quantlab writes unpadded shards, "
                    "which its loader refuses"
                )
    g = wf.group_size if wf.granularity == "group" else None
    for name, (n, k) in shapes.items():
        row = name in adapter.row_parallel
        k_shard = k // tp if row else k
        n_shard = n if row else n // tp
        if g and k % g:
            probs.append(
                f"group size {g} does not divide the input dimension K = {k} of layers.*.{name}"
            )
        elif g and row and k % tp == 0 and k_shard % g:
            probs.append(
                f"with tp_size {tp}, the input dimension of layers.*.{name} splits into {k_shard} "
                f"per rank, which group size {g} does not divide"
            )
        if wf.bits == 4 and n % tp == 0 and n_shard % 2:
            probs.append(
                f"int4 packs two output rows a byte; layers.*.{name} has {n_shard} rows per rank"
            )
    return probs


def plan_export(
    hf_config: Any,
    adapter: ModelAdapter,
    wf: QuantFormat | None,
    af: QuantFormat | None,
    cfg: ExportConfig,
) -> ExportPlan:
    """Validate formats and tp/pp against the model before any calibration; InputError naming the fix."""
    if cfg.dtype not in DTYPES:
        raise InputError(f"export.dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}.")
    if cfg.tp_size < 1 or cfg.pp_size < 1:
        raise InputError("export.tp_size and export.pp_size must be >= 1.")
    algo = quant_algo_for(wf, af)
    d = model_dims(hf_config)
    shapes = adapter.shapes(hf_config)
    probs = _shard_problems(d, cfg.tp_size, cfg.pp_size, wf, adapter, algo, shapes, cfg.trtllm)
    if probs:
        valid_tp = [
            t
            for t in range(1, 65)
            if not _shard_problems(d, t, 1, wf, adapter, algo, shapes, cfg.trtllm)
        ]
        valid_pp = [p for p in range(1, d["layers"] + 1) if d["layers"] % p == 0]
        hint = f"Valid tp_size values for this model and format: {', '.join(map(str, valid_tp)) or 'none'}; valid pp_size values: {', '.join(map(str, valid_pp))}."
        if wf is not None and wf.granularity == "group":
            ks = sorted({k for _, k in shapes.values()})
            ok = [gs for gs in (32, 64, 128, 256) if all(k % gs == 0 for k in ks)]
            hint += f" Group sizes that divide every input dimension ({', '.join(map(str, ks))}): {', '.join(map(str, ok)) or 'none'}."
        raise InputError(
            f"Cannot export {adapter.trtllm_architecture or adapter.family} with tp_size={cfg.tp_size}, pp_size={cfg.pp_size}"
            f"{', ' + wf.describe() if wf else ''}: " + "; ".join(probs) + ". " + hint
        )
    if cfg.sm is not None and algo in GPTQ_ALGOS:
        _check_gptq_layout(d, cfg.tp_size, GPTQ_ALGOS[algo], cfg.sm, adapter)
    return ExportPlan(
        algo, d, hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    )


def _check_gptq_layout(
    d: dict[str, int], tp: int, bits: int, sm: int, adapter: ModelAdapter
) -> None:
    """Refuse shard shapes TensorRT-LLM's mixed-GEMM layout for `sm` cannot hold (before calibrating)."""
    copies = kv_head_copies(d, tp)
    for name, (n, k) in linear_shapes(d).items():
        row = name in adapter.row_parallel
        k_shard, n_shard = (k // tp, n) if row else (k, n // tp)
        if name in (adapter.k_proj, adapter.v_proj):
            continue
        if name in adapter.fused_groups[0]:  # q|k|v is one GEMM: its N is q + k + v per rank
            n_shard = (n + 2 * d["kv_heads"] * d["head_dim"] * copies) // tp
        try:
            gather_index(k_shard, n_shard, bits, sm)
        except InputError as exc:
            raise InputError(
                f"export.trtllm_sm {sm}: layers.*.{name} shards to [{n_shard}, {k_shard}] at "
                f"tp_size {tp}, which {exc} Use another tp_size, or leave export.trtllm_sm unset "
                "(quantlab's layout, which quantlab's engine reads but TensorRT-LLM does not)."
            ) from None


# One exported tensor: (value, axis split by column parallelism, axis split by row parallelism).
Part = tuple[torch.Tensor, int | None, int | None]


def linear_parts(
    lin: nn.Module, ms: ModuleState | None, algo: str | None, dtype: torch.dtype
) -> dict[str, Part]:
    """TensorRT-LLM tensors of one HF linear (unsharded) for quant_algo `algo`."""
    w = param(lin, "weight")
    parts: dict[str, Part] = {}
    bias = getattr(lin, "bias", None)
    if isinstance(bias, torch.Tensor):
        parts["bias"] = (bias.detach().to(dtype), 0, None)
    if ms is None or ms.weight_format is None or algo is None:
        parts["weight"] = (w.to(dtype), 0, 1)
        return parts
    q, s, z, fmt = (
        ms.tensors["qweight"],
        ms.tensors["weight_scale"],
        ms.tensors.get("weight_zero"),
        ms.weight_format,
    )
    if algo in ("W8A16", "W4A16"):
        # Portable: the dequantized weight in the model dtype + our scales; see docs/export.md.
        parts["weight"] = (dequantize(q, s, None, fmt, dtype), 0, 1)
        parts["per_channel_scale"] = (s.to(dtype), 0, None)
    elif algo == "W4A16_AWQ":
        parts["weight"] = (pack_int4_rows(q), 0, 1)
        parts["weights_scaling_factor"] = (s.to(dtype), 0, 1)
        pre = ms.tensors.get("pre_quant_scale", torch.ones(w.shape[1]))
        parts["prequant_scaling_factor"] = (pre.to(dtype), None, 0)
    elif algo == "W4A16_GPTQ":
        assert z is not None
        parts["weight"] = (pack_int4_rows((q.to(torch.int16) - 8).to(torch.int8)), 0, 1)
        parts["weights_scaling_factor"] = (s.t().contiguous().to(dtype), 1, 0)
        # TensorRT-LLM adds a per-group float after scaling signed codes: w = (u - 8) * s + (8 - z) * s.
        parts["zero"] = (((8.0 - z.float()) * s.float()).t().contiguous().to(dtype), 1, 0)
    elif algo == "W8A16_GPTQ":
        # Signed int8 codes [N, K]; asymmetric codes are stored as u - 128 plus a per-group float
        # zero (128 - z) * s, the int8 analogue of W4A16_GPTQ: w = (u - 128) * s + (128 - z) * s.
        offset = 0 if fmt.symmetric else 128
        parts["weight"] = ((q.to(torch.int16) - offset).to(torch.int8), 0, 1)
        parts["weights_scaling_factor"] = (s.t().contiguous().to(dtype), 1, 0)
        if z is not None:
            zero = ((128.0 - z.float()) * s.float()).t().contiguous()
            parts["zero"] = (zero.to(dtype), 1, 0)
    elif algo == "FP8":
        parts["weight"] = (q, 0, 1)
        parts["weights_scaling_factor"] = (s.float().reshape(1), None, None)
        parts["activation_scaling_factor"] = (
            ms.tensors["input_scale"].float().reshape(1),
            None,
            None,
        )
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        parts["weight"] = (q, 0, 1)
        parts["per_channel_scale"] = (s.float(), 0, None)
    elif algo == "W8A8_SQ_PER_CHANNEL":
        # ModelOpt flow: quantlab's SmoothQuant folds the smoothing into the norms / producers
        # (ones); a state from the modelopt step keeps ModelOpt's unfolded pre_quant_scale.
        parts["weight"] = (q, 0, 1)
        parts["weights_scaling_factor"] = (s.float().reshape(-1), 0, None)
        parts["activation_scaling_factor"] = (
            ms.tensors["input_scale"].float().reshape(1),
            None,
            None,
        )
        pre = ms.tensors.get("pre_quant_scale", torch.ones(w.shape[1]))
        parts["prequant_scaling_factor"] = (pre.to(dtype), None, 0)
    elif algo in SQ_PLUGIN_ALGOS:
        parts.update(sq_plugin_parts(q, s, ms, algo))
    else:  # pragma: no cover - quant_algo_for guards this
        raise AssertionError(algo)
    return parts


def _shard(t: torch.Tensor, axis: int | None, rank: int, size: int) -> torch.Tensor:
    if axis is None or size == 1:
        return t
    return t.chunk(size, dim=axis)[rank].contiguous()


def fuse_fp8_qkv(parts: list[dict[str, Part]]) -> list[dict[str, Part]]:
    """Re-quantize q/k/v FP8 weights to the max of their per-tensor scales (one GEMM, one scale)."""
    scales = [p["weights_scaling_factor"][0] for p in parts]
    smax = torch.stack(scales).amax(dim=0)
    out = []
    for p, s in zip(parts, scales, strict=True):
        if torch.equal(s, smax):
            out.append(p)
            continue
        w = (
            (p["weight"][0].float() * (s / smax))
            .clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
            .to(torch.float8_e4m3fn)
        )
        log.warning("fp8 q/k/v scales differ; re-quantized to the shared max scale for fusion")
        out.append({**p, "weight": (w, 0, 1), "weights_scaling_factor": (smax, None, None)})
    return out


# ---- INT8 SmoothQuant (W8A8_SQ_*): tensor layout of TensorRT-LLM's two flows -------------------
# Checked against TensorRT-LLM's sources (docs/smoothquant.md): the plugin flow's GEMM multiplies
# the int32 accumulator by act_scale (or the per-token scale) times per_channel_scale, so storing
# the activation and weight dequantization scales there computes x_q s_x * w_q s_w as simulated.


def sq_plugin_parts(
    q: torch.Tensor, s: torch.Tensor, ms: ModuleState, algo: str
) -> dict[str, Part]:
    """Plugin-flow tensors of one linear: int8 `weight` [N, K], `per_channel_scale` [1, N] or [1, 1]
    (weight dequantization scale), `act_scale` [1, 1] (activation dequantization scale, static only).
    """
    parts: dict[str, Part] = {"weight": (q, 0, 1)}
    if "PER_CHANNEL" in algo:
        parts["per_channel_scale"] = (s.float().reshape(1, -1), 1, None)
    else:
        parts["per_channel_scale"] = (s.float().reshape(1, 1), None, None)
    if "PER_TOKEN" not in algo:
        parts["act_scale"] = (ms.tensors["input_scale"].float().reshape(1, 1), None, None)
    return parts


def fuse_sq_qkv(parts: list[dict[str, Part]]) -> list[dict[str, Part]]:
    """q|k|v as one GEMM: per-tensor weight scales become per-column [1, N_i] (TensorRT-LLM always
    runs the fused qkv with per-channel scaling) and the three read one activation scale.
    """
    out = []
    for key in ("act_scale", "activation_scaling_factor"):
        if key in parts[0]:
            vals = torch.stack([p[key][0] for p in parts])
            if not bool((vals == vals[0]).all()):
                raise InputError(
                    f"q/k/v have different static activation scales ({vals.flatten().tolist()}); "
                    "they read one activation, which the fused qkv GEMM quantizes once."
                )
    for p in parts:
        s = p["per_channel_scale"][0] if "per_channel_scale" in p else None
        if s is not None and s.numel() == 1:
            n = p["weight"][0].shape[0]
            p = {**p, "per_channel_scale": (s.reshape(1, 1).expand(1, n).contiguous(), 1, None)}
        out.append(p)
    return out


def sq_plugin_layer_extras(
    layer: nn.Module,
    prefix: str,
    state: QuantState,
    adapter: ModelAdapter,
    algo: str,
    tp: int,
) -> dict[str, torch.Tensor]:
    """Per-layer tensors of the plugin flow, quantize side (q = x * scale): the norms' `scale_to_int`
    (1/s_x of q|k|v's and gate|up's input; 1.0 with per-token activations), attention's and mlp's
    `quantization_scaling_factor` (1/s_x of dense's and proj's input; static only), and a `smoother`
    [1, K / tp] of ones on dense and proj (the smoothing is folded into v_proj and up_proj).
    """
    names = adapter.trtllm_layer_names
    static = "PER_TOKEN" not in algo
    out: dict[str, torch.Tensor] = {}

    def inv_input_scale(linears: tuple[str, ...]) -> torch.Tensor | None:
        scales = [
            ms.tensors["input_scale"].float().reshape(1)
            for n in linears
            if (ms := state.modules.get(f"{prefix}.{n}")) is not None
            and "input_scale" in ms.tensors
        ]
        return 1.0 / torch.stack(scales).amax(dim=0) if scales else None

    for norm, members in adapter.smoothing_groups:
        inv = inv_input_scale(members) if static else torch.ones(1)
        if inv is not None:
            out[f"{names[norm]}.scale_to_int"] = inv
    for n in adapter.row_parallel:
        block = names[n].rpartition(".")[0]  # attention.dense -> attention, mlp.proj -> mlp
        inv = inv_input_scale((n,)) if static else None
        if inv is not None:
            out[f"{block}.quantization_scaling_factor"] = inv
        k = param(layer.get_submodule(n), "weight").shape[1]
        out[f"{names[n]}.smoother"] = torch.ones(1, k // tp)
    return out


# KV-cache format (KVCacheCalibrator's meta kv_format) -> kv_cache_quant_algo.
KV_ALGOS = {"int8": "INT8", "fp8": "FP8"}


def _attention(adapter: ModelAdapter) -> str:
    """Layer-relative name of the attention module (the parent of the K projection)."""
    return adapter.k_proj.rpartition(".")[0]


def kv_cache_quant_algo(state: QuantState, adapter: ModelAdapter, n_layers: int) -> str | None:
    """INT8 / FP8 when the state holds a KV-cache scale for every layer, None when it holds none.

    TensorRT-LLM applies one kv_cache_quant_algo to all layers: a scale missing on some layers, or
    formats that differ between layers, cannot be exported.
    """
    attn = _attention(adapter)
    fmts = []
    for i in range(n_layers):
        ms = state.modules.get(f"{adapter.layers}.{i}.{attn}")
        fmts.append(ms.meta.get(KV_FORMAT_KEY) if ms is not None else None)
    found = sorted({f for f in fmts if f is not None})
    if not found:
        return None
    missing = [i for i, f in enumerate(fmts) if f is None]
    if len(found) > 1 or missing:
        raise InputError(
            f"The TensorRT-LLM checkpoint quantizes the KV cache of every layer in one format, but "
            f"this state has KV formats {found} and no KV scale for layers {missing[:8]}. Run the "
            "kv_cache step once, over all layers (no runner.exclude of attention)."
        )
    return KV_ALGOS[found[0]]


def layer_tensors(
    layer: nn.Module,
    prefix: str,
    state: QuantState,
    adapter: ModelAdapter,
    algo: str | None,
    dtype: torch.dtype,
    tp_rank: int,
    tp: int,
    kv_heads: int | None = None,
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors for one tp rank, under TensorRT-LLM names relative to the layer.

    kv_heads: the model's KV head count; with tp above it each K/V head is repeated for the ranks.
    """
    kv_heads = kv_heads or tp
    names = adapter.trtllm_layer_names
    out: dict[str, torch.Tensor] = {}
    # TensorRT-LLM stores a (1 + w) norm (Gemma) as its full scale 1 + w.
    off = adapter.norm_offset
    norms = {n: names[n] for n in ("input_layernorm", "post_attention_layernorm")}
    for hf, trt in {**norms, **adapter.trtllm_extra_norms}.items():
        w = param(layer.get_submodule(hf), "weight")
        out[f"{trt}.weight"] = (w.float() + off).to(dtype) if off else w.to(dtype)

    def parts_of(n: str) -> dict[str, Part]:
        return linear_parts(layer.get_submodule(n), state.modules.get(f"{prefix}.{n}"), algo, dtype)

    qkv = [parts_of(n) for n in adapter.fused_groups[0]]
    copies = tp // kv_heads if tp > kv_heads else 1
    if copies > 1:  # K and V: each head repeated `copies` times, then split (dup_kv_weight)
        qkv = [qkv[0], *(_dup_kv(p, kv_heads, copies) for p in qkv[1:])]
    if algo == "FP8":
        qkv = fuse_fp8_qkv(qkv)
    if algo is not None and algo.startswith("W8A8_SQ"):
        qkv = fuse_sq_qkv(qkv)
    for key, (t0, col, _row) in qkv[0].items():
        if col is None:
            out[f"{names[QKV]}.{key}"] = t0
        else:
            out[f"{names[QKV]}.{key}"] = torch.cat(
                [_shard(p[key][0], col, tp_rank, tp) for p in qkv], dim=col
            )
    for n in adapter.linears:
        if n in adapter.fused_groups[0]:
            continue
        row = n in adapter.row_parallel
        for key, (t, col, rowax) in parts_of(n).items():
            out[f"{names[n]}.{key}"] = _shard(t, rowax if row else col, tp_rank, tp)
    if algo in SQ_PLUGIN_ALGOS:
        out.update(sq_plugin_layer_extras(layer, prefix, state, adapter, algo, tp))
    kv = state.modules.get(f"{prefix}.{_attention(adapter)}")
    if kv is not None and KV_SCALE_KEY in kv.tensors:
        # attention.kv_cache_scaling_factor [1] fp32, for K and V alike; every tp rank holds the
        # same value (heads are split across ranks, the scale is not).
        attn_name = names[QKV].rpartition(".")[0]
        out[f"{attn_name}.{KV_SCALE_KEY}"] = kv.tensors[KV_SCALE_KEY].float().reshape(1)
    return out


def _dup_kv(parts: dict[str, Part], heads: int, copies: int) -> dict[str, Part]:
    """K or V tensors with each of `heads` blocks along the column axis repeated `copies` times."""
    out: dict[str, Part] = {}
    for key, (t, col, row) in parts.items():
        if col is None:
            out[key] = (t, col, row)
            continue
        blocks = t.chunk(heads, dim=col)
        out[key] = (torch.cat([b for b in blocks for _ in range(copies)], dim=col), col, row)
    return out


def trtllm_config(
    plan: ExportPlan,
    adapter: ModelAdapter,
    cfg: ExportConfig,
    exclude: list[str],
    group_size: int | None,
    has_zero: bool,
    kv_algo: str | None = None,
) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    h, d = plan.hf_config, plan.dims
    rope = h.get("rope_parameters") or {}
    rope_theta = h.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_scaling = h.get("rope_scaling")
    if rope_scaling is None and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architecture": adapter.trtllm_architecture,
        "dtype": cfg.dtype,
        "logits_dtype": "float32",
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_size": d["head_dim"],
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": h.get("max_position_embeddings", 2048),
        "hidden_act": h.get("hidden_act", "silu"),
        "norm_epsilon": h.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope_theta,
        "rotary_scaling": rope_scaling,
        "share_embedding_table": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "bias": False,
        "mapping": {
            "world_size": cfg.tp_size * cfg.pp_size,
            "tp_size": cfg.tp_size,
            "pp_size": cfg.pp_size,
        },
        "quantization": {
            "quant_algo": plan.quant_algo,
            "kv_cache_quant_algo": kv_algo,
            "group_size": group_size if group_size is not None else 128,
            "has_zero_point": has_zero,
            "pre_quant_scale": plan.quant_algo == "W4A16_AWQ",
            "exclude_modules": exclude,
        },
        "producer": {"name": "quantlab", "version": quantlab.__version__},
        **{t: h[k] for k, t in adapter.trtllm_hf_config.items() if h.get(k) is not None},
        **(_layer_pattern(h) if adapter.trtllm_layer_pattern else {}),
        **adapter.trtllm_extra_config,
    }


def _layer_pattern(h: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's sliding/global layout as TensorRT-LLM's `_sliding_window_pattern` (every n-th
    layer is global), from HF's layer_types; empty for models with one kind of layer."""
    types = list(h.get("layer_types") or [])
    if len(set(types)) < 2 or "full_attention" not in types:
        return {}
    n = types.index("full_attention") + 1
    expect = [
        "full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(len(types))
    ]
    if types != expect:
        raise InputError(
            f"layer_types {types} is not 'every {n}-th layer global', the one layout TensorRT-LLM's "
            "Gemma checkpoint expresses (_sliding_window_pattern); export an HF layout instead."
        )
    return {"_sliding_window_pattern": n}


def write_trtllm_checkpoint(
    model: nn.Module,
    state: QuantState,
    adapter: ModelAdapter,
    plan: ExportPlan,
    cfg: ExportConfig,
    out_dir: Path,
    exclude: list[str],
) -> list[Path]:
    """Write config.json and rank{N}.safetensors into out_dir (which must exist); returns the rank files."""
    dtype = DTYPES[cfg.dtype]
    tp, pp = cfg.tp_size, cfg.pp_size
    n_layers = plan.dims["layers"]
    per_pp = n_layers // pp
    layers = model.get_submodule(adapter.layers)
    assert isinstance(layers, nn.ModuleList)
    wfmts = {ms.weight_format for ms in state.modules.values() if ms.weight_format is not None}
    wf = next(iter(wfmts)) if wfmts else None
    group = wf.group_size if wf is not None else None
    kv_algo = kv_cache_quant_algo(state, adapter, n_layers)
    conf = trtllm_config(
        plan, adapter, cfg, exclude, group, bool(wf and not wf.symmetric), kv_algo=kv_algo
    )
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2))
    files = []
    embed = param(model.get_submodule(adapter.embed), "weight").to(dtype)
    head = param(model.get_submodule(adapter.lm_head), "weight").to(dtype)
    if head.data_ptr() == embed.data_ptr():  # tied and already in the export dtype
        head = head.clone()
    norm = param(model.get_submodule(adapter.final_norm), "weight")
    norm = (norm.float() + adapter.norm_offset).to(dtype) if adapter.norm_offset else norm.to(dtype)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            t: dict[str, torch.Tensor] = {}
            if pp_rank == 0:
                t["transformer.vocab_embedding.weight"] = embed
            if pp_rank == pp - 1:
                t["transformer.ln_f.weight"] = norm
                t["lm_head.weight"] = _shard(head, 0, tp_rank, tp)
            for local, li in enumerate(range(pp_rank * per_pp, (pp_rank + 1) * per_pp)):
                lt = layer_tensors(
                    layers[li],
                    f"{adapter.layers}.{li}",
                    state,
                    adapter,
                    plan.quant_algo,
                    dtype,
                    tp_rank,
                    tp,
                    plan.dims["kv_heads"],
                )
                t.update({f"transformer.layers.{local}.{k}": v for k, v in lt.items()})
            if cfg.sm is not None and plan.quant_algo in GPTQ_ALGOS:
                bits = GPTQ_ALGOS[plan.quant_algo]
                for key in [
                    k for k, v in t.items() if k.endswith(".weight") and v.dtype == torch.int8
                ]:
                    t[key] = to_trtllm_gptq(t[key], bits, cfg.sm, dtype)
            path = out_dir / f"rank{tp_rank + pp_rank * tp}.safetensors"
            save_file({k: v.contiguous() for k, v in t.items()}, str(path))
            files.append(path)
    return files

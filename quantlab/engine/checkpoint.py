"""Read the TensorRT-LLM checkpoint quantlab exports (config.json + rank{N}.safetensors).

The engine consumes only this folder (and a tokenizer folder for text), never the float HF model:
it is a real consumer of the export, and every convention below is the exporter's
(quantlab/export/trtllm.py, docs/export.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from quantlab.engine.config import TORCH_DTYPES, ModelSpec
from quantlab.errors import InputError

# quant_algo values the engine runs (every one the exporter writes) and the architectures.
QUANT_ALGOS = (
    None,
    "W8A16",
    "W4A16",
    "W4A16_AWQ",
    "W4A16_GPTQ",
    "W8A16_GPTQ",
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
)
KV_ALGOS = (None, "INT8", "FP8")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Checkpoint:
    """A loaded checkpoint: its config.json and all tensors of its single rank."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    spec: ModelSpec

    @property
    def quant(self) -> dict[str, Any]:
        """The `quantization` section."""
        return dict(self.config.get("quantization") or {})

    def layer(self, i: int, name: str) -> dict[str, torch.Tensor]:
        """Tensors of transformer.layers.{i}.{name}.* keyed by the suffix (weight, bias, ...)."""
        prefix = f"transformer.layers.{i}.{name}."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _fail(path: Path, what: str) -> InputError:
    return InputError(f"Checkpoint {path}: {what}")


def model_spec(conf: dict[str, Any], path: Path) -> ModelSpec:
    """ModelSpec from a checkpoint config.json; InputError naming a missing or unsupported key."""
    arch = conf.get("architecture")
    if arch not in ARCHITECTURES:
        raise _fail(
            path,
            f"architecture {arch!r} has no engine decoder. The engine runs "
            f"{', '.join(ARCHITECTURES)} (the Llama family); other families need a decoder in "
            "quantlab/engine/model.py.",
        )
    need = (
        "dtype",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in need if k not in conf]
    if missing:
        raise _fail(
            path, f"config.json lacks {', '.join(missing)}; re-export it with quantlab run."
        )
    if conf["dtype"] not in TORCH_DTYPES:
        raise _fail(path, f"dtype {conf['dtype']!r} is not one of {', '.join(TORCH_DTYPES)}.")
    heads = int(conf["num_attention_heads"])
    scaling = conf.get("rotary_scaling")
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise _fail(
            path,
            f"rotary_scaling type {rtype!r} is not supported by the engine ({', '.join(ROPE_TYPES)}).",
        )
    if conf.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise _fail(path, "the engine supports position_embedding_type rope_gpt_neox only.")
    return ModelSpec(
        architecture=arch,
        dtype=conf["dtype"],
        vocab_size=int(conf["vocab_size"]),
        hidden_size=int(conf["hidden_size"]),
        num_layers=int(conf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(conf.get("num_key_value_heads") or heads),
        head_dim=int(conf.get("head_size") or int(conf["hidden_size"]) // heads),
        intermediate_size=int(conf["intermediate_size"]),
        norm_epsilon=float(conf.get("norm_epsilon", 1e-6)),
        rope_theta=float(conf.get("rotary_base", 10000.0)),
        rope_scaling=scaling if rtype != "default" else None,
        max_position_embeddings=int(conf.get("max_position_embeddings", 2048)),
    )


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, with the checks that need no tensors."""
    path = Path(path)
    cfile = path / "config.json"
    if not cfile.is_file():
        raise InputError(
            f"{path} is not a TensorRT-LLM checkpoint folder: it has no config.json. Pass the "
            "export.output_dir of a `quantlab run` (it holds config.json and rank0.safetensors)."
        )
    try:
        conf = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"config.json is not valid JSON ({e}).") from None
    q = conf.get("quantization") or {}
    if q.get("quant_algo") not in QUANT_ALGOS:
        raise _fail(
            path,
            f"quant_algo {q.get('quant_algo')!r} is unknown to the engine. It runs "
            f"{', '.join(str(a) for a in QUANT_ALGOS)}.",
        )
    if q.get("kv_cache_quant_algo") not in KV_ALGOS:
        raise _fail(
            path,
            f"kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r} is not one of INT8, FP8, null.",
        )
    mapping = conf.get("mapping") or {}
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    if tp * pp != 1:
        raise _fail(
            path,
            f"it is sharded for tp_size={tp}, pp_size={pp} ({tp * pp} devices); quantlab's engine "
            "runs on one device. Re-export with tp_size 1 and pp_size 1 (e.g. quantlab run "
            "RECIPE --set export.tp_size=1 --set export.pp_size=1).",
        )
    return conf


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and check a single-rank checkpoint; InputError for anything the engine cannot run."""
    path = Path(path)
    conf = read_config(path)
    spec = model_spec(conf, path)
    rank = path / "rank0.safetensors"
    if not rank.is_file():
        raise _fail(path, "rank0.safetensors is missing; the export did not finish.")
    try:
        tensors = load_file(str(rank))
    except (SafetensorError, OSError) as e:
        raise _fail(path, f"rank0.safetensors cannot be read ({e}); re-export it.") from None
    for name in ("transformer.vocab_embedding.weight", "transformer.ln_f.weight"):
        if name not in tensors:
            raise _fail(path, f"rank0.safetensors lacks {name}.")
    for i in range(spec.num_layers):
        if f"transformer.layers.{i}.attention.qkv.weight" not in tensors:
            raise _fail(path, f"rank0.safetensors lacks layer {i} (attention.qkv.weight).")
    _gptq_to_rows(path, conf, tensors)
    return Checkpoint(path, conf, tensors, spec)


def gptq_sm(path: Path) -> int | None:
    """The SM a quantlab run preprocessed its GPTQ weights for (export.trtllm_sm), else None."""
    state = path / "quantlab" / "quant_state.json"
    try:
        sm = json.loads(state.read_text())["recipe"]["export"].get("trtllm_sm")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return sm if isinstance(sm, int) else None


def _gptq_to_rows(path: Path, conf: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """GPTQ weights written in TensorRT-LLM's preprocessed layout (float-viewed) back to quantlab's
    row-packed codes, in place; the SM comes from the run's recorded export.trtllm_sm."""
    from quantlab.export.mixed_gemm import GPTQ_ALGOS, from_trtllm_gptq

    bits = GPTQ_ALGOS.get(str((conf.get("quantization") or {}).get("quant_algo")))
    keys = [
        k
        for k, v in tensors.items()
        if bits
        and k.endswith(".weight")
        and v.is_floating_point()
        and k.removesuffix("weight") + "weights_scaling_factor" in tensors
    ]
    if not keys:
        return
    sm = gptq_sm(path)
    if sm is None:
        raise _fail(
            path,
            "its GPTQ weights are in TensorRT-LLM's preprocessed layout for an unknown GPU "
            "(no quantlab/quant_state.json with export.trtllm_sm): quantlab cannot unpermute them. "
            "Re-export the run without export.trtllm_sm for quantlab's engine.",
        )
    assert bits is not None
    for k in keys:
        tensors[k] = from_trtllm_gptq(tensors[k], bits, sm)

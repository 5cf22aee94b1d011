"""ModelAdapter: what quantlab needs to know about a model family, as data keyed by HF architecture."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantlab.errors import InputError

if TYPE_CHECKING:  # `quantlab list` reads the table without importing torch
    from torch import nn

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class ModelAdapter:
    """Layout of a decoder-only model family and its TensorRT-LLM names (all names relative)."""

    family: str
    trtllm_architecture: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Quantizable linears inside one decoder layer, in execution order.
    linears: tuple[str, ...] = (*_ATTN, "self_attn.o_proj", *_MLP_IN, "mlp.down_proj")
    # (norm, linears it feeds): the smoothing groups SmoothQuant/AWQ fold scales into.
    smoothing_groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", _ATTN),
        ("post_attention_layernorm", _MLP_IN),
    )
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    # Linears a runtime fuses and that therefore must share per-tensor scales.
    fused_groups: tuple[tuple[str, ...], ...] = (_ATTN, _MLP_IN)
    # Layer-relative HF name -> TensorRT-LLM name. The q/k/v entry is fused (q | k | v along N).
    trtllm_layer_names: dict[str, str] = field(
        default_factory=lambda: {
            "input_layernorm": "input_layernorm",
            "post_attention_layernorm": "post_layernorm",
            "self_attn.qkv": "attention.qkv",
            "self_attn.o_proj": "attention.dense",
            "mlp.gate_proj": "mlp.fc",  # yes: TensorRT-LLM's fc is HF's gate
            "mlp.up_proj": "mlp.gate",  # and its gate is HF's up
            "mlp.down_proj": "mlp.proj",
        }
    )
    # Column-parallel linears split N across tp ranks; row-parallel ones split K.
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    trtllm_extra_config: dict[str, object] = field(default_factory=dict)

    @property
    def norm_fed(self) -> frozenset[str]:
        """The linears a smoothing group's norm feeds (a scale on their input folds into it)."""
        return frozenset(lin for _, group in self.smoothing_groups for lin in group)


ADAPTERS: dict[str, ModelAdapter] = {
    "LlamaForCausalLM": ModelAdapter("llama", "LlamaForCausalLM"),
    # Mistral's dense models are Llama-shaped; TensorRT-LLM builds them as Llama.
    "MistralForCausalLM": ModelAdapter("mistral", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ModelAdapter(
        "qwen2", "Qwen2ForCausalLM", trtllm_extra_config={"qwen_type": "qwen2"}
    ),
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter registered for model.config.architectures[0]; InputError if there is none."""
    archs = list(getattr(getattr(model, "config", None), "architectures", None) or [])
    return adapter_for_architectures(archs or [type(model).__name__])


def adapter_for_architectures(archs: list[str]) -> ModelAdapter:
    """The adapter of the first registered name in archs (config.json's architectures)."""
    for a in archs:
        if a in ADAPTERS:
            return ADAPTERS[a]
    name = (archs or ["(none)"])[0]
    close = difflib.get_close_matches(name, list(ADAPTERS), n=1, cutoff=0.0)
    raise InputError(
        f"quantlab has no model adapter for architecture {name!r}. Supported: "
        f"{', '.join(sorted(ADAPTERS))}; the closest by name is {close[0]}. If {name} has that "
        "family's layout, add a ModelAdapter entry for it in quantlab/adapters.py: docs/models.md "
        "(adding an architecture) shows how."
    )

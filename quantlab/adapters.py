"""ModelAdapter: what quantlab needs to know about a model family, as data keyed by HF architecture.

The table below is the whole of quantlab's architecture knowledge. Names are layer-relative module
paths; a name holding `{e}` is a per-expert template, expanded to one name per expert by
`resolve(config)` (MoE models are unfused into one nn.Linear per expert: quantlab.moe). Shapes of
every linear are symbolic (`dims`), so checkers can verify a folder from its config alone.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from quantlab.errors import InputError

if TYPE_CHECKING:  # `quantlab list` reads the table without importing torch
    from torch import nn

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_LINEARS = (*_ATTN, "self_attn.o_proj", *_MLP_IN, "mlp.down_proj")
_ATTN_DIMS = {
    "self_attn.q_proj": ("q", "h"),
    "self_attn.k_proj": ("kv", "h"),
    "self_attn.v_proj": ("kv", "h"),
    "self_attn.o_proj": ("h", "q"),
}
_LLAMA_DIMS = {
    **_ATTN_DIMS,
    "mlp.gate_proj": ("i", "h"),
    "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}
_LLAMA_TRTLLM = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_layernorm",
    "self_attn.qkv": "attention.qkv",
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",  # yes: TensorRT-LLM's fc is HF's gate
    "mlp.up_proj": "mlp.gate",  # and its gate is HF's up
    "mlp.down_proj": "mlp.proj",
}


@dataclass(frozen=True)
class Pair:
    """A producer whose output rows feed a consumer's input columns one to one (times a per-channel
    factor: attention probabilities for v -> o, act(gate) for up -> down), so a scale on those
    channels folds exactly. rows: "" every row of the producer; "v" the V rows of a fused q|k|v;
    "up" the second half of a fused gate|up; resolve() turns the key into (start, stop).
    """

    producer: str
    consumer: str
    rows: str | tuple[int, int] = ""

    def row_range(self, n_rows: int) -> tuple[int, int]:
        """(start, stop) of the producer rows that feed the consumer, for a producer of n_rows."""
        return self.rows if isinstance(self.rows, tuple) else (0, n_rows)


@dataclass(frozen=True)
class Experts:
    """A sparse MoE block: transformers' fused expert module and the per-expert linears it becomes.

    fused: the module holding gate_up_proj [E, 2I, H] and down_proj [E, H, I]; count: the config key
    of E; router: the float gate (never quantized); checkpoint: the per-expert names of the HF
    checkpoint for (gate, up, down), relative to the layer, with {e} for the expert index.
    """

    fused: str
    count: tuple[str, ...]  # config keys of E, first present wins (releases renamed them)
    router: str
    checkpoint: tuple[str, str, str]
    checkpoint_router: str = ""  # the router's checkpoint name where it differs (Mixtral's)


@dataclass(frozen=True)
class ModelAdapter:
    """Layout of a decoder-only model family and its TensorRT-LLM names (all names relative)."""

    family: str
    # None: TensorRT-LLM has no checkpoint layout quantlab writes for it; the HF-layout exports
    # (modelopt_hf, compressed_tensors) are the deployment path.
    trtllm_architecture: str | None
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Quantizable linears inside one decoder layer, in execution order.
    linears: tuple[str, ...] = _LLAMA_LINEARS
    # (norm, modules it feeds): the smoothing groups SmoothQuant/AWQ fold scales into. The first
    # member is observed (it must see every token of the group's input); members that are not in
    # `linears` (an MoE router) stay float but get the fold too, so the float output is unchanged.
    smoothing_groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", _ATTN),
        ("post_attention_layernorm", _MLP_IN),
    )
    # Producer -> consumer folds (AWQ, SmoothQuant, kv_equalize's V scale is the first one).
    pairs: tuple[Pair, ...] = (
        Pair("self_attn.v_proj", "self_attn.o_proj"),
        Pair("mlp.up_proj", "mlp.down_proj"),
    )
    # Where K and V come from; the HF-layout exports write the KV-cache scales under these names.
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    # Linears a runtime fuses and that therefore must share per-tensor scales.
    fused_groups: tuple[tuple[str, ...], ...] = (_ATTN, _MLP_IN)
    # Layer-relative HF name -> TensorRT-LLM name. The q/k/v entry is fused (q | k | v along N).
    trtllm_layer_names: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_TRTLLM))
    # Column-parallel linears split N across tp ranks; row-parallel ones split K.
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    trtllm_extra_config: dict[str, object] = field(default_factory=dict)
    # Per-layer float tensors besides the two norms: layer-relative HF module -> TensorRT-LLM name.
    trtllm_extra_norms: dict[str, str] = field(default_factory=dict)
    # config.json keys copied from the HF config when present: HF key -> TensorRT-LLM key.
    trtllm_hf_config: dict[str, str] = field(default_factory=dict)
    # Gemma 3: write HF's layer_types as TensorRT-LLM's `_sliding_window_pattern`.
    trtllm_layer_pattern: bool = False
    # Norms computing x_hat * (offset + w): Gemma's are (1 + w), which changes how scales fold.
    norm_offset: float = 0.0
    experts: Experts | None = None
    # False where ModelOpt's AWQ export keeps a pre_quant_scale on the norm-fed linears too (it
    # folds into the norms of layouts it recognises); quantlab's modelopt_hf folder then writes
    # ones there, so both tools' folders have the same tensors.
    modelopt_folds_norms: bool = True
    # (N, K) of each linear in symbols of the config: h hidden, q heads*d, kv kv_heads*d,
    # i intermediate, mi moe_intermediate, si shared_expert_intermediate; "a+b" sums.
    dims: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(_LLAMA_DIMS))
    # Modules never quantized (besides embeddings, norms and lm_head), for docs and `quantlab list`.
    float_modules: tuple[str, ...] = ()
    notes: str = ""

    @property
    def norm_fed(self) -> frozenset[str]:
        """The linears a smoothing group's norm feeds (a scale on their input folds into it)."""
        return frozenset(
            lin for _, group in self.smoothing_groups for lin in group if lin in self.linears
        )

    def resolve(self, config: Any) -> ModelAdapter:
        """This adapter for one model: expert templates expanded to E names, pair rows as ranges.

        config: a transformers config or config.json's dict (a multimodal config's text part).
        """
        cfg = _text_config(config)
        n_exp = 0
        if self.experts is not None:
            n_exp = next((int(v) for k in self.experts.count if (v := _get(cfg, k)) is not None), 0)
            if n_exp < 1:
                raise InputError(
                    f"{self.family}: the config names no expert count ({' or '.join(self.experts.count)})."
                )

        def expand(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(
                n.format(e=e) for n in names for e in (range(n_exp) if "{e}" in n else [0])
            )

        pairs = tuple(
            replace(p, producer=p.producer.format(e=e), consumer=p.consumer.format(e=e), rows=_rows(p.rows, cfg))
            for p in self.pairs
            for e in (range(n_exp) if "{e}" in p.producer else [0])
        )  # fmt: skip
        fused = tuple(
            tuple(n.format(e=e) for n in g)
            for g in self.fused_groups
            for e in (range(n_exp) if any("{e}" in n for n in g) else [0])
        )
        dims = {
            n.format(e=e): d
            for n, d in self.dims.items()
            for e in (range(n_exp) if "{e}" in n else [0])
        }
        return replace(
            self,
            linears=expand(self.linears),
            smoothing_groups=tuple((norm, expand(m)) for norm, m in self.smoothing_groups),
            pairs=pairs,
            fused_groups=fused,
            row_parallel=expand(self.row_parallel),
            dims=dims,
        )  # fmt: skip

    def shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """Layer-relative linear name -> (N, K) from the config (of a resolved adapter)."""
        sym = _symbols(_text_config(config))
        return {n: (_eval(d[0], sym), _eval(d[1], sym)) for n, d in self.dims.items()}

    def is_expert(self, name: str) -> bool:
        """True for a layer-relative name inside the sparse experts (after unfusing)."""
        return self.experts is not None and name.startswith(self.experts.fused + ".")

    def expert_groups(self) -> list[tuple[str, ...]]:
        """The fused groups of sparse experts (each expert's gate|up), of a resolved adapter."""
        return [g for g in self.fused_groups if self.is_expert(g[0])]

    def expert_peers(self, name: str) -> list[str]:
        """The same linear of every other expert (name an expert linear of a resolved adapter)."""
        if not self.is_expert(name):
            return []
        pat = re.sub(r"\\.\d+\\.", r"\\.\\d+\\.", re.escape(name), count=1)
        return [n for n in self.linears if n != name and re.fullmatch(pat, n)]

    def _renames(self) -> list[tuple[str, str]]:
        """(in-memory, checkpoint) name pieces, {e} for the expert index; empty for dense models."""
        ex = self.experts
        if ex is None:
            return []
        kinds = ("gate_proj", "up_proj", "down_proj")
        out = [(f"{ex.fused}.{{e}}.{k}", c) for k, c in zip(kinds, ex.checkpoint, strict=True)]
        if ex.checkpoint_router:
            out.append((ex.router, ex.checkpoint_router))
        return out

    @staticmethod
    def _rename(name: str, pairs: list[tuple[str, str]]) -> str:
        for src, dst in pairs:
            pat = re.escape(src).replace(re.escape("{e}"), r"(\d+)")
            m = re.search(r"(?:^|\.)" + pat + r"(?=\.|$)", name)
            if m:
                start = m.start() + (name[m.start()] == ".")
                e = m.group(1) if m.groups() else ""
                return name[:start] + dst.format(e=e) + name[m.end() :]
        return name

    def checkpoint_name(self, name: str) -> str:
        """The HF checkpoint's name of an in-memory module or tensor name (differs only for MoE
        experts, which quantlab unfuses, and Mixtral's router)."""
        return self._rename(name, self._renames())

    def memory_name(self, name: str) -> str:
        """The inverse of checkpoint_name."""
        return self._rename(name, [(d, s) for s, d in self._renames()])


def _text_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _symbols(cfg: Any) -> dict[str, int]:
    h, heads = int(_get(cfg, "hidden_size")), int(_get(cfg, "num_attention_heads"))
    kv = int(_get(cfg, "num_key_value_heads") or heads)
    d = int(_get(cfg, "head_dim") or h // heads)
    return {
        "h": h,
        "q": heads * d,
        "kv": kv * d,
        "i": int(_get(cfg, "intermediate_size") or 0),
        "mi": int(_get(cfg, "moe_intermediate_size") or 0),
        "si": int(_get(cfg, "shared_expert_intermediate_size") or 0),
    }


def _eval(expr: str, sym: dict[str, int]) -> int:
    total = 0
    for term in expr.split("+"):
        k, _, v = term.strip().rpartition("*")
        total += (int(k) if k else 1) * sym[v]
    return total


def _rows(key: str | tuple[int, int], cfg: Any) -> str | tuple[int, int]:
    """A Pair's rows key as a (start, stop) range of the producer's output rows."""
    if not isinstance(key, str) or not key:
        return key
    s = _symbols(cfg)
    if key == "v":
        return (s["q"] + s["kv"], s["q"] + 2 * s["kv"])
    if key == "up":
        return (s["i"], 2 * s["i"])
    raise ValueError(f"unknown Pair rows key {key!r}")


_GEMMA_GROUPS = (("input_layernorm", _ATTN), ("pre_feedforward_layernorm", _MLP_IN))
# TensorRT-LLM's Gemma checkpoint (tensorrt_llm/models/gemma): Llama's names plus the sandwich
# norms, every norm stored as 1 + w, gelu (tanh), the attention scalars and softcapping.
_GEMMA_NORMS = {
    "pre_feedforward_layernorm": "pre_feedforward_layernorm",
    "post_feedforward_layernorm": "post_feedforward_layernorm",
}
_GEMMA_HF = {
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "final_logit_softcapping": "final_logit_softcapping",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "sliding_window": "sliding_window",
    "rope_local_base_freq": "rope_local_base_freq",
}
_QK_TRTLLM = {
    "self_attn.q_norm": "attention.q_layernorm",
    "self_attn.k_norm": "attention.k_layernorm",
}
_GEMMA_EXTRA = {"hidden_act": "gelu", "inter_layernorms": True, "attn_bias": False}
_GEMMA_TRTLLM = {**_LLAMA_TRTLLM, "pre_feedforward_layernorm": "pre_feedforward_layernorm"}
_GEMMA_NOTES = (
    "(1 + w) RMSNorms (folds divide 1 + w); sandwich norms around attention and MLP; embeddings "
    "scaled by sqrt(hidden); tied lm_head; query_pre_attn_scalar, softcapping and sliding layers "
    "stay in the HF attention quantlab calibrates and evaluates through."
)
_PHI3_ATTN = ("self_attn.qkv_proj",)
_EXPERT = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
_EXPERT_DIMS = {
    "mlp.experts.{e}.gate_proj": ("i", "h"),
    "mlp.experts.{e}.up_proj": ("i", "h"),
    "mlp.experts.{e}.down_proj": ("h", "i"),
}
_EXPERT_PAIR = Pair("mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
_SHARED = (
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
)


ADAPTERS: dict[str, ModelAdapter] = {
    "LlamaForCausalLM": ModelAdapter(
        "llama",
        "LlamaForCausalLM",
        notes="Llama 3.x: rope_scaling (llama3) and tied embeddings (3.2) are config, read by the "
        "HF model and written into the TensorRT-LLM config.",
    ),
    # Mistral's dense models are Llama-shaped; TensorRT-LLM builds them as Llama.
    "MistralForCausalLM": ModelAdapter("mistral", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ModelAdapter(
        "qwen2", "Qwen2ForCausalLM", trtllm_extra_config={"qwen_type": "qwen2"}
    ),
    "Qwen3ForCausalLM": ModelAdapter(
        "qwen3",
        "Qwen3ForCausalLM",
        trtllm_extra_config={"qwen_type": "qwen3", "attn_bias": False},
        trtllm_extra_norms=_QK_TRTLLM,
        notes="q/k RMSNorms after q_proj/k_proj: K is observed for the KV cache after k_norm and "
        "rope; only V is rescaled by kv_equalize.",
    ),
    "Gemma2ForCausalLM": ModelAdapter(
        "gemma2",
        "Gemma2ForCausalLM",
        trtllm_extra_config=_GEMMA_EXTRA,
        trtllm_extra_norms=_GEMMA_NORMS,
        trtllm_hf_config=_GEMMA_HF,
        trtllm_layer_names=_GEMMA_TRTLLM,
        smoothing_groups=_GEMMA_GROUPS,
        norm_offset=1.0,
        notes=_GEMMA_NOTES,
    ),
    "Gemma3ForCausalLM": ModelAdapter(
        "gemma3",
        "Gemma3ForCausalLM",
        trtllm_extra_config={**_GEMMA_EXTRA, "qk_layernorm": True},
        trtllm_extra_norms={**_GEMMA_NORMS, **_QK_TRTLLM},
        trtllm_hf_config=_GEMMA_HF,
        trtllm_layer_pattern=True,
        trtllm_layer_names=_GEMMA_TRTLLM,
        smoothing_groups=_GEMMA_GROUPS,
        norm_offset=1.0,
        notes=_GEMMA_NOTES + " q/k norms as Qwen3 (also (1 + w)).",
    ),
    "Phi3ForCausalLM": ModelAdapter(
        "phi3",
        None,
        linears=(*_PHI3_ATTN, "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        smoothing_groups=(
            ("input_layernorm", _PHI3_ATTN),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        pairs=(
            Pair("self_attn.qkv_proj", "self_attn.o_proj", "v"),
            Pair("mlp.gate_up_proj", "mlp.down_proj", "up"),
        ),
        # No k_proj / v_proj modules: these are the names ModelOpt 0.47 writes Phi-3's KV-cache
        # scales under (self_attn.k_proj.k_scale / v_proj.v_scale), which servers look up.
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        fused_groups=(_PHI3_ATTN, ("mlp.gate_up_proj",)),
        modelopt_folds_norms=False,
        dims={
            "self_attn.qkv_proj": ("q+2*kv", "h"),
            "self_attn.o_proj": ("h", "q"),
            "mlp.gate_up_proj": ("2*i", "h"),
            "mlp.down_proj": ("h", "i"),
        },
        notes="q|k|v and gate|up are single linears in the checkpoint (fused, one scale each); "
        "the v -> o and up -> down folds act on their V rows and up half.",
    ),
    "MixtralForCausalLM": ModelAdapter(
        "mixtral",
        None,
        linears=(*_ATTN, "self_attn.o_proj", *_EXPERT),
        smoothing_groups=(
            ("input_layernorm", _ATTN),
            ("post_attention_layernorm", ("mlp.gate", *_EXPERT[:2])),
        ),
        pairs=(Pair("self_attn.v_proj", "self_attn.o_proj"), _EXPERT_PAIR),
        fused_groups=(_ATTN, _EXPERT[:2]),
        row_parallel=("self_attn.o_proj", _EXPERT[2]),
        experts=Experts(
            "mlp.experts",
            ("num_local_experts", "num_experts"),
            "mlp.gate",
            (
                "block_sparse_moe.experts.{e}.w1",
                "block_sparse_moe.experts.{e}.w3",
                "block_sparse_moe.experts.{e}.w2",
            ),
            "block_sparse_moe.gate",
        ),
        dims={**_ATTN_DIMS, **_EXPERT_DIMS},
        float_modules=("mlp.gate",),
        notes="Sparse experts unfused into one linear each and calibrated on the tokens routed "
        "to them; the router stays float (it gets the post-attention norm's smoothing fold).",
    ),
    "Qwen2MoeForCausalLM": ModelAdapter(
        "qwen2_moe",
        None,
        linears=(*_ATTN, "self_attn.o_proj", *_SHARED, *_EXPERT),
        smoothing_groups=(
            ("input_layernorm", _ATTN),
            (
                "post_attention_layernorm",
                ("mlp.gate", "mlp.shared_expert_gate", *_SHARED[:2], *_EXPERT[:2]),
            ),
        ),
        pairs=(
            Pair("self_attn.v_proj", "self_attn.o_proj"),
            Pair(_SHARED[1], _SHARED[2]),
            _EXPERT_PAIR,
        ),
        fused_groups=(_ATTN, _SHARED[:2], _EXPERT[:2]),
        row_parallel=("self_attn.o_proj", _SHARED[2], _EXPERT[2]),
        experts=Experts(
            "mlp.experts",
            ("num_experts", "num_local_experts"),
            "mlp.gate",
            ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
        ),
        dims={
            **_ATTN_DIMS,
            _SHARED[0]: ("si", "h"),
            _SHARED[1]: ("si", "h"),
            _SHARED[2]: ("h", "si"),
            **{
                n: (k.replace("i", "mi"), m.replace("i", "mi"))
                for n, (k, m) in _EXPERT_DIMS.items()
            },
        },
        float_modules=("mlp.gate", "mlp.shared_expert_gate"),
        notes="As Mixtral, plus an always-on shared expert (quantized) behind a float sigmoid gate.",
    ),
}
# Qwen3-MoE: Qwen3's attention (q/k norms) with Qwen2-MoE's experts, no shared expert.
ADAPTERS["Qwen3MoeForCausalLM"] = replace(
    ADAPTERS["MixtralForCausalLM"],
    family="qwen3_moe",
    experts=ADAPTERS["Qwen2MoeForCausalLM"].experts,
    dims={**_ATTN_DIMS, **{n: (k.replace("i", "mi"), m.replace("i", "mi")) for n, (k, m) in _EXPERT_DIMS.items()}},
    notes="Qwen3's q/k norms with sparse experts (no shared expert); experts as Mixtral's.",
)  # fmt: skip


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter registered for model.config.architectures[0], resolved for model.config;
    InputError if there is none."""
    config = getattr(model, "config", None)
    archs = list(getattr(config, "architectures", None) or [])
    adapter = adapter_for_architectures(archs or [type(model).__name__])
    return adapter.resolve(config) if config is not None else adapter


def adapter_for_config(conf: Mapping[str, Any]) -> ModelAdapter:
    """The resolved adapter of a config.json dict (its `architectures`)."""
    return adapter_for_architectures(list(conf.get("architectures") or [])).resolve(conf)


def adapter_for_architectures(archs: list[str]) -> ModelAdapter:
    """The adapter of the first registered name in archs (config.json's architectures), unresolved."""
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

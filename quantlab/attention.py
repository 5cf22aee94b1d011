"""KV-cache quantization inside attention, through transformers' public AttentionInterface.

A Hugging Face attention module (Llama, Qwen2, Mistral, ...) projects q, k and v, applies the
rotary embedding, and then calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module,
query, key, value, attention_mask, ...)`. The key it passes is [B, H_kv, L, D] *after* rotary and
*before* GQA's repeat_kv: exactly the tensor a runtime writes into its KV cache. quantlab registers
one wrapper per underlying implementation, named `quantlab_kv_<impl>` (e.g. `quantlab_kv_sdpa`),
registered together with that implementation's mask function so the model builds the same mask.
The wrapper

  1. passes (key, value) to a recorder while `record_kv` is active (calibration),
  2. fake-quantizes key and value with the module's KVCacheSpec (`set_kv_quant`): one per-tensor
     scale shared by K and V, as TensorRT-LLM's `kv_cache_scaling_factor`,
  3. calls the underlying implementation.

A module without a spec gets the underlying implementation's output bit for bit, so switching a
whole model to the wrapper is safe. The switch lives on the model's config object: a deep copy of
a model has its own config, so quantizing the copy leaves the original's attention untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quantlab.errors import InputError, QuantlabError
from quantlab.formats import QuantFormat
from quantlab.primitives import fake_quant_static

KVFormat = Literal["int8", "fp8"]
KV_FORMATS: tuple[str, ...] = ("int8", "fp8")
# ModuleState keys of a KV-cache result (meta kv_format + tensor kv_cache_scaling_factor).
KV_FORMAT_KEY = "kv_format"
KV_SCALE_KEY = "kv_cache_scaling_factor"

_PREFIX = "quantlab_kv_"
_SPEC_ATTR = "quantlab_kv_spec"
_RECORDER_ATTR = "quantlab_kv_recorder"

Recorder = Callable[[str, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class KVCacheSpec:
    """How one attention module's K and V are stored: format and the one scale a runtime uses for both.

    scale: [1] float32 dequantization scale (x ~= q * scale), TensorRT-LLM's kv_cache_scaling_factor.
    """

    format: KVFormat
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise InputError(
                f"KV-cache format {self.format!r} is not one of {', '.join(KV_FORMATS)}."
            )
        if self.scale.numel() != 1 or not bool(self.scale.float().gt(0).all()):
            raise InputError(
                f"KV-cache scale must be one positive number, got {self.scale.tolist()}."
            )

    @property
    def quant_format(self) -> QuantFormat:
        """The per-tensor QuantFormat K and V are stored in."""
        return QuantFormat("int8" if self.format == "int8" else "fp8_e4m3", "tensor")


def fake_quant_kv(x: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """x (a key or value tensor, any shape) stored at spec and read back; same dtype as x.

    INT8 rounds half to even and saturates to [-128, 127]; FP8 saturates to +-448 before the cast:
    the conversions a runtime's KV-cache write performs (cvt.rni.sat / satfinite).
    """
    return fake_quant_static(x, spec.scale.to(x.device), spec.quant_format)


def set_kv_quant(attn: nn.Module, spec: KVCacheSpec) -> None:
    """Quantize attn's K and V at spec from now on, and route attn's model through the wrapper."""
    for config in _configs(attn):
        _activate(config)
    setattr(attn, _SPEC_ATTR, spec)


def clear_kv_quant(attn: nn.Module) -> None:
    """Stop quantizing attn's K and V (the wrapper stays active and then changes nothing)."""
    if hasattr(attn, _SPEC_ATTR):
        delattr(attn, _SPEC_ATTR)


def kv_spec(attn: nn.Module) -> KVCacheSpec | None:
    """The KVCacheSpec set on attn, if any."""
    spec = getattr(attn, _SPEC_ATTR, None)
    return spec if isinstance(spec, KVCacheSpec) else None


def install_kv_attention(model: nn.Module) -> None:
    """Route every attention call of model through the wrapper (a no-op for modules without a spec)."""
    configs = _configs(model)
    if not configs:
        raise InputError(
            f"{type(model).__name__} holds no transformers config; KV-cache quantization works on "
            "Hugging Face models whose attention goes through transformers' AttentionInterface."
        )
    for config in configs:
        _activate(config)


def kv_attention_active(model: nn.Module) -> bool:
    """True when model's attention calls go through the wrapper."""
    configs = _configs(model)
    return bool(configs) and all(_impl(c).startswith(_PREFIX) for c in configs)


@contextmanager
def record_kv(layer: nn.Module, callback: Recorder) -> Iterator[None]:
    """While active, each attention call of a module inside layer calls callback(name, key, value).

    name is the module's name relative to layer (e.g. "self_attn"); key [B, H_kv, L, D] is after the
    rotary embedding, value [B, H_kv, L, D]; both before any KV quantization. The model is switched
    to the wrapper and stays switched afterwards (modules without a spec compute exactly what they
    did), so a KV spec set on another layer meanwhile is never switched off again.
    """
    configs = _configs(layer)
    if not configs:
        raise InputError(
            f"{type(layer).__name__} holds no attention module with a transformers config; cannot "
            "observe its keys and values."
        )
    for c in configs:
        _activate(c)
    modules = list(layer.named_modules())
    try:
        for name, m in modules:
            setattr(m, _RECORDER_ATTR, _bind(callback, name))
        yield
    finally:
        for _, m in modules:
            if hasattr(m, _RECORDER_ATTR):
                delattr(m, _RECORDER_ATTR)


def _bind(callback: Recorder, name: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def record(key: torch.Tensor, value: torch.Tensor) -> None:
        callback(name, key, value)

    return record


def _configs(root: nn.Module) -> list[PretrainedConfig]:
    """The distinct transformers configs held by root and its submodules (attention modules hold one)."""
    seen: dict[int, PretrainedConfig] = {}
    for m in root.modules():
        c = getattr(m, "config", None)
        if isinstance(c, PretrainedConfig):
            seen.setdefault(id(c), c)
    return list(seen.values())


def _impl(config: PretrainedConfig) -> str:
    # transformers treats an unset implementation as eager (AttentionInterface.get_interface).
    return str(getattr(config, "_attn_implementation", None) or "eager")


def _activate(config: PretrainedConfig) -> None:
    """Switch config to the wrapper of its current implementation (nothing when already switched)."""
    inner = _impl(config)
    if not inner.startswith(_PREFIX):
        config._attn_implementation = _register(inner)


def _register(inner: str) -> str:
    """Register (once) the wrapper around implementation `inner`; its name."""
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS:
        raise InputError(
            f"Attention implementation {inner!r} is not registered in transformers' "
            "AttentionInterface; quantlab wraps eager, sdpa or any registered implementation."
        )
    name = _PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def kv_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        record = getattr(module, _RECORDER_ATTR, None)
        if record is not None:
            record(key, value)
        spec = getattr(module, _SPEC_ATTR, None)
        if spec is not None:
            key, value = fake_quant_kv(key, spec), fake_quant_kv(value, spec)
        return _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, kv_attention)
    # The model builds its mask from the implementation name: give the wrapper the inner one's
    # (sdpa: boolean or None for pure causal; eager: additive float), so both see the same mask.
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def _inner_function(module: nn.Module, inner: str) -> Callable[..., Any]:
    if inner != "eager":
        return ALL_ATTENTION_FUNCTIONS[inner]  # type: ignore[no-any-return]
    # Eager attention is each modeling file's own `eager_attention_forward` (the default the
    # module passes to get_interface), not an entry of the registry.
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise QuantlabError(
            f"{type(module).__name__} runs eager attention but its module "
            f"{type(module).__module__} has no eager_attention_forward; load the model with "
            "attn_implementation='sdpa' to quantize its KV cache."
        )
    return fn  # type: ignore[no-any-return]

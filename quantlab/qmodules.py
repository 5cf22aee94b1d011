"""Simulated quantized modules for evaluation in torch, built from a QuantState."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.attention import KV_FORMAT_KEY, KV_SCALE_KEY, KVCacheSpec, set_kv_quant
from quantlab.formats import QuantFormat
from quantlab.primitives import dequantize, fake_quant, fake_quant_static
from quantlab.state import ModuleState, QuantState


class QuantLinear(nn.Module):
    """A Linear whose weight is the dequantized codes of a ModuleState and whose input is fake-quantized.

    x [..., K] (model dtype) -> y [..., N]. The weight is materialized once in the model dtype, so
    evaluation measures exactly the stored codes and scales.
    """

    def __init__(self, linear: nn.Linear, ms: ModuleState) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        w = linear.weight.detach()
        if ms.weight_format is not None and "qweight" in ms.tensors:
            zero = ms.tensors.get("weight_zero")
            w = dequantize(
                ms.tensors["qweight"].to(w.device),
                ms.tensors["weight_scale"].to(w.device),
                None if zero is None else zero.to(w.device),
                ms.weight_format,
                dtype,
            )
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = linear.bias
        self.input_format: QuantFormat | None = ms.input_format
        scale = ms.tensors.get("input_scale")
        self.register_buffer("input_scale", None if scale is None else scale.float().to(w.device))
        # An unfolded smoothing scale [K] the runtime multiplies the input by (ModelOpt's AWQ and
        # SmoothQuant keep one where no producer can absorb it).
        pre = ms.tensors.get("pre_quant_scale")
        self.register_buffer("pre_quant_scale", None if pre is None else pre.to(w.device, dtype))
        self.weight_format = ms.weight_format

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize an activation x [..., K] as the runtime would (static or per-token)."""
        fmt = self.input_format
        if fmt is None:
            return x
        if fmt.granularity == "token":
            return fake_quant(x, fmt, "activation")
        scale = self.input_scale
        assert isinstance(scale, torch.Tensor), "static activation format without input_scale"
        return fake_quant_static(x, scale, fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] = quantize_input(x [..., K] * pre_quant_scale) @ W^T + b."""
        pre = self.pre_quant_scale
        if isinstance(pre, torch.Tensor):
            x = x * pre
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_format.describe() if self.weight_format else "float"
        a = self.input_format.describe() if self.input_format else "float"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, input={a}"


def apply_module_states(root: nn.Module, states: dict[str, ModuleState]) -> int:
    """Replace each nn.Linear named in states (names relative to root) by a QuantLinear and set the
    KV-cache spec of each attention module with one; returns the count of modules changed."""
    n = 0
    for name, ms in states.items():
        if KV_FORMAT_KEY in ms.meta:
            set_kv_quant(root.get_submodule(name), kv_spec_of(ms))
            n += 1
        if ms.weight_format is None and ms.input_format is None:
            continue
        mod = root.get_submodule(name)
        if isinstance(mod, QuantLinear):
            mod = _as_linear(mod)
        if not isinstance(mod, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, QuantLinear(mod, ms))
        n += 1
    return n


def kv_spec_of(ms: ModuleState) -> KVCacheSpec:
    """The KVCacheSpec a KV-cache ModuleState (meta kv_format, tensor kv_cache_scaling_factor) describes."""
    return KVCacheSpec(ms.meta[KV_FORMAT_KEY], ms.tensors[KV_SCALE_KEY].float().reshape(1))


def _as_linear(q: QuantLinear) -> nn.Linear:
    lin = nn.Linear(
        q.in_features,
        q.out_features,
        bias=q.bias is not None,
        device=q.weight.device,
        dtype=q.weight.dtype,
    )
    lin.weight = q.weight
    lin.bias = q.bias
    return lin


def apply_state(model: nn.Module, state: QuantState) -> int:
    """Replace every quantized Linear of model listed in state (full names); returns the count."""
    return apply_module_states(model, state.modules)

"""compressed-tensors export: the HF-layout checkpoint vLLM and transformers load, written by the library.

The QuantState's linears go through compressed-tensors' own ModelCompressor: quantlab attaches a
QuantizationScheme to each quantized nn.Linear (weights, and for W8A8 / FP8 the input
activations: static per-tensor with quantlab's `input_scale`, or dynamic per-token), sets the
float weight to the dequantized codes and the library's `weight_scale` / `weight_zero_point` to
quantlab's scales and zero points (zero points moved to the library's signed code range:
z_ct = z - 2^(bits-1)), and lets the library quantize (which reproduces quantlab's codes exactly)
and compress: `pack-quantized` (int4/int8 weight-only), `int-quantized` (W8A8 INT8),
`float-quantized` (FP8). Everything not quantized (the embedding, norms, lm_head, excluded
linears) is saved as plain tensors and listed in `ignore`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.attention import KV_SCALE_KEY
from quantlab.errors import InputError
from quantlab.formats import QuantFormat
from quantlab.primitives import dequantize
from quantlab.state import QuantState

log = logging.getLogger(__name__)


def _weight_problem(wf: QuantFormat | None, af: QuantFormat | None) -> str | None:
    """Why a (weight, input) format pair has no compressed-tensors scheme here (None: it has)."""
    if wf is None:
        return "activations without weight quantization are not written" if af else None
    if wf.dtype == "fp8_e4m3":
        if af is not None and af.dtype != "fp8_e4m3":
            return f"fp8 weights with {af.describe()} activations have no compressed-tensors scheme"
        return None
    if af is not None and af.dtype != "int8":
        return f"{wf.describe()} weights with {af.describe()} activations are not written"
    if af is not None and (wf.dtype != "int8" or wf.granularity == "group"):
        return f"W8A8 needs int8 per-channel or per-tensor weights, got {wf.describe()}"
    if af is None and wf.granularity not in ("group", "channel"):
        return f"weight-only {wf.describe()} is not written; use per-channel or group scales"
    if not wf.symmetric:
        return (
            "asymmetric weights: compressed-tensors 0.20 packs the zero points when it writes "
            "them but builds the unpacked shape when transformers 5 loads the folder, so the "
            "load fails; use symmetric weights or the trtllm format"
        )
    return None


def planned_problem(wf: QuantFormat | None, af: QuantFormat | None, kv_cache: bool) -> str | None:
    """Why the planned formats cannot be written as compressed-tensors (None: they can)."""
    why = _weight_problem(wf, af)
    if why:
        return why
    if kv_cache:
        return "a KV-cache step: this exporter does not write KV-cache scales yet"
    return None


def supported(state: QuantState) -> str | None:
    """None when compressed-tensors can express the state's formats, else why not."""
    for name, ms in state.modules.items():
        why = _weight_problem(ms.weight_format, ms.input_format)
        if why:
            return f"{name}: {why}"
        if "pre_quant_scale" in ms.tensors:
            return (
                f"{name} keeps an unfolded pre_quant_scale, which compressed-tensors cannot carry"
            )
    # GPTQ act-order keeps groups as contiguous input columns (static groups): no g_idx needed.
    kv = [n for n, ms in state.modules.items() if KV_SCALE_KEY in ms.tensors]
    if kv:
        return f"{kv[0]} has a KV-cache scale, which this exporter does not write"
    return None


_STRATEGY = {"group": "group", "channel": "channel", "tensor": "tensor", "token": "token"}


def _args(fmt: QuantFormat, dynamic: bool = False) -> Any:
    """The library's QuantizationArgs of a quantlab format (weights, or activations)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=fmt.bits,
        type="float" if fmt.dtype == "fp8_e4m3" else "int",
        symmetric=fmt.symmetric,
        strategy=_STRATEGY[fmt.granularity],
        group_size=fmt.group_size if fmt.granularity == "group" else None,
        dynamic=dynamic,
    )


def _format_of(wf: QuantFormat, af: QuantFormat | None) -> str:
    """The library's compression format: packed int4/int8 weight-only, int8 or fp8 W8A8."""
    if wf.dtype == "fp8_e4m3":
        return "float-quantized"
    return "int-quantized" if af is not None else "pack-quantized"


def write_compressed_tensors(
    model: nn.Module, state: QuantState, out_dir: Path, tokenizer: Any | None = None
) -> Path:
    """Save a copy of `model` (float HF model with quantlab's edits) with state's weights compressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    why = supported(state)
    if why:
        raise InputError(f"compressed-tensors export refused: {why}.")
    pairs = {
        (ms.weight_format, ms.input_format)
        for ms in state.modules.values()
        if ms.weight_format is not None
    }
    if len(pairs) != 1:
        raise InputError(f"compressed-tensors export needs one format pair, got {len(pairs)}.")
    fmt, afmt = next(iter(pairs))
    assert fmt is not None
    quantized = sorted(n for n, ms in state.modules.items() if ms.weight_format is not None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linears if n not in set(quantized)]
    acts = None if afmt is None else _args(afmt, dynamic=afmt.granularity == "token")
    scheme = QuantizationScheme(targets=["Linear"], weights=_args(fmt), input_activations=acts)
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, qconfig, show_progress=False)
    offset = 1 << (fmt.bits - 1) if fmt.is_int else 0
    for name in quantized:
        ms = state.modules[name]
        lin = model.get_submodule(name)
        q, s, z = ms.tensors["qweight"], ms.tensors["weight_scale"], ms.tensors.get("weight_zero")
        w = dequantize(q, s, z, fmt, torch.float32)
        weight, scale = getattr(lin, "weight"), getattr(lin, "weight_scale")  # noqa: B009
        zp = getattr(lin, "weight_zero_point", None)
        assert isinstance(weight, torch.Tensor) and isinstance(scale, torch.Tensor)
        with torch.no_grad():
            weight.copy_(w.to(weight.dtype))
            scale.copy_(s.reshape(scale.shape).to(scale.dtype))
            if isinstance(zp, torch.Tensor):
                zero = torch.zeros_like(s) if z is None else z.to(torch.int32) - offset
                zp.copy_(zero.reshape(zp.shape).to(zp.dtype))
            static = getattr(lin, "input_scale", None)
            if isinstance(static, torch.Tensor) and "input_scale" in ms.tensors:
                static.copy_(ms.tensors["input_scale"].reshape(static.shape).to(static.dtype))
            izp = getattr(lin, "input_zero_point", None)
            if isinstance(izp, torch.Tensor):
                izp.zero_()
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format=_format_of(fmt, afmt)
    )
    compressor.compress_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)  # type: ignore[operator]
    compressor.update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    log.info("wrote compressed-tensors checkpoint %s (%d linears)", out_dir, len(quantized))
    return out_dir


def float_model_from_run(reload_dir: Path) -> tuple[nn.Module, Any]:
    """(HF model with nn.Linear layers, tokenizer) from a run's `quantlab/` folder: the float
    tensors after the calibrators' edits; quantized linears hold their dequantized codes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantlab.export.reload import FLOAT_FILE
    from quantlab.tensorio import load_tensors

    config = AutoConfig.from_pretrained(str(reload_dir))
    tensors = load_tensors(reload_dir / FLOAT_FILE, "Re-run the recipe that wrote this folder.")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(tensors, strict=False)
    state = QuantState.load(reload_dir)
    for name, ms in state.modules.items():
        if ms.weight_format is not None:
            w = dequantize(
                ms.tensors["qweight"],
                ms.tensors["weight_scale"],
                ms.tensors.get("weight_zero"),
                ms.weight_format,
            )
            with torch.no_grad():
                model.get_submodule(name).weight.copy_(w)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(str(reload_dir))

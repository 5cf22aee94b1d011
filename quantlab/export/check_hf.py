"""`quantlab check-export --target modelopt_hf`: a ModelOpt unified HF folder (any producer) against
its consumers' loading rules.

Rules (docs/export.md, read from TensorRT-LLM's PyTorch backend, vLLM's and SGLang's ModelOpt
loaders, and what ModelOpt 0.47 writes): a quant_method "modelopt" config whose quant_algo agrees
with hf_quant_config.json; per quantized linear the weight dtype and shape and the scale tensors
of its quant_algo (FP8 per-tensor needs an input_scale: vLLM and SGLang have no dynamic
fallback; W4A16_AWQ needs a pre_quant_scale on the linears no norm feeds: TensorRT-LLM's loader
requires it there); finite positive scales; FP8 KV scales on every layer; exclude_modules that
name real modules; divisibility of every sharded dimension by the tp it will be served at.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantlab.adapters import ModelAdapter, adapter_for_config
from quantlab.errors import InputError
from quantlab.export.modelopt_hf import ALGOS, QUANT_CONFIG, read_json

# quant_algo -> (weight dtype, scale tensors each quantized linear must carry)
RULES: dict[str, tuple[torch.dtype, tuple[str, ...]]] = {
    "W8A16": (torch.int8, ("weight_scale",)),
    "W4A16_AWQ": (torch.uint8, ("weight_scale",)),
    "FP8": (torch.float8_e4m3fn, ("weight_scale", "input_scale")),
    "FP8_PER_CHANNEL_PER_TOKEN": (torch.float8_e4m3fn, ("weight_scale",)),
    "W8A8_SQ_PER_CHANNEL": (torch.int8, ("weight_scale", "input_scale")),
}


def is_modelopt_hf(folder: Path) -> bool:
    """Whether folder looks like a ModelOpt HF checkpoint (hf_quant_config.json or quant_method)."""
    if (folder / QUANT_CONFIG).is_file():
        return True
    try:
        conf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = conf.get("quantization_config") if isinstance(conf, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "modelopt"


def linear_shapes(conf: dict[str, Any], adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    """Layer-relative linear name -> (N, K) from the HF config (adapter resolved for conf)."""
    return adapter.shapes(conf)


def check_modelopt_hf(folder: Path, tp: int = 1) -> list[str]:
    """One line per consumer rule the ModelOpt HF folder breaks (empty: clean)."""
    conf = read_json(folder / "config.json")
    qc = conf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "modelopt":
        raise InputError(
            f"{folder}/config.json has no quantization_config with quant_method 'modelopt'."
        )
    quant = (
        read_json(folder / QUANT_CONFIG).get("quantization", {})
        if (folder / QUANT_CONFIG).is_file()
        else qc
    )
    problems: list[str] = []
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if qc.get("quant_algo") != algo:
        problems.append(
            f"config.json quant_algo {qc.get('quant_algo')!r} differs from {QUANT_CONFIG}'s {algo!r}: "
            "TensorRT-LLM reads the latter, vLLM the former; write the same value in both"
        )
    if algo is not None and algo not in ALGOS:
        return [*problems, f"quant_algo {algo!r} is not one quantlab checks ({', '.join(ALGOS)})"]
    if kv_algo not in (None, "FP8"):
        problems.append(f"kv_cache_quant_algo {kv_algo!r}: vLLM and SGLang read FP8 KV scales only")
    adapter = adapter_for_config(conf)
    tensors = read_layout(folder, problems)
    if tensors is None:
        return problems
    excludes = list(quant.get("exclude_modules") or qc.get("ignore") or [])
    group = quant.get("group_size")
    if algo == "W4A16_AWQ" and not isinstance(group, int):
        problems.append(f"W4A16_AWQ without an integer group_size in {QUANT_CONFIG}")
    shapes = linear_shapes(conf, adapter)
    modules = {adapter.embed, adapter.lm_head}
    ck = adapter.checkpoint_name  # MoE experts and routers carry the checkpoint's own names
    for i in range(int(conf["num_hidden_layers"])):
        modules |= {ck(f"{adapter.layers}.{i}.{m}") for m in adapter.float_modules}
        for lin, (n, k) in shapes.items():
            name = ck(f"{adapter.layers}.{i}.{lin}")
            modules.add(name)
            skip = algo is None or is_excluded(name, excludes)
            problems += _check_linear(
                tensors, name, lin, n, k, None if skip else algo, group, adapter
            )
        for fused in adapter.fused_groups:
            off = [x for x in fused if is_excluded(ck(f"{adapter.layers}.{i}.{x}"), excludes)]
            if off and len(off) < len(fused):
                problems.append(
                    f"layer {i}: exclude_modules leaves part of {'/'.join(fused)} quantized; vLLM "
                    "refuses a partly quantized fused GEMM and TensorRT-LLM then excludes all of "
                    "it: exclude all or none"
                )
        if kv_algo == "FP8":
            for proj, key in ((adapter.k_proj, "k_scale"), (adapter.v_proj, "v_scale")):
                problems += check_scale(tensors, f"{adapter.layers}.{i}.{proj}.{key}", scalar=True)
    problems += check_tp(conf, tp, group if algo == "W4A16_AWQ" else None)
    for p in excludes:
        if not any(m == p or fnmatch.fnmatchcase(m, p) for m in modules):
            problems.append(
                f"exclude_modules entry {p!r} names no module of this model; fix or remove it"
            )
    return problems


def is_excluded(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def read_layout(
    folder: Path, problems: list[str]
) -> dict[str, tuple[torch.dtype, tuple[int, ...], Any]] | None:
    """name -> (dtype, shape, file handle) over every safetensors file of folder."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        problems.append(f"{folder} holds no .safetensors file")
        return None
    out: dict[str, tuple[torch.dtype, tuple[int, ...], Any]] = {}
    for f in files:
        try:
            h = safe_open(str(f), "pt")
            for key in h.keys():  # noqa: SIM118 - safe_open is not a dict
                t = h.get_slice(key)
                out[key] = (ST_DTYPES.get(t.get_dtype(), torch.float32), tuple(t.get_shape()), h)
        except (SafetensorError, OSError) as exc:
            problems.append(f"{f.name} cannot be read ({exc})")
    return out


ST_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
}


def _check_linear(
    tensors: dict[str, Any],
    name: str,
    lin: str,
    n: int,
    k: int,
    algo: str | None,
    group: Any,
    adapter: ModelAdapter,
) -> list[str]:
    w = tensors.get(f"{name}.weight")
    if w is None:
        return [f"{name}.weight is missing"]
    if algo is None:
        if (
            w[0] not in (torch.float16, torch.bfloat16, torch.float32)
            or f"{name}.weight_scale" in tensors
        ):
            return [f"{name} is excluded (or quant_algo is null) but holds a quantized weight"]
        return []
    dtype, scales = RULES[algo]
    want_w = (n // 2, k) if algo == "W4A16_AWQ" else (n, k)
    out = []
    if w[0] != dtype or w[1] != want_w:
        out.append(f"{name}.weight is {w[0]} {list(w[1])}; {algo} needs {dtype} {list(want_w)}")
    for s in scales:
        scalar = s == "input_scale" or algo == "FP8"
        out += check_scale(tensors, f"{name}.{s}", scalar=scalar)
    ws = tensors.get(f"{name}.weight_scale")
    if (
        ws is not None
        and algo in ("W8A16", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL")
        and ws[1] != (n,)
    ):
        out.append(f"{name}.weight_scale has shape {list(ws[1])}; {algo} needs [{n}]")
    if (
        ws is not None
        and algo == "W4A16_AWQ"
        and isinstance(group, int)
        and ws[1] != (n, k // group)
    ):
        out.append(
            f"{name}.weight_scale has shape {list(ws[1])}; W4A16_AWQ g{group} needs [{n}, {k // group}]"
        )
    if algo == "W4A16_AWQ" and lin not in adapter.norm_fed:
        pre = tensors.get(f"{name}.pre_quant_scale")
        if pre is None:
            out.append(
                f"{name}.pre_quant_scale is missing: TensorRT-LLM's W4A16_AWQ loader requires it on linears no norm feeds (write ones)"
            )
        elif pre[1] != (k,):
            out.append(f"{name}.pre_quant_scale has shape {list(pre[1])}; needs [{k}]")
    return out


def check_scale(tensors: dict[str, Any], key: str, scalar: bool) -> list[str]:
    entry = tensors.get(key)
    if entry is None:
        return [f"{key} is missing"]
    _, shape, handle = entry
    if scalar and int(torch.tensor(shape).prod()) != 1:
        return [f"{key} has shape {list(shape)}; a per-tensor scale holds one value"]
    t = handle.get_tensor(key).float()
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        return [f"{key} holds zero, negative or non-finite scales"]
    return []


def check_tp(conf: dict[str, Any], tp: int, group: int | None) -> list[str]:
    """Sharding rules of the serving tp: heads and intermediate split evenly, KV heads split or
    replicated (tp a multiple of them), and row-parallel group-wise shards whole groups."""
    if tp == 1:
        return []
    heads, inter = int(conf["num_attention_heads"]), int(conf["intermediate_size"])
    kv = int(conf.get("num_key_value_heads") or heads)
    d = int(conf.get("head_dim") or int(conf["hidden_size"]) // heads)
    out = []
    if heads % tp:
        out.append(f"num_attention_heads={heads} cannot be split over tp={tp}")
    if kv % tp and tp % kv:
        out.append(f"num_key_value_heads={kv}: tp={tp} neither divides it nor is a multiple of it")
    if inter % tp:
        out.append(f"intermediate_size={inter} cannot be split over tp={tp}")
    for what, k in (("o_proj", heads * d), ("down_proj", inter)):
        if group and k % tp == 0 and (k // tp) % group:
            out.append(
                f"{what}: {k // tp} input columns per rank at tp={tp} is not a multiple of group {group}"
            )
    return out

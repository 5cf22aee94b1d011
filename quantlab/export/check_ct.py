"""`quantlab check-export --target compressed_tensors`: a compressed-tensors HF folder (any producer)
against the library's own schema and the tensors its compressors read.

Rules: `quantization_config` validates as the library's QuantizationConfig (quant_method
"compressed-tensors"); each targeted Linear not in `ignore` carries the tensors of its format —
`pack-quantized`: `weight_packed` int32 [N, K*bits/32], `weight_shape` [2] = (N, K),
`weight_scale` [N, 1] / [N, K/G], `weight_zero_point` when asymmetric; `int-quantized`: int8
`weight` [N, K]; `float-quantized`: float8_e4m3fn `weight` [N, K]; plus `input_scale` for static
activations; finite positive scales; `ignore` entries that name modules; the serving tp's
divisibility (as for modelopt_hf).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from quantlab.adapters import adapter_for_config
from quantlab.errors import InputError
from quantlab.export.check_hf import check_scale, check_tp, linear_shapes, read_layout

_WEIGHT_DTYPE = {"int-quantized": torch.int8, "float-quantized": torch.float8_e4m3fn}


def is_compressed_tensors(folder: Path) -> bool:
    """Whether folder's config.json declares quant_method 'compressed-tensors'."""
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _ignored(name: str, ignore: list[str]) -> bool:
    """The library's matching: exact names, or `re:` regular expressions."""
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else name == p for p in ignore)


def check_compressed_tensors(folder: Path, tp: int = 1) -> list[str]:
    """One line per rule the compressed-tensors folder breaks (empty: clean)."""
    from compressed_tensors.quantization import QuantizationConfig

    conf = json.loads((folder / "config.json").read_text())
    qc = conf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise InputError(f"{folder}/config.json has no compressed-tensors quantization_config.")
    try:
        cfg = QuantizationConfig.model_validate(qc)
    except ValueError as exc:
        return [f"quantization_config does not validate as compressed-tensors' schema: {exc}"]
    problems: list[str] = []
    if len(cfg.config_groups) != 1:
        return [f"{len(cfg.config_groups)} config groups: quantlab checks one-group folders only"]
    scheme = next(iter(cfg.config_groups.values()))
    if scheme.targets != ["Linear"] or scheme.weights is None:
        return ["the config group must target Linear and quantize weights"]
    fmt = str(scheme.format or cfg.format)
    tensors = read_layout(folder, problems)
    if tensors is None:
        return problems
    adapter = adapter_for_config(conf)
    ignore = list(cfg.ignore or [])
    modules = {adapter.lm_head, adapter.embed}
    w, a = scheme.weights, scheme.input_activations
    for i in range(int(conf["num_hidden_layers"])):
        for lin, (n, k) in linear_shapes(conf, adapter).items():
            name = f"{adapter.layers}.{i}.{lin}"
            modules.add(name)
            if _ignored(name, ignore):
                if f"{name}.weight" not in tensors:
                    problems.append(f"{name} is ignored but has no float weight")
                continue
            problems += _check_weight(tensors, name, fmt, w, n, k)
            if a is not None and not a.dynamic:
                problems += check_scale(tensors, f"{name}.input_scale", scalar=True)
    for p in ignore:
        if not p.startswith("re:") and p not in modules:
            problems.append(f"ignore entry {p!r} names no module of this model; fix or remove it")
    group = w.group_size if w.strategy == "group" else None
    return problems + check_tp(conf, tp, group)


def _check_weight(
    tensors: dict[str, Any], name: str, fmt: str, w: Any, n: int, k: int
) -> list[str]:
    """The weight tensors of one quantized linear for the folder's compression format."""
    out: list[str] = []
    groups = k // w.group_size if w.strategy == "group" else 1
    want_scale = (1,) if w.strategy == "tensor" else (n, groups)
    if fmt == "pack-quantized":
        packed, shape = tensors.get(f"{name}.weight_packed"), tensors.get(f"{name}.weight_shape")
        want = (n, k * w.num_bits // 32)
        if packed is None or packed[0] != torch.int32 or packed[1] != want:
            got = "missing" if packed is None else f"{packed[0]} {list(packed[1])}"
            out.append(f"{name}.weight_packed is {got}; pack-quantized needs int32 {list(want)}")
        if shape is None:
            out.append(f"{name}.weight_shape is missing")
        elif shape[2].get_tensor(f"{name}.weight_shape").tolist() != [n, k]:
            out.append(f"{name}.weight_shape does not hold [{n}, {k}]")
        if not w.symmetric and f"{name}.weight_zero_point" not in tensors:
            out.append(f"{name}.weight_zero_point is missing (asymmetric weights)")
    elif fmt in _WEIGHT_DTYPE:
        weight = tensors.get(f"{name}.weight")
        if weight is None or weight[0] != _WEIGHT_DTYPE[fmt] or weight[1] != (n, k):
            got = "missing" if weight is None else f"{weight[0]} {list(weight[1])}"
            out.append(f"{name}.weight is {got}; {fmt} needs {_WEIGHT_DTYPE[fmt]} [{n}, {k}]")
    else:
        return [f"{name}: format {fmt!r} is not one quantlab checks"]
    scale = tensors.get(f"{name}.weight_scale")
    if scale is not None and tuple(scale[1]) != want_scale:
        out.append(f"{name}.weight_scale has shape {list(scale[1])}; needs {list(want_scale)}")
    return out + check_scale(tensors, f"{name}.weight_scale", scalar=False)

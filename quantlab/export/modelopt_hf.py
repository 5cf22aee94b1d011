"""ModelOpt unified HF export: the HF-layout checkpoint TensorRT-LLM's PyTorch backend, vLLM and
SGLang read (`quant_method: "modelopt"`), written from a finished run, and read back.

Layout (what ModelOpt 0.47's `export_hf_checkpoint` writes; docs/export.md lists every
difference): HF module names; per quantized linear `weight` (int8 [N, K], int4 packed as uint8
[N/2, K] with two output rows per byte, even row in the low nibble, or float8_e4m3fn [N, K]),
`weight_scale` (float32: () per tensor, [N] per channel, [N, K/G] per group), `input_scale`
(float32 (), static activations), `pre_quant_scale` ([K], model dtype, only where a calibrator
left one unfolded); FP8 KV cache as `k_proj.k_scale` / `v_proj.v_scale` (float32 ()); the
unquantized tensors in the export dtype; hf_quant_config.json and config.json's
`quantization_config`. Scales are dequantization scales (x ~= q * s) in both formats.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantlab.adapters import ADAPTERS, ModelAdapter, adapter_for_config
from quantlab.attention import KV_FORMAT_KEY, KV_SCALE_KEY
from quantlab.errors import InputError
from quantlab.formats import QuantFormat
from quantlab.kernels.packing import pack_int4_rows, unpack_int4_rows
from quantlab.state import ModuleState, QuantState
from quantlab.tensorio import load_tensors

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
QUANT_CONFIG = "hf_quant_config.json"
# quant_algo -> (weight format, input format); group formats match any group size.
ALGOS: dict[str, tuple[QuantFormat, QuantFormat | None]] = {
    "W8A16": (QuantFormat("int8", "channel"), None),
    "W4A16_AWQ": (QuantFormat("int4", "group", 128), None),
    "FP8": (QuantFormat("fp8_e4m3", "tensor"), QuantFormat("fp8_e4m3", "tensor")),
    "FP8_PER_CHANNEL_PER_TOKEN": (
        QuantFormat("fp8_e4m3", "channel"),
        QuantFormat("fp8_e4m3", "token"),
    ),
    "W8A8_SQ_PER_CHANNEL": (QuantFormat("int8", "channel"), QuantFormat("int8", "tensor")),
}
_KV_ALGOS = {"fp8": "FP8"}
_FP8_GROUP = {"dynamic": False, "num_bits": 8, "type": "float"}


def _same(f: QuantFormat | None, ref: QuantFormat | None) -> bool:
    if f is None or ref is None:
        return f is ref
    return (f.dtype, f.granularity, f.symmetric) == (ref.dtype, ref.granularity, ref.symmetric)


def algo_for(wf: QuantFormat | None, af: QuantFormat | None) -> str | None:
    """ModelOpt quant_algo of a (weight, input) format pair (None: float); InputError if none."""
    if wf is None and af is None:
        return None
    for algo, (w, a) in ALGOS.items():
        if _same(wf, w) and _same(af, a):
            return algo
    got = f"weights {wf.describe() if wf else 'float'}, activations {af.describe() if af else 'float'}"
    raise InputError(
        f"modelopt_hf has no quant_algo for {got}. It writes: int8 per-channel weight-only "
        "(W8A16), int4 group symmetric (W4A16_AWQ), fp8 per-tensor W+A (FP8), fp8 per-channel "
        "W + per-token A (FP8_PER_CHANNEL_PER_TOKEN), int8 per-channel W + static per-tensor A "
        "(W8A8_SQ_PER_CHANNEL). Formats that can write the others: trtllm."
    )


def planned_problem(wf: QuantFormat | None, af: QuantFormat | None, kv: str | None) -> str | None:
    """Why a recipe's planned formats cannot be written as modelopt_hf (None: they can)."""
    try:
        algo_for(wf, af)
    except InputError as exc:
        return str(exc)
    if kv is not None and kv not in _KV_ALGOS:
        return (
            f"a {kv} KV cache: the ModelOpt HF format (and vLLM/SGLang reading it) carries FP8 "
            "KV-cache scales only; use kv_cache format fp8, or the trtllm format for int8"
        )
    return None


def _kv_format(state: QuantState) -> str | None:
    kinds = {ms.meta[KV_FORMAT_KEY] for ms in state.modules.values() if KV_FORMAT_KEY in ms.meta}
    if len(kinds) > 1:
        raise InputError(f"modelopt_hf: the state mixes KV-cache formats {sorted(kinds)}.")
    return next(iter(kinds), None)


def state_algo(state: QuantState) -> tuple[str | None, int | None, str | None]:
    """(quant_algo, group_size, kv_cache_quant_algo) of a state; InputError if not expressible."""
    pairs = {
        (ms.weight_format, ms.input_format)
        for ms in state.modules.values()
        if ms.weight_format is not None or ms.input_format is not None
    }
    algos = {algo_for(w, a) for w, a in pairs}
    if len(algos) > 1:
        raise InputError(
            f"modelopt_hf writes one quant_algo per checkpoint; this state has {sorted(map(str, algos))}."
        )
    groups = {w.group_size for w, _ in pairs if w is not None and w.group_size}
    kv = _kv_format(state)
    why = planned_problem(None, None, kv)
    if why:
        raise InputError(f"modelopt_hf cannot express this run: {why}.")
    return next(iter(algos), None), next(iter(groups), None), _KV_ALGOS.get(kv or "")


def _linear_tensors(
    name: str, ms: ModuleState, algo: str, dtype: torch.dtype, needs_pre: bool
) -> dict[str, torch.Tensor]:
    """ModelOpt tensors of one quantized linear from its ModuleState (needs_pre: write a
    pre_quant_scale even when the state has none, as ModelOpt does for this linear)."""
    q, s = ms.tensors["qweight"], ms.tensors["weight_scale"].float()
    out: dict[str, torch.Tensor] = {}
    if algo == "W4A16_AWQ":
        out["weight"] = pack_int4_rows(q).view(torch.uint8)
    else:
        out["weight"] = q
    out["weight_scale"] = s.reshape(()) if algo == "FP8" else s
    if "input_scale" in ms.tensors:
        out["input_scale"] = ms.tensors["input_scale"].float().reshape(())
    pre = ms.tensors.get("pre_quant_scale")
    if pre is not None or needs_pre:  # ones: quantlab folded its smoothing into the producer
        out["pre_quant_scale"] = (torch.ones(q.shape[1]) if pre is None else pre).to(dtype)
    return {f"{name}.{k}": v.contiguous() for k, v in out.items()}


def quant_config(
    algo: str | None, group: int | None, kv_algo: str | None, excludes: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hf_quant_config.json, config.json's quantization_config), as ModelOpt 0.47 writes them."""
    from quantlab import __version__

    producer = {"name": "quantlab", "version": __version__}
    quant: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo}
    if algo == "W4A16_AWQ":
        quant.update(group_size=group, has_zero_point=False, pre_quant_scale=True)
    quant["exclude_modules"] = excludes
    hf: dict[str, Any] = {}
    if algo == "FP8":
        group0 = {"input_activations": _FP8_GROUP, "weights": _FP8_GROUP, "targets": ["Linear"]}
        hf["config_groups"] = {"group_0": group0}
    hf.update(ignore=excludes, quant_algo=algo)
    if kv_algo:
        hf["kv_cache_scheme"] = dict(_FP8_GROUP)
    hf.update(producer=producer, quant_method="modelopt")
    return {"producer": producer, "quantization": quant}, hf


def write_modelopt_hf(reload_dir: Path, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the ModelOpt HF folder of a run's `quantlab/` folder (state + float tensors) to out_dir."""
    from quantlab.export.reload import FLOAT_FILE

    state = QuantState.load(reload_dir)
    algo, group, kv_algo = state_algo(state)
    config = json.loads((reload_dir / "config.json").read_text())
    adapter = adapter_for_config(config)
    floats = load_tensors(reload_dir / FLOAT_FILE, "Re-run the recipe that wrote this folder.")
    if dtype is None:
        dtype = next(iter(floats.values())).dtype
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in floats.items()}
    quantized: list[str] = []
    for name, ms in sorted(state.modules.items()):
        if KV_SCALE_KEY in ms.tensors:
            scale = ms.tensors[KV_SCALE_KEY].float().reshape(())
            prefix = name.rsplit(".", 1)[0]  # the decoder layer
            for proj, key in ((adapter.k_proj, "k_scale"), (adapter.v_proj, "v_scale")):
                tensors[f"{prefix}.{proj}.{key}"] = scale.clone()
        if algo is not None and ms.weight_format is not None:
            tensors.update(_linear_tensors(name, ms, algo, dtype, _needs_pre(adapter, name, algo)))
            quantized.append(name)
    excludes = _excludes(adapter, config, set(quantized), algo)
    # MoE: quantlab's unfused expert names back to the checkpoint's (Mixtral's w1/w3/w2).
    tensors = {adapter.checkpoint_name(k): v for k, v in tensors.items()}
    hf_quant, qcfg = quant_config(algo, group, kv_algo, excludes)
    config["quantization_config"] = qcfg
    config["dtype"] = str(dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4) + "\n")
    for f in reload_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy2(f, out_dir / f.name)
    log.info("wrote ModelOpt HF checkpoint %s (%s, %d linears)", out_dir, algo, len(quantized))
    return out_dir


def _needs_pre(adapter: ModelAdapter, name: str, algo: str) -> bool:
    """Whether ModelOpt writes a pre_quant_scale for linear `name`: every linear under SmoothQuant;
    under AWQ the linears no norm feeds (o_proj, down_proj), whose scale it cannot fold away and
    which TensorRT-LLM's W4A16_AWQ loader then requires."""
    if algo == "W8A8_SQ_PER_CHANNEL":
        # ModelOpt 0.47 writes none on MoE experts (quantlab folds every expert's scale).
        ex = adapter.experts
        return ex is None or f".{ex.fused}." not in name
    if algo != "W4A16_AWQ":
        return False
    if not adapter.modelopt_folds_norms:
        return True
    return not any(name.endswith("." + lin) for lin in adapter.norm_fed)


def _excludes(
    adapter: ModelAdapter, config: dict[str, Any], quantized: set[str], algo: str | None
) -> list[str]:
    """Modules ModelOpt lists as not quantized: lm_head, the embedding, unquantized layer linears
    and the float routers / gates of MoE layers (checkpoint names)."""
    if algo is None:
        return []
    out = [adapter.lm_head, adapter.embed]
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"{adapter.layers}.{i}"
        out += [f"{prefix}.{n}" for n in adapter.linears if f"{prefix}.{n}" not in quantized]
        out += [f"{prefix}.{n}" for n in adapter.float_modules]
    return [adapter.checkpoint_name(n) for n in out]


def read_modelopt_hf(folder: Path) -> tuple[QuantState, dict[str, torch.Tensor], dict[str, Any]]:
    """(QuantState, unquantized tensors, config.json) of a ModelOpt HF folder (any producer).

    The inverse of write_modelopt_hf: codes unpacked to quantlab's [N, K] int8 / float8 codes,
    scales reshaped to quantlab's ([1], [N], [N, K/G]); FP8 K/V scales become one attention
    scale max(k_scale, v_scale), the single scale quantlab's KV cache uses.
    """
    config = read_json(folder / "config.json")
    quant = (
        read_json(folder / QUANT_CONFIG).get("quantization")
        if (folder / QUANT_CONFIG).is_file()
        else config.get("quantization_config")
    )
    if not isinstance(quant, dict):
        raise InputError(f"{folder}: no {QUANT_CONFIG} and no quantization_config in config.json.")
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is not None and algo not in ALGOS:
        raise InputError(
            f"{folder}: quant_algo {algo!r} is not one quantlab reads; it reads {', '.join(ALGOS)}."
        )
    if kv_algo not in (None, "FP8"):
        raise InputError(f"{folder}: kv_cache_quant_algo {kv_algo!r}; quantlab reads FP8 only.")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no .safetensors files.")
    flat: dict[str, torch.Tensor] = {}
    for f in files:
        flat.update(load_tensors(f, "Export the folder again."))
    state = QuantState(model={"source": str(folder)})
    if algo is not None:
        wf, af = ALGOS[algo]
        if algo == "W4A16_AWQ":
            wf = QuantFormat("int4", "group", int(quant["group_size"]))
        for key in [k for k in flat if k.endswith(".weight_scale")]:
            name = key.removesuffix(".weight_scale")
            state.modules[name] = _module_state(name, flat, wf, af)
    kv: dict[str, list[torch.Tensor]] = {}
    for key in [k for k in flat if k.endswith((".k_scale", ".v_scale"))]:
        attn = key.rsplit(".", 2)[0]
        kv.setdefault(attn, []).append(flat.pop(key).float().reshape(1))
    for attn, scales in kv.items():
        ms = ModuleState(tensors={KV_SCALE_KEY: torch.stack(scales).amax(0)})
        ms.meta[KV_FORMAT_KEY] = "fp8"
        state.modules[attn] = ms
    archs = list(config.get("architectures") or [])
    if any(a in ADAPTERS and ADAPTERS[a].experts is not None for a in archs):
        # MoE checkpoint names -> quantlab's unfused expert modules.
        adapter = adapter_for_config(config)
        state.modules = {adapter.memory_name(k): v for k, v in state.modules.items()}
        flat = {adapter.memory_name(k): v for k, v in flat.items()}
    return state, flat, config


def _module_state(
    name: str, flat: dict[str, torch.Tensor], wf: QuantFormat, af: QuantFormat | None
) -> ModuleState:
    """Pop one linear's ModelOpt tensors out of flat into a ModuleState."""
    w, s = flat.pop(f"{name}.weight"), flat.pop(f"{name}.weight_scale").float()
    if wf.dtype == "int4":
        w = unpack_int4_rows(w.view(torch.int8))
    n = w.shape[0]
    scale = s.reshape(1) if wf.granularity == "tensor" else s.reshape(n, -1).squeeze(1)
    ms = ModuleState(wf, af, {"qweight": w, "weight_scale": scale})
    if f"{name}.input_scale" in flat:
        ms.tensors["input_scale"] = flat.pop(f"{name}.input_scale").float().reshape(1)
    pre = flat.pop(f"{name}.pre_quant_scale", None)
    if pre is not None and not bool((pre == 1).all()):  # ones are a no-op: not carried
        ms.tensors["pre_quant_scale"] = pre
    return ms


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path; InputError (naming the file) when unreadable or not an object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read {path}: {exc}.") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} does not hold a JSON object.")
    return doc

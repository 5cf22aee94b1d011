"""`quantlab check-export`: a TensorRT-LLM checkpoint folder against the loader's rules, and its manifest.

Rules (TensorRT-LLM's 2025 main line, docs/export.md): one rank file per tp x pp rank; the
embedding on pp rank 0, ln_f and lm_head on the last; every layer's norms and linears; per
quant_algo the scale tensors its quantized layers declare; finite, positive scales; with
W8A16/W4A16 an exclude list that keeps the embedding float (or a `per_token_scale` for it); a
kv_cache_scaling_factor on every layer when kv_cache_quant_algo is set. A manifest.json, when
present, must match every file byte for byte.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantlab.errors import InputError
from quantlab.export.manifest import MANIFEST, verify_manifest
from quantlab.export.mixed_gemm import GPTQ_ALGOS

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
NORMS = ("input_layernorm", "post_layernorm")
# Tensors each quantized linear carries per quant_algo (beside `weight`).
REQUIRED: dict[str, tuple[str, ...]] = {
    "W8A16": ("per_channel_scale",),
    "W4A16": ("per_channel_scale",),
    "W4A16_AWQ": ("weights_scaling_factor", "prequant_scaling_factor"),
    "W4A16_GPTQ": ("weights_scaling_factor", "zero"),
    "W8A16_GPTQ": ("weights_scaling_factor",),
    "FP8": ("weights_scaling_factor", "activation_scaling_factor"),
    "FP8_PER_CHANNEL_PER_TOKEN": ("per_channel_scale",),
    "W8A8_SQ_PER_CHANNEL": ("weights_scaling_factor", "activation_scaling_factor"),
    "W8A8_SQ_PER_TENSOR_PLUGIN": ("per_channel_scale", "act_scale"),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": ("per_channel_scale",),
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": ("per_channel_scale",),
}
_SCALE_SUFFIXES = (
    "scaling_factor",
    "per_channel_scale",
    "act_scale",
    "scale_to_int",
    "per_token_scale",
)


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def read_checkpoint_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder; InputError when it is missing or unreadable."""
    path = folder / "config.json"
    try:
        conf = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{folder} has no config.json: it is not a TensorRT-LLM checkpoint."
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({exc}).") from None
    if not isinstance(conf, dict) or "mapping" not in conf or "quantization" not in conf:
        raise InputError(f"{path} lacks `mapping` / `quantization`: not a TensorRT-LLM checkpoint.")
    return conf


def _rank_names(f: Any) -> set[str]:
    return set(f.keys())


def check_trtllm(folder: Path) -> list[str]:
    """One line per rule the checkpoint in folder breaks (empty: clean)."""
    conf = read_checkpoint_config(folder)
    tp, pp = int(conf["mapping"].get("tp_size", 1)), int(conf["mapping"].get("pp_size", 1))
    quant = conf["quantization"]
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    excl = list(quant.get("exclude_modules") or [])
    layers = int(conf.get("num_hidden_layers", 0))
    problems: list[str] = []
    if algo is not None and algo not in REQUIRED:
        problems.append(f"config.json: quant_algo {algo!r} is not one quantlab checks")
    if algo in ("W8A16", "W4A16") and excl and not _excluded("transformer.vocab_embedding", excl):
        problems.append(
            "config.json: exclude_modules does not cover transformer.vocab_embedding, so TensorRT-"
            "LLM builds a weight-only quantized embedding; add '*vocab_embedding' (an explicit "
            "list replaces TensorRT-LLM's defaults)"
        )
    if layers % pp:
        return [*problems, f"config.json: pp_size {pp} does not divide num_hidden_layers {layers}"]
    per_pp = layers // pp
    for rank in range(tp * pp):
        path = folder / f"rank{rank}.safetensors"
        if not path.is_file():
            problems.append(f"{path.name}: missing (mapping has tp {tp} x pp {pp} ranks)")
            continue
        try:
            with safe_open(str(path), "pt") as f:
                names = _rank_names(f)
                problems += _check_rank(
                    f, names, path.name, rank // tp, pp, per_pp, algo, kv_algo, excl
                )
                if rank == 0 and algo in GPTQ_ALGOS:
                    problems += _gptq_layout(f, names, algo, int(quant.get("group_size") or 128))
        except SafetensorError as exc:
            problems.append(f"{path.name}: unreadable ({exc}); re-export it")
    extra = sorted(
        p.name for p in folder.glob("rank*.safetensors") if int(p.stem[4:] or -1) >= tp * pp
    )
    problems += [f"{n}: a rank file beyond tp x pp = {tp * pp}" for n in extra]
    return problems


NOTE = "note: "  # a line check-export prints without counting it as a problem


def _gptq_layout(f: Any, names: set[str], algo: str, group: int) -> list[str]:
    """TensorRT-LLM loads GPTQ weights as they are (trtllm-build does not preprocess them): they
    must be its mixed-GEMM layout viewed as the model dtype, [K, N*bits/16] (docs/export.md)."""
    bits = GPTQ_ALGOS[algo]
    out: list[str] = []
    for n in sorted(x for x in names if x.endswith(".weights_scaling_factor")):
        w_name = n.removesuffix("weights_scaling_factor") + "weight"
        w, s = f.get_slice(w_name), f.get_slice(n)
        k, cols = s.get_shape()[0] * group, s.get_shape()[1]
        if w.get_dtype() in ("I8", "U8"):
            return [
                f"{NOTE}{algo} weights are in quantlab's row-packed layout; TensorRT-LLM expects "
                "them preprocessed for the GPU that runs trtllm-build: re-run with "
                "export.trtllm_sm set (quantlab's own engine reads either)"
            ]
        if list(w.get_shape()) != [k, cols * bits // 16]:
            out.append(
                f"{w_name}: shape {w.get_shape()}; TensorRT-LLM expects [{k}, {cols * bits // 16}]"
            )
    return out


def _check_rank(
    f: Any,
    names: set[str],
    file: str,
    pp_rank: int,
    pp: int,
    per_pp: int,
    algo: str | None,
    kv_algo: str | None,
    excl: list[str],
) -> list[str]:
    problems = []
    need = []
    if pp_rank == 0:
        need.append("transformer.vocab_embedding.weight")
    if pp_rank == pp - 1:
        need += ["transformer.ln_f.weight", "lm_head.weight"]
    for i in range(per_pp):
        pre = f"transformer.layers.{i}"
        need += [f"{pre}.{n}.weight" for n in (*NORMS, *LINEARS)]
        if kv_algo is not None:
            need.append(f"{pre}.attention.kv_cache_scaling_factor")
        for lin in LINEARS:
            mod = f"{pre}.{lin}"
            if algo is None or _excluded(mod, excl) or _excluded(f"{mod}.weight", excl):
                continue
            need += [f"{mod}.{k}" for k in REQUIRED.get(algo, ())]
    for n in need:
        if n not in names:
            problems.append(f"{file}: {n} is missing (required for quant_algo {algo})")
    for n in sorted(names):
        if n.endswith(_SCALE_SUFFIXES):
            t = f.get_tensor(n).float()
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                problems.append(f"{file}: {n} holds zero, negative or non-finite scales")
    return problems


TARGETS = ("trtllm", "modelopt_hf", "compressed_tensors")


def check_export(folder: Path, target: str | None = None, tp: int = 1) -> list[str]:
    """Every problem of an output folder: the manifest's hashes and the consumer's rules.

    target None: a ModelOpt HF folder is checked as modelopt_hf, anything else as a TensorRT-LLM
    checkpoint, plus a run folder's modelopt_hf/ subfolder. tp: the serving tp of an HF folder
    (a TensorRT-LLM checkpoint carries its own).
    """
    from quantlab.export.check_ct import check_compressed_tensors, is_compressed_tensors
    from quantlab.export.check_hf import check_modelopt_hf, is_modelopt_hf

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    if target is not None and target not in TARGETS:
        raise InputError(f"Unknown --target {target!r}; checkable: {', '.join(TARGETS)}.")
    problems = []
    if (folder / MANIFEST).is_file():
        try:
            problems += [f"manifest: {p}" for p in verify_manifest(folder)]
        except (ValueError, KeyError) as exc:
            problems.append(f"manifest: {MANIFEST} is unreadable ({exc})")
    checks = {
        "modelopt_hf": (is_modelopt_hf, check_modelopt_hf),
        "compressed_tensors": (is_compressed_tensors, check_compressed_tensors),
    }
    if target is None:  # the folder's own kind, else a run folder: checkpoint + HF subfolders
        target = next((t for t, (is_it, _) in checks.items() if is_it(folder)), None)
        if target is None:
            subs = [n for n, (is_it, _) in checks.items() if is_it(folder / n)]
            # A run folder exported as the quantlab folder only has no consumer checkpoint.
            run_only = (folder / "quantlab").is_dir()
            if (folder / "config.json").is_file() or not (subs or run_only):
                problems += check_trtllm(folder)
            for name in subs:
                problems += [f"{name}: {p}" for p in checks[name][1](folder / name, tp)]
            return problems
    if target == "trtllm":
        return problems + check_trtllm(folder)
    is_it, check = checks[target]
    hf = folder if is_it(folder) or not (folder / target).is_dir() else folder / target
    return problems + [f"{target}: {p}" for p in check(hf, tp)]

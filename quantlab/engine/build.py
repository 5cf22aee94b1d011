"""`quantlab build`: TensorRT-LLM checkpoint -> engine folder (config.json + weights in kernel layouts).

The folder is written to a temporary sibling and renamed into place when complete; an existing
engine is replaced only with overwrite, and only after the new one is whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from quantlab.engine.checkpoint import Checkpoint, load_checkpoint, read_config
from quantlab.engine.config import ENGINE_WEIGHTS, BuildSettings, EngineConfig
from quantlab.engine.convert import Linear, convert_linear, fuse, to_layout
from quantlab.engine.kv_cache import kv_bytes_per_block
from quantlab.errors import InputError, environment_failure
from quantlab.outdir import check_writable, output_lock, publish

log = logging.getLogger(__name__)

# Engine linear name -> TensorRT-LLM name inside a layer (TensorRT-LLM's mlp.fc is HF's gate_proj,
# its mlp.gate is HF's up_proj).
LAYER_LINEARS = {
    "qkv": "attention.qkv",
    "dense": "attention.dense",
    "gate": "mlp.fc",
    "up": "mlp.gate",
    "proj": "mlp.proj",
}
KV_FROM_ALGO = {"INT8": "int8", "FP8": "fp8"}
STORAGE_OF_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def resolve_kv_storage(settings: BuildSettings, ckpt_conf: dict[str, Any], path: Path) -> str:
    """Storage of the KV cache: the checkpoint's INT8/FP8 when asked for (or auto), else a float."""
    algo = (ckpt_conf.get("quantization") or {}).get("kv_cache_quant_algo")
    want = settings.kv_cache_dtype
    if want == "auto":
        return KV_FROM_ALGO.get(algo or "", STORAGE_OF_DTYPE[ckpt_conf["dtype"]])
    if want in ("int8", "fp8") and KV_FROM_ALGO.get(algo or "") != want:
        have = f"{algo} KV scales" if algo else "no KV-cache scales"
        raise InputError(
            f"--kv-cache-dtype {want}: checkpoint {path} has {have}. An {want} cache needs the "
            f"scales a kv_cache step with format {want} writes (kv_cache_quant_algo "
            f"{want.upper()}); add that step to the recipe, or build with --kv-cache-dtype auto."
        )
    return want


def _check_budget(cfg: EngineConfig) -> None:
    s, m = cfg.build, cfg.model
    if s.kv_cache_mem_gb is None:
        return
    per_block = kv_bytes_per_block(
        m.num_layers, s.block_size, m.num_kv_heads, m.head_dim, cfg.kv_storage
    )
    blocks = int(s.kv_cache_mem_gb * (1 << 30)) // per_block - 1  # block 0 is scratch
    need = -(-cfg.max_seq_len // s.block_size)
    if blocks < need:
        raise InputError(
            f"--kv-cache-mem-gb {s.kv_cache_mem_gb} holds {max(blocks, 0)} blocks of "
            f"{s.block_size} tokens ({per_block / 2**20:.1f} MiB each in {cfg.kv_storage}); one "
            f"sequence of --max-seq-len {cfg.max_seq_len} needs {need}. Raise the budget to at least "
            f"{(need + 1) * per_block / 2**30:.2f} GB, lower --max-seq-len, or use an int8/fp8 KV cache."
        )


def _w4_layout(settings: BuildSettings) -> str:
    if settings.w4_layout != "auto":
        return settings.w4_layout
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return "hopper"
    return "checkpoint"


def convert_layers(
    ckpt: Checkpoint, layout: str, show_progress: bool, int8_groups: bool = False
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """(linear metas by engine name, engine tensors by name) for every layer and lm_head
    (int8_groups: see convert_linear)."""
    spec, q = ckpt.spec, ckpt.quant
    algo, group = q.get("quant_algo"), int(q.get("group_size") or 128)
    dtype = spec.torch_dtype
    metas: dict[str, dict[str, Any]] = {}
    out: dict[str, torch.Tensor] = {}

    def put(name: str, lin: Linear) -> None:
        meta, tensors = to_layout(lin, layout)
        metas[name] = meta
        out.update({f"{name}.{k}": v for k, v in tensors.items()})

    for i in tqdm(range(spec.num_layers), desc="build", unit="layer", disable=not show_progress):
        lins = {
            n: convert_linear(ckpt.layer(i, t), algo, group, dtype, f"layer {i} {t}", int8_groups)
            for n, t in LAYER_LINEARS.items()
        }
        fused = fuse([lins["gate"], lins["up"]])
        if fused is not None:
            lins = {**{n: v for n, v in lins.items() if n not in ("gate", "up")}, "gate_up": fused}
        for n, lin in lins.items():
            put(f"layers.{i}.{n}", lin)
        norms = ckpt.layer(i, "input_layernorm"), ckpt.layer(i, "post_layernorm")
        out[f"layers.{i}.input_norm"] = norms[0]["weight"].to(dtype)
        out[f"layers.{i}.post_norm"] = norms[1]["weight"].to(dtype)
    t = ckpt.tensors
    embed = t["transformer.vocab_embedding.weight"].to(dtype)
    out["embed"] = embed
    out["final_norm"] = t["transformer.ln_f.weight"].to(dtype)
    head = t.get("lm_head.weight", embed)
    put("lm_head", ({"kind": "float"}, {"weight": head.to(dtype).clone()}))
    return metas, out


def kv_scales(ckpt: Checkpoint, storage: str) -> list[float] | None:
    """Per-layer kv_cache_scaling_factor for an int8/fp8 cache (None for a float cache)."""
    if storage not in ("int8", "fp8"):
        return None
    out = []
    for i in range(ckpt.spec.num_layers):
        s = ckpt.tensors.get(f"transformer.layers.{i}.attention.kv_cache_scaling_factor")
        if s is None:
            raise InputError(
                f"Checkpoint {ckpt.path}: layer {i} has no attention.kv_cache_scaling_factor, "
                "although kv_cache_quant_algo is set; re-export it."
            )
        out.append(float(s.float().reshape(-1)[0]))
    return out


def _save_tokenizer(src: Path | None, dst: Path) -> str | None:
    if src is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise InputError(
            f"Tokenizer folder {src} cannot be loaded ({str(e).splitlines()[0]}); pass "
            "--tokenizer with a Hugging Face tokenizer folder (the run's quantlab/ folder has one)."
        ) from None
    tok.save_pretrained(str(dst))
    return "tokenizer"


def default_tokenizer(checkpoint_dir: Path) -> Path | None:
    """The tokenizer folder a `quantlab run` writes beside its checkpoint (quantlab/), if present."""
    cand = Path(checkpoint_dir) / "quantlab"
    return cand if (cand / "tokenizer_config.json").is_file() else None


def prebuild_kernels(metas: dict[str, dict[str, Any]], show_progress: bool) -> list[str]:
    """Compile (once, cached in QUANTLAB_CUDA_CACHE) the CUDA libraries these linears use."""
    if not torch.cuda.is_available():
        return []
    kinds = {(m["kind"], m.get("layout")) for m in metas.values()}
    built = []
    todo = []
    if any(k == "w4a16" for k, _ in kinds):
        todo += [
            ("cuda_gemv", "quantlab.kernels.cuda_gemv"),
            ("cuda_mma", "quantlab.kernels.cuda_mma"),
        ]
    if ("w4a16", "hopper") in kinds:
        todo.append(("cutlass_w4", "quantlab.kernels.cutlass_w4"))
    if any(k == "w8a16" for k, _ in kinds):
        todo += [
            ("cuda_mma", "quantlab.kernels.cuda_mma"),
            ("cutlass_w8", "quantlab.kernels.cutlass_w8"),
        ]
    import importlib

    for name, mod in dict.fromkeys(todo):
        try:
            log.info("build: compiling %s (cached after the first time)", name)
            importlib.import_module(mod).build()
            built.append(name)
        except (RuntimeError, OSError) as e:  # no nvcc / no CUTLASS: the auto path falls back
            log.warning("build: %s not compiled (%s); its plans are skipped at run time", name, e)
    return built


def build_engine(
    checkpoint_dir: Path,
    output_dir: Path,
    settings: BuildSettings,
    tokenizer_dir: Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> EngineConfig:
    """Check everything, convert the checkpoint, write the engine folder atomically; its config."""
    settings.check()
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    conf = read_config(checkpoint_dir)  # cheap checks first: no tensors read yet
    kv = resolve_kv_storage(settings, conf, checkpoint_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(
            f"Engine folder {output_dir} exists and is not empty; choose another --output or pass "
            "--overwrite."
        )
    seq_len = settings.max_seq_len or int(conf.get("max_position_embeddings", 2048))
    input_len = settings.max_input_len or min(1024, seq_len // 2)
    settings = replace(settings, max_seq_len=seq_len, max_input_len=input_len)
    if input_len >= seq_len:
        raise InputError(
            f"--max-input-len {input_len} leaves no room to generate within --max-seq-len "
            f"{seq_len}."
        )
    ckpt = load_checkpoint(checkpoint_dir)
    cfg = EngineConfig(
        model=ckpt.spec,
        build=settings,
        quant_algo=ckpt.quant.get("quant_algo"),
        kv_cache_quant_algo=ckpt.quant.get("kv_cache_quant_algo"),
        kv_storage=kv,
        source={"checkpoint": str(checkpoint_dir.resolve()), "producer": conf.get("producer")},
    )
    _check_budget(cfg)
    if cfg.max_seq_len > ckpt.spec.max_position_embeddings:
        log.warning(
            "--max-seq-len %d exceeds the model's max_position_embeddings %d",
            cfg.max_seq_len,
            ckpt.spec.max_position_embeddings,
        )
    layout = _w4_layout(settings)
    metas, tensors = convert_layers(ckpt, layout, show_progress)
    cfg.linears = metas
    cfg.source["kv_scales"] = kv_scales(ckpt, kv)
    tok_src = tokenizer_dir if tokenizer_dir is not None else default_tokenizer(checkpoint_dir)
    problems = check_writable(
        output_dir, sum(t.numel() * t.element_size() for t in tensors.values())
    )
    if problems:
        raise InputError("Cannot write the engine: " + " ".join(problems))
    with output_lock(output_dir):
        tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            cfg.tokenizer = _save_tokenizer(tok_src, tmp / "tokenizer")
            cfg.source["kernels_built"] = prebuild_kernels(metas, show_progress)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ENGINE_WEIGHTS))
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            publish(tmp, output_dir, overwrite)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise environment_failure(exc, f"writing the engine {output_dir}") from None
        except BaseException:
            if not (
                tmp / "config.json"
            ).is_file():  # a complete engine is kept (publish says where)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built %s: %s, KV cache %s, W4 layout %s", output_dir, cfg.quant_algo, kv, layout)
    return cfg

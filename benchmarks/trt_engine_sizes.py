"""TensorRT engine size and build time per quantization mode, the way the seed reports them.

For each mode a real `quantlab run` (short calibration, evaluation off, fp16 export) and a real
`quantlab build --backend tensorrt` (TensorRT-RTX on this machine's CPU, target SM89). Models:
  smollm2      the embedded SmolLM2-135M-Instruct (real weights)
  llama7b:L    a Llama-2-7B-shaped model with L decoder layers and random weights (hidden 4096,
               MLP 11008, 32 heads; vocab 49152, SmolLM2's tokenizer, not Llama-2's 32000); run
               L = 1 and 2 to get the per-layer slope and the fixed part (embedding, lm_head),
               from which a 32-layer, 32000-token size is extrapolated (docs/build.md).

    python benchmarks/trt_engine_sizes.py --model smollm2 --out docs/runs/trt_sizes_smollm2.json
    python benchmarks/trt_engine_sizes.py --model llama7b:1 --model llama7b:2 --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

MODES: dict[str, list[dict[str, Any]]] = {
    "fp16": [{"calibrator": "kv_cache", "args": {"format": "int8"}}],  # quant_algo null
    "W8A16": [{"calibrator": "rtn", "args": {"format": "int8_channel"}}],
    "W4A16 g64": [{"calibrator": "rtn", "args": {"format": "int4_g64_sym"}}],
    "W4A16 g64 asym": [{"calibrator": "rtn", "args": {"format": "int4_g64_asym"}}],
    "W4A16 g64 plugin": [{"calibrator": "rtn", "args": {"format": "int4_g64_sym"}}],
    "FP8": [{"calibrator": "fp8", "args": {}}],
    "W8A8 SQ": [{"calibrator": "smoothquant", "args": {"alpha": 0.5}}],
}


def _llama(layers: int, root: Path, tokenizer_dir: Path) -> Path:
    """A random Llama-2-7B-shaped model with `layers` decoder layers, saved as fp16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = root / f"llama7b-{layers}l"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok),  # SmolLM2's 49152 (the calibration text is tokenized with it)
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        torch_dtype="float16",
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_mode(source: str, mode: str, data: Path, work: Path) -> dict[str, Any]:
    """Quantize `source` in `mode`, build its engine, and return sizes and times."""
    from quantlab.deploy.build import TrtSettings, build_trt_engine
    from quantlab.engine.config import BuildSettings
    from quantlab.pipeline import run_recipe
    from quantlab.recipe import Recipe

    tag = mode.replace(" ", "_")
    run_dir, eng = work / f"run-{tag}", work / f"engine-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    recipe = Recipe.model_validate(
        {
            "name": f"sizes-{tag}",
            "model": {"source": source, "dtype": "float32"},
            "calibration": {
                "source": "file",
                "path": str(data),
                "num_samples": 4,
                "seq_len": 128,
                "bos_id": 0,
            },
            "steps": MODES[mode],
            "export": {"output_dir": str(run_dir), "dtype": "float16"},
            "evaluation": {"enabled": False},
        }
    )
    run_recipe(recipe, work, show_progress=False)
    quantize_s = time.perf_counter() - t0
    ckpt_bytes = sum(p.stat().st_size for p in run_dir.glob("rank*.safetensors"))
    settings = BuildSettings(max_batch_size=8, max_input_len=512, max_seq_len=1024)
    trt = TrtSettings(target_sm="89", w4_gemm="plugin" if mode.endswith("plugin") else "native")
    cfg = build_trt_engine(run_dir, eng, settings, trt, overwrite=True, show_progress=False)
    e = cfg["engine"]
    row = {
        "mode": mode,
        "quant_algo": cfg["quant_algo"],
        "checkpoint_bytes": ckpt_bytes,
        "engine_bytes": e["bytes"],
        "onnx_bytes": cfg["onnx"]["bytes"],
        "build_s": e["build_seconds"],
        "quantize_s": round(quantize_s, 1),
        "builder": f"{cfg['builder']['name']} {cfg['builder']['version']}",
        "unexpected_builder_warnings": len(cfg["builder_warnings"]),
        "w4_gemm": cfg["w4_gemm"],
        "aot_bytes": sum(p.stat().st_size for p in (eng / "plugins").glob("*.cubin")),
    }
    shutil.rmtree(eng, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main() -> None:
    """Run every mode on every --model and write the JSON (and print a table)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="smollm2 | llama7b:LAYERS")
    ap.add_argument("--mode", action="append", default=None, help=f"of {', '.join(MODES)}")
    ap.add_argument("--work", default="out/trt_sizes")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from quantlab.embedded import embedded_model_dir

    data = Path(os.environ.get("QUANTLAB_DATA_DIR", "../shared/data")) / "austen" / "emma.txt"
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.model:
        if model == "smollm2":
            source = "embedded:smollm2"
        else:
            source = str(_llama(int(model.split(":")[1]), work, embedded_model_dir()))
        for mode in args.mode or list(MODES):
            row = {"model": model, **run_mode(source, mode, data, work / model.replace(":", "-"))}
            results.append(row)
            print(
                f"{model:>10} {mode:>16} engine {row['engine_bytes'] / 2**20:9.1f} M  checkpoint "
                f"{row['checkpoint_bytes'] / 2**20:9.1f} M  build {row['build_s']:6.1f} s",
                flush=True,
            )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, no GPU",
        "target_sm": "89",
        "settings": "max_batch_size 8, max_input_len 512, max_seq_len 1024, KV as exported",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**meta, "rows": results}, indent=2))


if __name__ == "__main__":
    main()

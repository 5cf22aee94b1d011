"""Per-layer calibration time and peak memory of every calibrator on a Llama-2-7B-shaped model.

The model has Llama-2-7B's configuration (hidden 4096, MLP 11008, 32 heads, vocab 32000) and
RANDOM fp16 weights (normal, std 0.02; norms 1): speed and memory only, no accuracy. Calibration
data are random token ids. The Runner offloads: the model stays in host memory and one decoder
layer at a time moves to the GPU.

Phase 1 runs each method on the first `--short-layers` decoder layers (per-layer time and peak
GPU memory are the same for every layer of this model); phase 2 runs `--full-method` over all 32
layers for the whole-run peak host RSS and GPU memory.

Usage (GPU machine, repo root): python3 benchmarks/runner_gpu.py --out $OUT/runner_gpu
Writes runner_gpu.json and runner_gpu.md into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from quantlab.adapters import adapter_for
from quantlab.calibrator import Calibrator, get_calibrator
from quantlab.memory import host_rss_mb
from quantlab.runner import LayerProfile, RunnerConfig, quantize_model

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}

# label -> (calibrator, args): the methods as a recipe would name them, group 128 for INT4.
METHODS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "RTN int4 g128 asym": [("rtn", {"format": "int4_g128_asym"})],
    "FP8 W + static A": [("fp8", {})],
    "AWQ int4 g128 sym": [("awq", {"format": "int4_g128_sym"})],
    "GPTQ int4 g128 asym (act_order)": [("gptq", {"format": "int4_g128_asym"})],
    "AWQ + GPTQ int4 g128 sym": [
        ("awq", {"format": "int4_g128_sym"}),
        ("gptq", {"format": "int4_g128_sym"}),
    ],
    "SmoothQuant W8A8 (per-channel W, static A)": [("smoothquant", {})],
    "SmoothQuant a=search W8A8 (per-channel W, per-token A)": [
        ("smoothquant", {"alpha": "search", "activations": "dynamic_token"})
    ],
    "INT8 KV cache": [("kv_cache", {"format": "int8"})],
}


def build_calibrators(spec: list[tuple[str, dict[str, Any]]]) -> list[Calibrator]:
    """Calibrators by registered name, falling back to the in-repo classes when not installed."""
    out = []
    for name, args in spec:
        try:
            cls = get_calibrator(name)
        except Exception:  # no entry points on a machine where quantlab is not pip-installed
            cls = _in_repo(name)
        out.append(cls(cls.Args.model_validate(args)))
    return out


def _in_repo(name: str) -> Any:
    import importlib

    import tomllib

    eps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["entry-points"]
    mod, _, attr = eps["quantlab.calibrators"][name].partition(":")
    return getattr(importlib.import_module(mod), attr)


def random_llama(layers: int, dtype: torch.dtype, fill_device: str) -> torch.nn.Module:
    """A LlamaForCausalLM of Llama-2-7B shape with `layers` decoder layers and random weights, in host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **LLAMA2_7B)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffer is computed, not loaded
    g = torch.Generator(device=fill_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                r = torch.randn(p.shape, generator=g, device=fill_device, dtype=torch.float32)
                p.copy_((r * 0.02).to(dtype))
    return model.eval()


def run_method(
    label: str, layers: int, windows: list[torch.Tensor], device: str, dtype: torch.dtype
) -> dict[str, Any]:
    """Calibrate a fresh model with one method; per-layer profile and totals."""
    model = random_llama(layers, dtype, device)
    steps = build_calibrators(METHODS[label])
    profile: list[LayerProfile] = []
    cfg = RunnerConfig(show_progress=False, device=device, offload=True)
    t0 = time.perf_counter()
    quantize_model(model, adapter_for(model), windows, steps, cfg, profile=profile)
    total = time.perf_counter() - t0
    res = {
        "method": label,
        "layers": layers,
        "total_s": total,
        "per_layer_s": [p.seconds for p in profile],
        "median_layer_s": sorted(p.seconds for p in profile)[len(profile) // 2],
        "peak_device_mb": max(p.peak_device_mb or 0.0 for p in profile),
        "peak_host_mb": max(p.peak_host_mb or 0.0 for p in profile),
        "host_rss_after_mb": host_rss_mb(),
    }
    del model
    torch.cuda.empty_cache()
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    """Run both phases and write JSON + a markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--short-layers", type=int, default=3)
    ap.add_argument("--full-layers", type=int, default=32)
    ap.add_argument("--full-method", default="GPTQ int4 g128 asym (act_order)")
    ap.add_argument("--methods", default="", help="comma-separated labels (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16
    g = torch.Generator().manual_seed(0)
    windows = [
        torch.randint(0, LLAMA2_7B["vocab_size"], (args.seq_len,), generator=g)
        for _ in range(args.samples)
    ]
    labels = [m for m in METHODS if not args.methods or m in args.methods.split(",")]
    results: dict[str, Any] = {
        "date": str(datetime.date.today()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "host": platform.node(),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "short": [],
        "full": None,
    }
    for label in labels:
        try:
            results["short"].append(
                run_method(label, args.short_layers, windows, args.device, dtype)
            )
        except Exception as exc:  # one failing method must not lose the others' numbers
            results["short"].append({"method": label, "error": repr(exc)[:500]})
            print(f"{label}: FAILED {exc!r}", flush=True)
        (out / "runner_gpu.json").write_text(json.dumps(results, indent=1))
    if args.full_layers:
        results["full"] = run_method(
            args.full_method, args.full_layers, windows, args.device, dtype
        )
    (out / "runner_gpu.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"{results['date']}, {results['device']}, torch {results['torch']}; Llama-2-7B-shaped model, "
        f"RANDOM fp16 weights; {args.samples} calibration windows x {args.seq_len} random tokens; "
        "offload on (one layer on the GPU at a time).",
        "",
        "| method | layers run | median s / layer | peak GPU MiB | peak host RSS MiB |",
        "|---|---|---|---|---|",
    ]
    rows = [*results["short"], *([results["full"]] if results["full"] else [])]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['layers']} | {r['median_layer_s']:.2f} | "
            f"{r['peak_device_mb']:.0f} | {r['peak_host_mb']:.0f} |"
        )
    (out / "runner_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

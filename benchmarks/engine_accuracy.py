"""Perplexity through the engine vs the simulated model, on each run's own evaluation windows.

For each `quantlab run` output folder: build an engine from its checkpoint (KV dtype from the
checkpoint), score the recipe's evaluation windows (the standard protocol when the recipe follows
it: 16 windows of 512 tokens of prideandprejudice.txt), and compare the perplexity with the
simulated QuantLinear model of the same QuantState (fp32) on the same windows.

Usage: python benchmarks/engine_accuracy.py out/smollm2_int8_wo out/smollm2_fp8 ... [--device cpu]
Prints a markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantlab.data import DataSpec, load_windows
from quantlab.engine.build import build_engine
from quantlab.engine.config import BuildSettings
from quantlab.engine.runtime import Engine
from quantlab.export.reload import half_keeping_input_scales, load_quantized


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed NLL of ids[1:] under logits[:-1], token count); logits [T, V], ids int64 [T]."""
    lp = F.log_softmax(logits[:-1].float(), dim=-1)
    return float(-lp.gather(-1, ids[1:, None].to(lp.device)).sum()), int(ids.numel() - 1)


def measure(run: Path, device: str, work: Path, fp16_sim: bool = False) -> dict[str, Any]:
    """Engine and simulated perplexity of one run folder on its evaluation windows (fp16_sim: also
    the simulated model's perplexity in fp16)."""
    summary = json.loads((run / "accuracy.json").read_text())
    spec = DataSpec.model_validate(summary["evaluation_data"])
    sim, tok = load_quantized(run / "quantlab")
    windows = load_windows(spec, tok)
    seq = max(len(w) for w in windows)
    settings = BuildSettings(max_batch_size=1, max_input_len=seq, max_seq_len=seq + 1)
    cfg = build_engine(run, work / run.name, settings, show_progress=False)
    e = Engine(work / run.name, device=device)
    t0 = time.perf_counter()
    eng = [_nll(e.score(w.tolist()), w) for w in windows]
    t_engine = time.perf_counter() - t0
    with torch.no_grad():
        simn = [_nll(sim(input_ids=w[None]).logits[0], w) for w in windows]
    n = sum(c for _, c in eng)
    ppl_e = math.exp(sum(s for s, _ in eng) / n)
    ppl_s = math.exp(sum(s for s, _ in simn) / n)
    extra: dict[str, Any] = {}
    if fp16_sim:
        sim16 = half_keeping_input_scales(load_quantized(run / "quantlab")[0])
        with torch.no_grad():
            h = [_nll(sim16(input_ids=w[None]).logits[0], w) for w in windows]
        ppl_h = math.exp(sum(s for s, _ in h) / n)
        extra = {"ppl_simulated_fp16": ppl_h, "rel_diff_sim_fp16": ppl_h / ppl_s - 1}
    return {
        **extra,
        "run": str(run),
        "quant_algo": cfg.quant_algo,
        "kv": cfg.kv_storage,
        "windows": len(windows),
        "tokens": n,
        "ppl_engine": ppl_e,
        "ppl_simulated": ppl_s,
        "ppl_recorded": (summary.get("accuracy") or {}).get("ppl_quant"),
        "rel_diff": ppl_e / ppl_s - 1,
        "engine_seconds": t_engine,
        "device": device,
    }


def main() -> None:
    """Measure each run folder; print a markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fp16-sim", action="store_true", help="also the simulated model in fp16")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.runs:
            rows.append(measure(Path(r), args.device, Path(tmp), args.fp16_sim))
            print(json.dumps(rows[-1]), flush=True)
    print("| run | quant_algo | KV | windows x tokens | engine ppl | simulated ppl | diff |"
          " simulated in fp16 |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for x in rows:
        h = x.get("ppl_simulated_fp16")
        h_txt = f"{h:.3f} ({100 * x['rel_diff_sim_fp16']:+.2f} %)" if h else "-"
        print(
            f"| {Path(x['run']).name} | {x['quant_algo']} | {x['kv']} | {x['windows']} x "
            f"{x['tokens'] // x['windows']} | {x['ppl_engine']:.3f} | {x['ppl_simulated']:.3f} | "
            f"{100 * x['rel_diff']:+.2f} % | {h_txt} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

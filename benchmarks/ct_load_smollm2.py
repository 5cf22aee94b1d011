"""The compressed-tensors proof on real runs: transformers loads quantlab's folder and scores it.

For each RUN (a finished `quantlab run` folder), writes its compressed_tensors folder from the
run's QuantState (`quantlab export --format compressed_tensors`, no recalibration), loads it with
`AutoModelForCausalLM.from_pretrained` (transformers + compressed-tensors, CPU, float32,
decompressing; activation quantization applied by the library), and measures the perplexity on the
run's own evaluation windows, next to the number quantlab reported for that run.

    python benchmarks/ct_load_smollm2.py /tmp/out/smollm2_int4_g64_awq_sym /tmp/out/smollm2_fp8 \
        --out docs/runs/ct_load_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _ppl(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w.view(1, -1), use_cache=False).logits[0, :-1].float()
            nll -= float(F.log_softmax(logits, -1).gather(-1, w[1:, None]).sum())
            n += w.numel() - 1
    return math.exp(nll / n)


def measure(run: Path) -> dict[str, object]:
    """Export, load and score one run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.data import DataSpec, load_windows
    from quantlab.export.hf_formats import reexport

    acc = json.loads((run / "accuracy.json").read_text())
    t0 = time.perf_counter()
    folder = reexport(run, "compressed_tensors", overwrite=True)
    export_s = time.perf_counter() - t0
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = load_windows(DataSpec(**acc["evaluation_data"]), tok)
    t0 = time.perf_counter()
    got = _ppl(model, windows)
    reported = acc["accuracy"]["ppl_quant"]
    return {
        "run": run.name,
        "quant_algo": acc["quant_algo"],
        "ct_format": qc["format"],
        "windows": len(windows),
        "ppl_reported_by_quantlab": reported,
        "ppl_transformers_load": got,
        "relative_difference": got / reported - 1,
        "export_seconds": export_s,
        "eval_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    """Measure every run given and print (and optionally write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [measure(r) for r in args.runs]
    print("| run | quant_algo | format | ppl (quantlab) | ppl (transformers) | rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['quant_algo']} | {r['ct_format']} | "
            f"{r['ppl_reported_by_quantlab']:.4f} | {r['ppl_transformers_load']:.4f} | "
            f"{r['relative_difference']:+.2e} |"
        )
    if args.out:
        doc = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "rows": rows}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

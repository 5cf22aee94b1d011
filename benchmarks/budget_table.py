"""Accuracy-budget mixed precision on finished runs: for each run and budget, the layers kept in
float, the measured perplexity and the TensorRT-LLM checkpoint bytes.

Each RUN is a `quantlab run` output folder (its QuantState is reloaded, no recalibration); the
reference is the float model, the windows are the run's evaluation data. The sensitivity ranking
is computed once per run and shared by its budgets. Bytes: the run's rank0.safetensors size, plus,
per kept layer, its five linears' fp16 weights minus the quantized tensors (codes, scales, zeros)
that the checkpoint holds for them: exactly what `quantlab run --max-ppl-increase` writes.

    python benchmarks/budget_table.py out/smollm2_int4_g64_sym out/smollm2_int4_g64_gptq_sym \
        --budgets 1,5,10 --out docs/runs/budget_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from safetensors import safe_open

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


_SIZE = {"I8": 1, "U8": 1, "F8_E4M3": 1, "F16": 2, "BF16": 2, "F32": 4}


def _linear_bytes(ckpt: Path, layers: list[int], int4: bool) -> tuple[int, int]:
    """(bytes the checkpoint holds for these layers' linears, their bytes as fp16 weights)."""
    held = as_fp16 = 0
    with safe_open(str(ckpt), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if not any(
                key.startswith(f"transformer.layers.{i}.{n}.") for i in layers for n in LINEARS
            ):
                continue
            t = f.get_slice(key)
            numel = math.prod(int(d) for d in t.get_shape())
            held += numel * _SIZE[t.get_dtype()]
            if key.endswith(".weight"):  # int4: two weights per int8 byte
                as_fp16 += 2 * numel * (2 if int4 else 1)
    return held, as_fp16


def main() -> None:
    """Rank once per run, search every budget, write the JSON and print a table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--budgets", default="1,5,10", help="percent, comma-separated")
    ap.add_argument("--sensitivity-windows", type=int, default=4)
    ap.add_argument("--reference", default="embedded:smollm2", help="the float model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from quantlab.adapters import adapter_for
    from quantlab.budget import choose_float_layers, layer_ranking, perplexity
    from quantlab.data import DataSpec, load_windows
    from quantlab.export.reload import load_quantized
    from quantlab.models import load_model

    rows = []
    for run in map(Path, args.runs):
        acc = json.loads((run / "accuracy.json").read_text())
        quant, tok = load_quantized(run / "quantlab")
        ref, _ = load_model(args.reference)
        adapter = adapter_for(ref)
        spec = DataSpec.model_validate(acc["evaluation_data"])
        windows = load_windows(spec, tok, ref)
        t0 = time.perf_counter()
        ranking = layer_ranking(ref, quant, adapter, windows[: args.sensitivity_windows])
        rank_s = time.perf_counter() - t0
        base = (run / "rank0.safetensors").stat().st_size
        p_q = perplexity(quant, windows)
        measured: dict[int, float] = {0: p_q}
        for b in [float(x) / 100 for x in args.budgets.split(",")]:
            t0 = time.perf_counter()
            res = choose_float_layers(
                ref, quant, adapter, windows, b, ranking=ranking, keep=False, measured=measured
            )
            int4 = str(acc["quant_algo"]).startswith("W4")
            held, fp16 = _linear_bytes(run / "rank0.safetensors", res.float_layers, int4)
            row = {
                "run": run.name,
                "quant_algo": acc["quant_algo"],
                "budget": b,
                "float_layers": res.float_layers,
                "ppl_ref": res.ref_ppl,
                "ppl_all_quantized": p_q,
                "ppl": res.ppl,
                "increase": res.increase,
                "tried": res.tried,
                "checkpoint_bytes_all_quantized": base,
                "checkpoint_bytes": base - held + fp16,
                "search_s": round(time.perf_counter() - t0, 1),
                "ranking_s": round(rank_s, 1),
            }
            rows.append(row)
            print(
                f"{run.name:>28} budget {100 * b:5.1f} %: {len(res.float_layers):2d} float layers "
                f"{res.float_layers}, ppl {res.ppl:.3f} (ref {res.ref_ppl:.3f}, +"
                f"{100 * res.increase:.2f} %; all quantized {p_q:.3f}), checkpoint "
                f"{row['checkpoint_bytes'] / 2**20:.1f} MiB (all quantized {base / 2**20:.1f})",
                flush=True,
            )
        rows.append({"run": run.name, "ranking": ranking})
    meta = {"date": time.strftime("%Y-%m-%d"), "windows": len(windows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

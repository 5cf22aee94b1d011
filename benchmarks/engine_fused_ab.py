"""The engine with and without its fused elementwise kernels, on the same engines in one process.

For each mode (random Llama-2-7B-shape weights, speed only; as benchmarks/engine_gpu.py), the
checkpoint is exported and built once; then the CUDA graphs are captured and the static-batch rows
measured with the plain torch ops (quantlab.engine.model.FUSED = False), then captured again and
measured with the fused kernels. Same engine, same machine, same process: the ratio is the
fusion's. A decode-vs-prefill check on a small model per mode runs first with the fused kernels.

Usage (GPU, repo root): python3 benchmarks/engine_fused_ab.py --out $OUT [--modes fp16,W4A16_AWQ]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_gpu as eg

from quantlab.engine import bench
from quantlab.engine import model as engine_model
from quantlab.engine.build import build_engine
from quantlab.engine.config import BuildSettings
from quantlab.engine.graphs import DecodeGraphs
from quantlab.engine.runtime import Engine


def _rows(e: Engine, fused: bool, batches: list[int], io: tuple[int, int]) -> list[dict[str, Any]]:
    engine_model.FUSED = fused
    if e.graphs is not None:
        e.graphs = DecodeGraphs(e)
    bench.warm_up(e)
    return [bench.bench_static(e, bs, *io).__dict__ for bs in batches]


def main() -> None:
    """Check, then measure every mode unfused and fused; JSON rows under --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=".gpuwork")
    ap.add_argument("--modes", default="fp16,W4A16_AWQ,W8A16,FP8 (")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--io", default="128,128")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    eg.ROWS = out / "fused_ab_rows.jsonl"
    eg.HF = False
    pick = [p.strip() for p in args.modes.split(",") if p.strip()]
    modes = [m for m in eg.MODES if any(m.startswith(p) for p in pick)]
    batches = [int(b) for b in args.batches.split(",")]
    io = (int(args.io.split(",")[0]), int(args.io.split(",")[1]))
    meta = {"date": str(datetime.date.today()), "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "argv": sys.argv}  # fmt: skip
    eg.record({"stage": "meta", **meta})
    if not args.no_check:
        res = eg.stage_check(work, modes)
        eg.record({"stage": "check", "rows": res.get("check", res)})
    model = eg.random_llama({**eg.LLAMA2_7B, "max_position_embeddings": 32768}, 32)
    windows = eg._windows(16, 512, eg.LLAMA2_7B["vocab_size"])
    for mode in modes:
        tag = "".join(c for c in mode.split()[0] if c.isalnum())
        ckpt, eng = work / f"ab-ckpt-{tag}", work / f"ab-engine-{tag}"
        t0 = time.perf_counter()
        try:
            del_quant = eg.export(model, eg.MODES[mode], windows, ckpt)
            del del_quant
            torch.cuda.empty_cache()
            kv = "fp16" if mode == "fp16" else "auto"
            s = BuildSettings(max_batch_size=max(batches), max_input_len=2048, max_seq_len=4096,
                              max_num_tokens=8192, kv_cache_dtype=kv, kv_cache_mem_gb=20.0)  # fmt: skip
            build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
            e = Engine(eng, device="cuda")
            r = {"mode": mode, "kv": e.cfg.kv_storage,
                 "unfused": _rows(e, False, batches, io), "fused": _rows(e, True, batches, io)}  # fmt: skip
            for a, b in zip(r["unfused"], r["fused"], strict=True):
                b["speedup_vs_unfused"] = b["tokens_per_s"] / a["tokens_per_s"]
            del e
            gc.collect()
        except Exception as exc:  # one mode's failure must not lose the others' rows
            r = {"mode": mode, "error": repr(exc)[:800]}
        r["seconds"] = time.perf_counter() - t0
        eg.record({"stage": "fused_ab", **r})
        torch.cuda.empty_cache()
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""Logit gaps on a run's first evaluation windows: engine vs the simulated model (fp32), and the
simulated model in fp16 vs in fp32 (what the activation dtype's rounding alone does).

Usage: python benchmarks/engine_logit_gap.py out/smollm2_int8_sq [--windows 2]
Prints per window: the relative norm of each logit difference and each one's top-1 agreement
with the fp32 simulated model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from quantlab.data import DataSpec, load_windows
from quantlab.engine.build import build_engine
from quantlab.engine.config import BuildSettings
from quantlab.engine.runtime import Engine
from quantlab.export.reload import half_keeping_input_scales, load_quantized


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def main() -> None:
    """Print one line per window."""
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args()
    run = Path(args.run)
    summary = json.loads((run / "accuracy.json").read_text())
    sim, tok = load_quantized(run / "quantlab")
    sim16 = half_keeping_input_scales(load_quantized(run / "quantlab")[0])
    windows = load_windows(DataSpec.model_validate(summary["evaluation_data"]), tok)
    windows = windows[: args.windows]
    seq = max(len(w) for w in windows)
    with tempfile.TemporaryDirectory() as tmp:
        s = BuildSettings(max_batch_size=1, max_input_len=seq, max_seq_len=seq + 1)
        build_engine(run, Path(tmp) / "e", s, show_progress=False)
        e = Engine(Path(tmp) / "e")
        for i, w in enumerate(windows):
            got = e.score(w.tolist())
            with torch.no_grad():
                want = sim(input_ids=w[None]).logits[0].float()
                half = sim16(input_ids=w[None]).logits[0].float()
            print(
                f"window {i}: engine vs sim fp32 {_rel(got, want):.4f} (top-1 {_top1(got, want):.3f}); "
                f"sim fp16 vs sim fp32 {_rel(half, want):.4f} (top-1 {_top1(half, want):.3f})"
            )


if __name__ == "__main__":
    main()

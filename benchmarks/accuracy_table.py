"""Accuracy of every shipped mode on the standard protocol, in one process, as a markdown table.

Usage: .venv/bin/python benchmarks/accuracy_table.py [--out docs/accuracy_results.md] [--windows 16]

Protocol (../shared/data/README.md): SmolLM2-135M-Instruct in float32; calibration = the first 32
windows of emma.txt, evaluation = the first 16 windows of prideandprejudice.txt, window = [0] + 511
tokens; metrics against the float32 model. Each variant is a shipped recipe plus `--set` overrides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from quantlab.data import DataSpec, load_windows
from quantlab.evaluate import AccuracyReport, ReferenceCache, compare_models
from quantlab.models import load_model
from quantlab.pipeline import run_recipe
from quantlab.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

VARIANTS: list[tuple[str, str, list[str]]] = [
    ("INT8 weight-only per-channel (RTN)", "smollm2_int8_wo.yaml", []),
    ("INT4 weight-only per-channel (RTN)", "smollm2_int4_wo.yaml", []),
    (
        "INT4 g64 sym, s = amax/7 (RTN)",
        "smollm2_int4_g64_sym.yaml",
        ["steps.0.args.scale_method=absmax"],
    ),
    (
        "INT4 g64 sym, s = amax/7.5 (RTN)",
        "smollm2_int4_g64_sym.yaml",
        ["steps.0.args.scale_method=half_step"],
    ),
    ("INT4 g64 sym, s = max(-min/8, max/7) (RTN, recipe)", "smollm2_int4_g64_sym.yaml", []),
    ("INT4 g64 asym (RTN)", "smollm2_int4_g64_asym.yaml", []),
    ("FP8 per-tensor W + static per-tensor A (amax = max over windows)", "smollm2_fp8.yaml", []),
    (
        "FP8 per-tensor W + static A, amax = mean of window maxima",
        "smollm2_fp8.yaml",
        ["steps.0.args.activation_amax=mean"],
    ),
    (
        "FP8 per-tensor, q/k/v and gate/up scales not shared (not what a fused runtime computes)",
        "smollm2_fp8.yaml",
        ["steps.0.args.share_fused_scales=false"],
    ),
    ("FP8 per-channel W + dynamic per-token A", "smollm2_fp8_channel_token.yaml", []),
    ("FP8 per-tensor, data-free calibration", "smollm2_fp8_datafree.yaml", []),
    *[
        (
            f"W8A8 {how}, per-{w} W + {a_label} A",
            recipe,
            [f"steps.0.args.weights={w}", *sets],
        )
        for how, sets in (
            ("plain (no smoothing)", ["steps.0.args.migrate=false"]),
            ("SmoothQuant a=0.5", []),
            ("SmoothQuant a=searched", ["steps.0.args.alpha=search"]),
        )
        for w in ("channel", "tensor")
        for a_label, recipe in (
            ("static per-tensor", "smollm2_int8_sq.yaml"),
            ("dynamic per-token", "smollm2_int8_sq_token.yaml"),
        )
    ],
    (
        "W8A8 SmoothQuant a=searched then GPTQ, per-channel W + dynamic per-token A",
        "smollm2_int8_sq_gptq_token.yaml",
        [],
    ),
    (
        "W8A8 SmoothQuant a=0.5 then GPTQ, per-channel W + dynamic per-token A",
        "smollm2_int8_sq_gptq_token.yaml",
        ["steps.0.args.alpha=0.5"],
    ),
    # KV cache (docs/kvcache.md). Baselines without KV quantization: the rows above for FP8 and
    # INT8 weight-only (kv_equalize leaves their weights' quantization unchanged), and the AWQ
    # row below; compare ppl quant of a KV row with that of its baseline.
    ("KV cache INT8 (V equalized), float weights", "smollm2_int8kv.yaml", []),
    (
        "KV cache INT8, one shared scale without V equalization, float weights",
        "smollm2_int8kv.yaml",
        ["steps=[{calibrator: kv_cache, args: {format: int8}}]"],
    ),
    ("KV cache FP8, float weights", "smollm2_fp8kv.yaml", []),
    ("KV cache FP8 + FP8 per-tensor W + static per-tensor A", "smollm2_fp8_fp8kv.yaml", []),
    (
        "KV cache INT8 (V equalized) + INT8 weight-only per-channel (RTN)",
        "smollm2_int8_wo_int8kv.yaml",
        [],
    ),
    ("KV cache INT8 (V equalized) + INT4 g64 sym AWQ", "smollm2_int4_g64_awq_int8kv.yaml", []),
    (
        "KV cache off (baseline of the row above): V equalized + INT4 g64 sym AWQ",
        "smollm2_int4_g64_awq_int8kv.yaml",
        [
            "steps=[{calibrator: kv_equalize, args: {}}, {calibrator: awq, args: {format: "
            "int4_g64_sym, grid: 20, duo_scaling: false, clip_search: true, max_clip_shrink: 0.5, "
            "max_tokens: 4096}}]"
        ],
    ),
    ("AWQ INT4 g64 sym", "smollm2_int4_g64_awq_sym.yaml", []),
    ("AWQ INT4 g64 asym", "smollm2_int4_g64_awq_asym.yaml", []),
    ("GPTQ INT4 g64 sym", "smollm2_int4_g64_gptq_sym.yaml", []),
    ("GPTQ INT4 g64 asym", "smollm2_int4_g64_gptq_asym.yaml", []),
    ("AWQ then GPTQ INT4 g64 sym", "smollm2_int4_g64_awq_gptq_sym.yaml", []),
    ("AWQ then GPTQ INT4 g64 asym", "smollm2_int4_g64_awq_gptq_asym.yaml", []),
    *[
        row
        for alpha, acts, a_label in (
            ("searched", "static_tensor", "static per-tensor"),
            ("0.5", "static_tensor", "static per-tensor"),
            ("0.5", "dynamic_token", "dynamic per-token"),
        )
        for row in (
            (
                f"KV cache INT8 (V equalized) + W8A8 SmoothQuant a={alpha}, per-channel W + "
                f"{a_label} A",
                "smollm2_int8_sq_int8kv.yaml",
                [
                    *([] if alpha == "searched" else ["steps.1.args.alpha=0.5"]),
                    f"steps.1.args.activations={acts}",
                ],
            ),
            (
                f"KV cache off (baseline of the row above): V equalized + W8A8 SmoothQuant "
                f"a={alpha}, per-channel W + {a_label} A",
                "smollm2_int8_sq_int8kv.yaml",
                [
                    "steps=[{calibrator: kv_equalize, args: {}}, {calibrator: smoothquant, args: "
                    f"{{alpha: {'search' if alpha == 'searched' else 0.5}, weights: channel, "
                    f"activations: {acts}, fold_pairs: true, keep_v_range: true, share_fused_scales: true, "
                    "activation_amax: max}}]"
                ],
            ),
        )
    ],
]


BF16_LABEL = "BF16 (model cast to bfloat16, no quantization)"


def bf16_report(windows: int) -> AccuracyReport:
    """The float32 model against itself cast to bfloat16, on the protocol's evaluation windows."""
    ref, tok = load_model("embedded:smollm2", "float32")
    bf16, _ = load_model("embedded:smollm2", "bfloat16")
    data = Path(os.environ.get("QUANTLAB_DATA_DIR", REPO.parent / "shared" / "data"))
    spec = DataSpec(
        source="file",
        path=str(data / "austen" / "prideandprejudice.txt"),
        num_samples=windows,
        seq_len=512,
        bos_id=0,
    )
    return compare_models(ref, bf16, load_windows(spec, tok), show_progress=False)


def _peak(out_dir: Path) -> str:
    """Peak host RSS of the calibration (MiB) from the run's accuracy.json."""
    prof = json.loads((out_dir / "accuracy.json").read_text()).get("calibration_profile") or {}
    peak = prof.get("peak_host_mb")
    return "" if peak is None else f"{peak:.0f}"


def _selected(label: str, only: str) -> bool:
    """True when no filter is given or one of the '|'-separated substrings occurs in label
    (a part starting with '^' must start the label)."""
    return not only or any(
        label.startswith(part[1:]) if part.startswith("^") else part in label
        for part in only.split("|")
    )


def main() -> None:
    """Run every variant and write the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "docs" / "accuracy_results.md"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument(
        "--only",
        default="",
        help="substring filter on variant labels; '|' separates alternatives, '^' anchors one",
    )
    args = ap.parse_args()
    cache = ReferenceCache()
    rows = []
    if _selected(BF16_LABEL, args.only):
        a = bf16_report(args.windows)
        rows.append(
            f"| {BF16_LABEL} | (none) | {a.ppl_ref:.3f} | {a.ppl_quant:.3f} | {a.kl_mean:.5f} | "
            f"{a.top1_agreement:.2%} | 0 | |"
        )
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, recipe_file, sets) in enumerate(VARIANTS):
            if not _selected(label, args.only):
                continue
            overrides = [
                *sets,
                f"export.output_dir={tmp}/v{i}",
                f"evaluation.data.num_samples={args.windows}",
            ]
            recipe, base = load_recipe(REPO / "recipes" / recipe_file, overrides)
            res = run_recipe(recipe, base, show_progress=False, ref_cache=cache)
            a = res.accuracy
            assert a is not None
            rows.append(
                f"| {label} | {res.quant_algo} | {a.ppl_ref:.3f} | {a.ppl_quant:.3f} | {a.kl_mean:.5f} | "
                f"{a.top1_agreement:.2%} | {res.calibration_seconds:.1f} | {_peak(res.output_dir)} |"
            )
            print(rows[-1], flush=True)
    head = [
        f"Measured {datetime.date.today()} on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; command: `.venv/bin/python benchmarks/accuracy_table.py`.",
        f"Evaluation: {args.windows} windows x 512 tokens of prideandprejudice.txt "
        f"({args.windows * 511} predicted tokens), float32 reference.",
        "",
        "| mode | quant_algo | ppl ref | ppl quant | KL (nats/token) | top-1 agreement | calibration s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out = Path(args.out)
    if args.only and out.exists():  # a partial run appends to the existing table
        out.write_text(out.read_text() + "\n".join(rows) + "\n")
    else:
        out.write_text("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()

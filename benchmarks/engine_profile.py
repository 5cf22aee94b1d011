"""Where a decode step of the engine goes, what bounds it, and how it compares with HF transformers.

Stages (GPU, repo root; rows appended to --out/profile_rows.jsonl as they are measured):
  bw       copy bandwidth (read + write bytes / time of a 4 GiB device copy, median of 10)
  profile  fp16 and W4A16 (RTN g128 + INT8 KV) engines (or --profile-modes) on the SHAPE with
           RANDOM weights, bs 1 and 64: the decode step's wall time with CUDA graphs, its graph
           replay alone, and per-kernel
           GPU time from torch.profiler with graphs off (a 66-token minus a 2-token generation,
           divided by 64 steps: the context phase cancels); the bandwidth floor = engine bytes /
           copy bandwidth
  hf       HF generate on the same fp16 model: eager (dynamic cache) and static cache (which
           transformers compiles itself), against our fp16 engine, bs 1 and 64, 128/128
  kvfit    at one KV budget, the largest running batch and tokens/s of an fp16 vs an int8 KV cache
           (64 requests of 1000 + 32 tokens)
  mixed    one in-flight mixed step (31 sequences decoding + a 528-token prompt joining, the
           trace's means) against the prompt prefilled alone and the batch decoding alone, with a
           per-category kernel profile of the mixed step
Usage: python3 benchmarks/engine_profile.py bw profile hf kvfit mixed --out $OUT [--shape llama2-7b]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_gpu as eg

from quantlab.engine import bench
from quantlab.engine.build import build_engine
from quantlab.engine.config import ENGINE_WEIGHTS, BuildSettings
from quantlab.engine.runtime import Engine
from quantlab.engine.sampling import SamplingParams

W4 = "W4A16_AWQ g128 (RTN int4_g128_sym)"


def _sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth(gib: float = 4.0) -> float:
    """GB/s of a device-to-device copy, counting read + write bytes (median of 10)."""
    n = int(gib * (1 << 30)) // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        _sync()
        times.append(s.elapsed_time(e) / 1e3)
    t = sorted(times[2:])[len(times[2:]) // 2]
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / t / 1e9


def _category(name: str) -> str:
    n = name.lower()
    for key, cat in (
        ("paged", "attention (decode kernel)"),
        ("decode_split", "attention (decode kernel)"),
        ("merge", "attention (decode kernel)"),
        ("prefill_kernel", "attention (prefill kernel)"),
        ("flash", "attention (sdpa)"),
        ("fmha", "attention (sdpa)"),
        ("attention", "attention (sdpa)"),
        ("rms_norm", "fused norm"),
        ("rope", "fused rope"),
        ("silu", "fused silu*up"),
        ("kv_write", "fused kv write"),
        ("quant", "activation quant"),
        ("reduce", "split-k reduce"),
        ("w4", "gemm"),
        ("w8", "gemm"),
        ("_w8g", "gemm"),
        ("gemm", "gemm"),
        ("gemv", "gemm"),
        ("nvjet", "gemm"),
        ("sm90", "gemm"),
        ("cutlass", "gemm"),
        ("mma", "gemm"),
        ("argmax", "sampling"),
    ):
        if key in n:
            return cat
    return "other torch ops"


def _kernel_times(e: Engine, bs: int, out_len: int) -> dict[str, tuple[float, int]]:
    """{kernel name: (total GPU us, count)} of one profiled generation (graphs off)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bench.bench_static(e, bs, 128, out_len)
    res: dict[str, tuple[float, int]] = {}
    for item in prof.key_averages():
        us = getattr(item, "self_device_time_total", None)
        if us is None:
            us = getattr(item, "self_cuda_time_total", 0.0)
        if us > 0:
            res[item.key] = (float(us), int(item.count))
    return res


def decode_profile(e: Engine, bs: int) -> dict[str, Any]:
    """Step wall time (graphs), graph replay, and per-kernel GPU time per decode step (graphs off)."""
    full = bench.bench_static(e, bs, 128, 66)
    short = bench.bench_static(e, bs, 128, 2)
    step_ms = (full.latency_ms - short.latency_ms) / 64
    replay_ms = eg.replay_ms(e, bs)
    graphs, e.graphs = e.graphs, None
    try:
        a, b = _kernel_times(e, bs, 66), _kernel_times(e, bs, 2)
    finally:
        e.graphs = graphs
    per: dict[str, list[float]] = {}
    for k, (us, n) in a.items():
        us0, n0 = b.get(k, (0.0, 0))
        per[k] = [(us - us0) / 64 / 1e3, (n - n0) / 64]
    cats: dict[str, float] = defaultdict(float)
    for k, (ms, _) in per.items():
        cats[_category(k)] += ms
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:14]
    return {
        "batch_size": bs,
        "decode_step_ms": step_ms,
        "graph_replay_ms": replay_ms,
        "kernel_ms_per_step": sum(v[0] for v in per.values()),
        "kernels_per_step": sum(v[1] for v in per.values()),
        "by_category_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels": [
            {"name": k[:90], "ms": v[0], "per_step": v[1], "category": _category(k)} for k, v in top
        ],
    }


def _engine(model: Any, mode: str, work: Path, kv: str, batch: int, **kw: Any) -> Path:
    tag = "".join(c for c in mode.split()[0] if c.isalnum())
    ckpt, eng = work / f"p-ckpt-{tag}", work / f"p-engine-{tag}-{kv}"
    if not ckpt.is_dir():
        eg.export(model, eg.MODES[mode], eg._windows(16, 512, eg.SHAPE["vocab_size"]), ckpt)
        torch.cuda.empty_cache()
    s = BuildSettings(max_batch_size=batch, max_input_len=kw.get("max_input_len", 2048),
                      max_seq_len=kw.get("max_seq_len", 4096), max_num_tokens=8192,
                      kv_cache_dtype=kv, kv_cache_mem_gb=kw.get("kv_gb", 20.0))  # fmt: skip
    build_engine(ckpt, eng, s, overwrite=True, show_progress=False)
    return eng


def stage_profile(model: Any, work: Path, bw: float | None, prefixes: list[str]) -> None:
    """Decode-step profiles at bs 1 and 64 of the engines whose mode names start with a prefix
    (default fp16 and W4A16 + INT8 KV); KV "auto" (the checkpoint's) except fp16's fp16 cache."""
    modes = [m for m in eg.MODES if any(m.startswith(p) for p in prefixes)]
    for mode, kv in [(m, "fp16" if m == "fp16" else "auto") for m in modes]:
        try:
            eng = _engine(model, mode, work, kv, 64)
            e = Engine(eng, device="cuda")
            bench.warm_up(e)
            gb = (eng / ENGINE_WEIGHTS).stat().st_size / 1e9
            for bs in (1, 64):
                r = decode_profile(e, bs)
                r.update(mode=mode, kv=e.cfg.kv_storage, engine_gb=gb)
                if bw:
                    r["copy_bw_gbs"] = bw
                    r["floor_ms"] = gb / bw * 1e3
                    r["step_over_floor"] = r["decode_step_ms"] / r["floor_ms"]
                eg.record({"stage": "profile", **r})
            del e
            gc.collect()
        except Exception as exc:
            eg.record({"stage": "profile", "mode": mode, "error": repr(exc)[:800]})
        torch.cuda.empty_cache()


def _hf_static(model: Any, bs: int, inp: int, out: int) -> dict[str, Any]:
    """HF generate with a static cache, which transformers compiles (reduce-overhead) in the two
    untimed warm-up generations of the same shapes."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, eg.SHAPE["vocab_size"], (bs, inp), generator=g).cuda()
    kw = {"max_new_tokens": out, "min_new_tokens": out, "do_sample": False, "pad_token_id": 0,
          "cache_implementation": "static"}  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(2):
        model.generate(ids, **kw)
    _sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    _sync()
    dt = time.perf_counter() - t0
    return {"batch_size": bs, "input_len": inp, "output_len": out, "latency_ms": dt * 1e3,
            "tokens_per_s": bs * out / dt, "warm_up_s": warm,
            "compiled": hasattr(model, "_compiled_call")}  # fmt: skip


def stage_hf(model: Any, work: Path, batches: list[int]) -> None:
    """Our fp16 engine, HF eager, HF static + compile: same model, same process, 128/128."""
    try:
        eng = _engine(model, "fp16", work, "fp16", max(batches))
        e = Engine(eng, device="cuda")
        bench.warm_up(e)
        for bs in batches:
            eg.record({"stage": "hf", "impl": "quantlab fp16", **bench.bench_static(e, bs, 128, 128).__dict__})  # fmt: skip
        del e
        gc.collect()
        torch.cuda.empty_cache()
    except Exception as exc:
        eg.record({"stage": "hf", "impl": "quantlab fp16", "error": repr(exc)[:800]})
    for bs in batches:
        try:
            eg.record({"stage": "hf", "impl": "HF eager", **eg._hf_row(model, bs, 128, 128)})
        except Exception as exc:
            eg.record({"stage": "hf", "impl": "HF eager", "error": repr(exc)[:800]})
    # transformers compiles the decode forward itself under a static cache (its auto-compile;
    # reduce-overhead CUDA graphs). A torch.compile of model.forward by hand, run 7's attempt,
    # failed: the prefill's graph output was read after a decode replay had overwritten it.
    for bs in batches:
        try:
            eg.record({"stage": "hf", "impl": "HF static+compile", **_hf_static(model, bs, 128, 128)})  # fmt: skip
        except Exception as exc:
            eg.record({"stage": "hf", "impl": "HF static+compile", "error": repr(exc)[:800]})


def stage_kvfit(model: Any, work: Path, gb: float) -> None:
    """64 requests of 1000 prompt + 32 new tokens at a gb KV budget: fp16 vs int8 KV cache."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, eg.SHAPE["vocab_size"], (64, 1000), generator=g).tolist()
    for kv in ("fp16", "int8"):
        try:
            eng = _engine(model, "fp16", work, kv, 64, kv_gb=gb, max_input_len=1024,
                          max_seq_len=1088)  # fmt: skip
            e = Engine(eng, device="cuda")
            bench.warm_up(e)
            e.scheduler.peak_running = 0
            _sync()
            t0 = time.perf_counter()
            outs = e.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
            _sync()
            dt = time.perf_counter() - t0
            eg.record({"stage": "kvfit", "kv": kv, "kv_budget_gib": gb,
                       "blocks": e.cache.allocator.num_blocks, "peak_running": e.scheduler.peak_running,
                       "requests": len(outs), "seconds": dt,
                       "output_tokens_per_s": sum(len(o.token_ids) for o in outs) / dt})  # fmt: skip
            del e
            gc.collect()
            shutil.rmtree(eng, ignore_errors=True)
        except Exception as exc:
            eg.record({"stage": "kvfit", "kv": kv, "error": repr(exc)[:800]})
        torch.cuda.empty_cache()


def _step_anatomy(e: Engine, label: str) -> dict[str, Any]:
    """Wall ms of the engine's next step and its GPU kernel ms by category (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    if e.lookahead:
        raise ValueError("_step_anatomy needs look-ahead off: the step would queue the next one")
    _sync()
    t0 = time.perf_counter()
    on_gpu = e.device.type == "cuda"  # CPU (a dry run): the CPU ops' times instead
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        e.step()
        _sync()
    wall = (time.perf_counter() - t0) * 1e3
    cats: dict[str, float] = defaultdict(float)
    n = 0
    for item in prof.key_averages():
        us = getattr(item, "self_device_time_total", 0) if on_gpu else item.self_cpu_time_total
        cats[_category(item.key)] += float(us) / 1e3
        n += int(item.count) if us else 0
    return {"step": label, "wall_ms_profiled": wall, "kernel_ms": sum(cats.values()),
            "kernels": n, "by_category_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}  # fmt: skip


HOST_PROFILE = os.environ.get("QUANTLAB_HOST_PROFILE") == "1"
DISPATCH_AB = os.environ.get("QUANTLAB_DISPATCH_AB") == "1"  # mixed: dispatcher vs direct calls
BIND_AB = os.environ.get("QUANTLAB_BIND_AB") == "1"  # mixed: bound W4 launches vs checked calls


def _host_profile(e: Engine, fresh: Any, running: int, prompt: int, four: Any, one: Any) -> None:
    """cProfile of one eager decode step and one mixed step: the top functions by own time."""
    import cProfile
    import io
    import pstats

    for j in range(running):
        e.add_request(fresh(128, 7000 + j), four)
    e.step()
    for label in ("decode (eager)", "mixed"):
        if label == "mixed":
            e.add_request(fresh(prompt, 777), one)
        _sync()
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        e.step()
        pr.disable()
        host = (time.perf_counter() - t0) * 1e3
        _sync()
        wall = (time.perf_counter() - t0) * 1e3
        buf = io.StringIO()
        st = pstats.Stats(pr, stream=buf)
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(40)
        eg.record({"stage": "host", "step": label, "host_ms": host, "wall_ms": wall})
        print(buf.getvalue(), flush=True)
    while e.scheduler.has_work():
        e.step()


def stage_mixed(model: Any, work: Path, running: int, prompt: int) -> None:
    """One in-flight mixed step taken apart (W4A16 + INT8 KV, the trace's engine): `running`
    sequences decoding while a `prompt`-token request joins, against the same prompt prefilled
    alone and the same batch decoding alone. Wall times unprofiled (median of 5 rounds after one
    warm-up round), then one profiled step of each kind by kernel category (CUDA graphs off)."""
    eng = _engine(model, W4, work, "auto", 32)
    # look-ahead off: each timed step must be that one step, not one that queues the next
    e = Engine(eng, device="cuda", lookahead=False)
    bench.warm_up(e)
    vocab = eg.SHAPE["vocab_size"]
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    four = SamplingParams(max_new_tokens=4, ignore_eos=True)  # prefill, decode, mixed, one more

    def fresh(n: int, seed: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    def timed_step() -> float:
        _sync()
        t0 = time.perf_counter()
        e.step()
        _sync()
        return (time.perf_counter() - t0) * 1e3

    def drain() -> None:
        while e.scheduler.has_work():
            e.step()

    if DISPATCH_AB:  # the same rounds with the kernels' ops through the dispatcher, then direct
        from quantlab.kernels import ops

        for via_op in (True, False, True, False):
            ops._DISPATCH_ALWAYS = via_op
            _mixed_rounds(e, fresh, timed_step, drain, running, prompt, one, four, via_op)
        return
    if BIND_AB:  # the same rounds with the W4 linears' launches bound (the default), then unbound
        from quantlab.engine import linear

        for bind in (True, False, True, False):
            linear.BIND = bind
            _mixed_rounds(e, fresh, timed_step, drain, running, prompt, one, four, None, bind)
        linear.BIND = True
        return
    _mixed_rounds(e, fresh, timed_step, drain, running, prompt, one, four, None)
    graphs, e.graphs = e.graphs, None  # eager, so the decode kernels show one by one
    try:
        if HOST_PROFILE:  # where the host time of an eager mixed step goes (cProfile)
            _host_profile(e, fresh, running, prompt, four, one)
        for j in range(running):
            e.add_request(fresh(128, 9000 + j), four)
        e.step()
        eg.record({"stage": "mixed", **_step_anatomy(e, "decode (eager)")})
        e.add_request(fresh(prompt, 999), one)
        eg.record({"stage": "mixed", **_step_anatomy(e, "mixed")})
        drain()
    finally:
        e.graphs = graphs


def _mixed_rounds(
    e: Engine, fresh: Any, timed_step: Any, drain: Any, running: int, prompt: int, one: Any,
    four: Any, via_op: bool | None, bound: bool | None = None,
) -> None:  # fmt: skip
    """Median wall ms of 5 rounds (after one warm-up) of: the prompt alone, the batch decoding
    alone, the batch's decode rows + the joining prompt in one step."""
    rows: dict[str, list[float]] = {"prefill alone": [], "decode alone": [], "mixed": []}
    for i in range(6):
        e.add_request(fresh(prompt, 100 + i), one)
        t = timed_step()  # the prompt alone: one prefill step
        drain()
        for j in range(running):
            e.add_request(fresh(128, 1000 * i + j), four)
        e.step()  # the batch's prompts (running x 128 tokens <= max_num_tokens)
        d = timed_step()  # the batch decoding alone
        e.add_request(fresh(prompt, 300 + i), one)
        mx = timed_step()  # its decode rows + the joining prompt in one step
        drain()
        if i:
            for k, v in zip(rows, (t, d, mx), strict=True):
                rows[k].append(v)
    eg.record({"stage": "mixed", "running": running, "prompt": prompt, "ops_via_dispatcher": via_op,
               "w4_bound": bound, **{f"{k} ms": sorted(v)[len(v) // 2] for k, v in rows.items()}})  # fmt: skip


def main() -> None:
    """Run the stages given on the command line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="+", choices=["bw", "profile", "hf", "kvfit", "mixed"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=".gpuwork")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(eg.SHAPES))
    ap.add_argument("--hf-batches", default="1,64")
    ap.add_argument("--kv-gb", type=float, default=4.0)
    ap.add_argument("--profile-modes", default="fp16,W4A16_AWQ", help="mode prefixes (profile)")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    eg.ROWS = out / "profile_rows.jsonl"
    eg.SHAPE = eg.SHAPES[args.shape]
    eg.record({"stage": "meta", "date": str(datetime.date.today()), "argv": sys.argv,
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "shape": args.shape})  # fmt: skip
    bw = None
    if "bw" in args.stages:
        bw = copy_bandwidth()
        eg.record({"stage": "bw", "copy_gbs": bw})
    model = eg.random_llama({**eg.SHAPE, "max_position_embeddings": 4096}, 32)
    for stage in args.stages:
        t0 = time.perf_counter()
        if stage == "profile":
            stage_profile(model, work, bw, args.profile_modes.split(","))
        elif stage == "kvfit":
            stage_kvfit(model, work, args.kv_gb)
        elif stage == "mixed":
            stage_mixed(model, work, 31, 528)
        elif stage == "hf":  # last: it compiles the model's forward in place
            stage_hf(model, work, [int(b) for b in args.hf_batches.split(",")])
        print(f"stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

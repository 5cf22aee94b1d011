"""The engine on CPU: exported checkpoint -> `quantlab build` -> runtime, against the simulated model,
HF transformers, and itself (batched vs alone)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantlab.engine.build import build_engine
from quantlab.engine.config import BuildSettings
from quantlab.engine.runtime import Engine
from quantlab.engine.sampling import SamplingParams
from quantlab.errors import InputError
from quantlab.export.reload import half_keeping_input_scales, load_quantized
from quantlab.pipeline import run_recipe
from quantlab.recipe import Recipe

SQ = {"calibrator": "smoothquant", "args": {"alpha": 0.5}}
STEPS: dict[str, list[dict[str, Any]]] = {
    "W8A16": [{"calibrator": "rtn", "args": {"format": "int8_channel"}}],
    "W4A16": [{"calibrator": "rtn", "args": {"format": "int4_channel"}}],
    "W4A16_AWQ": [{"calibrator": "awq", "args": {"format": "int4_g32_sym"}}],
    "W4A16_GPTQ": [
        {
            "calibrator": "gptq",
            "args": {"format": "int4_g32_asym", "act_order": True, "static_groups": True},
        }
    ],
    "W8A16_GPTQ": [{"calibrator": "gptq", "args": {"format": "int8_g32_sym"}}],
    "W8A16_GPTQ_ASYM": [{"calibrator": "gptq", "args": {"format": "int8_g32_asym"}}],
    "FP8": [{"calibrator": "fp8", "args": {}}],
    "FP8_PER_CHANNEL_PER_TOKEN": [
        {"calibrator": "fp8", "args": {"weights": "channel", "activations": "dynamic_token"}}
    ],
    "W8A8_SQ_PER_CHANNEL": [SQ],
    "W8A8_SQ_PER_TENSOR_PLUGIN": [{**SQ, "args": {"alpha": 0.5, "weights": "tensor"}}],
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": [
        {**SQ, "args": {"alpha": 0.5, "activations": "dynamic_token"}}
    ],
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": [
        {**SQ, "args": {"alpha": 0.5, "weights": "tensor", "activations": "dynamic_token"}}
    ],
    "INT8KV": [
        {"calibrator": "rtn", "args": {"format": "int4_g32_asym"}},
        {"calibrator": "kv_cache", "args": {"format": "int8"}},
    ],
    "FP8KV": [
        {"calibrator": "fp8", "args": {}},
        {"calibrator": "kv_cache", "args": {"format": "fp8"}},
    ],
    "FLOAT": [{"calibrator": "kv_cache", "args": {"format": "int8"}}],  # quant_algo null
}
SETTINGS = BuildSettings(max_batch_size=4, max_input_len=96, max_seq_len=160, block_size=16)


@pytest.fixture(scope="module")
def engine_for(
    tiny_model: Callable[[str], Path],
    embedded_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    emma: Path,
    pride: Path,
) -> Callable[..., tuple[Path, Path]]:
    """(family, algo, export dtype) -> (run folder, engine folder), cached per module."""
    made: dict[tuple[str, str, str], tuple[Path, Path]] = {}

    def make(family: str, algo: str, dtype: str = "float16") -> tuple[Path, Path]:
        key = (family, algo, dtype)
        if key not in made:
            root = tmp_path_factory.mktemp(f"eng-{family}-{algo}")
            data = {"source": "file", "num_samples": 4, "seq_len": 64, "bos_id": 0}
            recipe = Recipe.model_validate(
                {
                    "name": f"tiny-{algo}",
                    "model": {
                        "source": str(embedded_dir if family == "smollm2" else tiny_model(family))
                    },
                    "calibration": {**data, "path": str(emma)},
                    "steps": STEPS[algo],
                    "export": {"output_dir": str(root / "run"), "dtype": dtype},
                    "evaluation": {"enabled": False},
                }
            )
            run_recipe(recipe, root, show_progress=False)
            kv = "fp32" if dtype == "float32" else "auto"
            s = BuildSettings(**{**SETTINGS.__dict__, "kv_cache_dtype": kv})
            build_engine(root / "run", root / "engine", s, show_progress=False)
            made[key] = (root / "run", root / "engine")
        return made[key]

    return make


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.mark.parametrize(
    ("family", "algo"),
    [("llama", a) for a in STEPS if a != "FLOAT"]
    + [("qwen2", "W4A16_GPTQ"), ("qwen2", "W8A8_SQ_PER_CHANNEL"), ("mistral", "FP8KV")],
)
def test_engine_logits_match_simulated_model(
    engine_for: Callable[..., tuple[Path, Path]], family: str, algo: str
) -> None:
    """The fp16 engine reproduces the simulated QuantLinear model (fp32) of the same QuantState as
    closely as that simulated model run in fp16 reproduces itself: the only difference allowed is
    the activation dtype's rounding (a wrong code, scale, zero or layout is far outside it)."""
    run, eng = engine_for(family, algo)
    e = Engine(eng)
    if algo.startswith("W8A16_GPTQ"):  # group-wise int8 runs on its kernel, not dequantized
        kinds = {m["kind"] for n, m in e.cfg.linears.items() if n != "lm_head"}
        assert kinds == {"w8a16_group"}, kinds
    tok = AutoTokenizer.from_pretrained(str(run / "quantlab"))
    ids = [0, *tok(PROMPT, add_special_tokens=False).input_ids]
    got = e.score(ids)
    sim, _ = load_quantized(run / "quantlab")
    sim16 = half_keeping_input_scales(load_quantized(run / "quantlab")[0])
    with torch.no_grad():
        want = sim(input_ids=torch.tensor([ids])).logits[0].float()
        half = sim16(input_ids=torch.tensor([ids])).logits[0].float()
    engine_err, dtype_err = _rel(got, want), _rel(half, want)
    assert engine_err < 1.5 * dtype_err + 1e-3, (engine_err, dtype_err)
    assert engine_err < 0.05
    # random tiny models have near-tied logits: a few top-1 flips are rounding, not a bug
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.8


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_unquantized_engine_reproduces_hf_greedy(
    engine_for: Callable[..., tuple[Path, Path]], tiny_model: Callable[[str], Path], family: str
) -> None:
    run, eng = engine_for(family, "FLOAT", "float32")
    e = Engine(eng)
    assert e.cfg.quant_algo is None and e.cfg.kv_storage == "fp32"
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model(family)), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(run / "quantlab"))
    prompts = [tok(t, add_special_tokens=False).input_ids for t in (PROMPT, "Emma Woodhouse")]
    outs = e.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for p, out in zip(prompts, outs, strict=True):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0
        )[0, len(p) :].tolist()
        assert out.token_ids == ref


def test_inflight_batching_gives_each_request_its_alone_tokens(
    engine_for: Callable[..., tuple[Path, Path]],
) -> None:
    """Requests that join and leave a running batch, prefilled in chunks (max_num_tokens 24) and
    preempted when the pool runs dry, get the tokens they get alone (greedy and seeded sampling),
    with decode steps queued one step ahead (quantlab/engine/ahead.py) and a stop token that ends
    a request while its next step is already queued."""
    run, _ = engine_for("llama", "INT8KV")
    eng = run.parent / "engine-small"
    small = BuildSettings(
        max_batch_size=3,
        max_input_len=96,
        max_seq_len=128,
        max_num_tokens=24,
        block_size=16,
        kv_cache_mem_gb=10 * 2 * 2 * 16 * 2 * 32 / 2**30,  # 10 blocks of 16 tokens (int8 KV)
    )
    build_engine(run, eng, small, show_progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (50, 7, 30, 12, 70)]
    params = [
        SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)
        for n, kw in zip(
            (40, 12, 25, 30, 8),
            (
                {},
                {"temperature": 0.8, "seed": 1},
                {},
                {"temperature": 1.0, "top_k": 5, "seed": 2},
                {},
            ),
            strict=True,
        )
    ]
    alone = Engine(eng, lookahead=False)
    expect = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    # request 3 (sampled; greedy ones repeat one token) now stops on the first token it has not
    # drawn in its first 20 steps
    out3 = expect[3]
    stop = next(t for i, t in enumerate(out3) if i >= 20 and t not in out3[:i])
    params[3] = SamplingParams(
        max_new_tokens=30, ignore_eos=True, temperature=1.0, top_k=5, seed=2, stop_token_ids=(stop,)
    )
    expect[3] = out3[: out3.index(stop) + 1]
    assert 20 < len(expect[3]) < 30  # it stops on a decode step
    batched = Engine(eng, lookahead=True)
    together = batched.generate(prompts, params)
    assert batched.cache.allocator.num_blocks == 10
    assert sum(o.preemptions for o in together) > 0  # the pool forced a preemption
    assert batched.step_stats["decode (ahead)"][0] > 10  # steps were queued ahead
    assert [o.token_ids for o in together] == expect
    assert together[3].finish_reason == "stop"
    before = batched.ahead_dropped
    assert batched.generate([prompts[3]], params[3])[0].token_ids == expect[3]
    assert batched.ahead_dropped == before + 1  # alone, it stops with its next step queued
    pair = batched.generate([prompts[3], prompts[2]], [params[3], params[2]])
    assert [o.token_ids for o in pair] == [expect[3], expect[2]]
    assert batched.ahead_dropped == before + 2  # its row dropped, request 2's kept
    assert batched.cache.allocator.free == batched.cache.allocator.num_blocks - 1  # all freed


def test_equal_prompts_prefill_in_one_attention_call(
    engine_for: Callable[..., tuple[Path, Path]],
) -> None:
    """Three prompts of one length prefill together (one batched causal attention per layer) and
    get the tokens each gets alone; the run grouping is what makes that call."""
    from quantlab.engine.model import SeqSlice, fresh_prompt_runs

    e = torch.empty(0)
    seqs = [
        SeqSlice(0, 5, 5, e),
        SeqSlice(5, 5, 5, e),
        SeqSlice(10, 1, 9, e),
        SeqSlice(11, 5, 5, e),
    ]
    assert fresh_prompt_runs(seqs) == [seqs[:2]]  # the decode row breaks the run
    _, eng = engine_for("llama", "INT8KV")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (21,), generator=g).tolist() for _ in range(3)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = Engine(eng).generate(prompts, params)
    for p, out in zip(prompts, together, strict=True):
        assert Engine(eng).generate([p], params)[0].token_ids == out.token_ids


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_cache_doubles_the_batch_that_fits(
    engine_for: Callable[..., tuple[Path, Path]], kv: str
) -> None:
    """At one KV budget (12 fp16 blocks), an int8 / fp8 cache runs twice the concurrent requests of
    an fp16 cache, and gives the same greedy tokens to the requests both run."""
    from quantlab.engine.kv_cache import kv_bytes_per_block
    from quantlab.engine.runtime import load_engine_config

    run, built = engine_for("llama", "FP8KV" if kv == "fp8" else "INT8KV")
    spec = load_engine_config(built).model
    per_block = kv_bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, "fp16")
    peaks, outs = {}, {}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (20,), generator=g).tolist() for _ in range(16)]
    for storage in ("fp16", kv):
        eng = run.parent / f"engine-fit-{storage}"
        s = BuildSettings(max_batch_size=16, max_input_len=96, max_seq_len=128, block_size=16,
                          kv_cache_dtype=storage, kv_cache_mem_gb=12 * per_block / 2**30)  # fmt: skip
        build_engine(run, eng, s, show_progress=False, overwrite=True)
        e = Engine(eng)
        outs[storage] = e.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
        peaks[storage] = e.scheduler.peak_running
        assert e.cache.allocator.num_blocks == (12 if storage == "fp16" else 24)
    # 2 blocks per request (24 tokens), block 0 is scratch: 11 // 2 = 5 vs 23 // 2 = 11
    assert peaks == {"fp16": 5, kv: 11}
    assert all(len(o.token_ids) == 4 for o in outs[kv])


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from quantlab.cli import main

    rc = main(["--quiet", *argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_cli_build_generate_mem_bench(
    engine_for: Callable[..., tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The four verbs from the command line, on a W4 + INT8-KV checkpoint (CPU, eager)."""
    run, _ = engine_for("llama", "INT8KV")
    eng = tmp_path / "engine"
    shape = ["--max-batch-size", "2", "--max-input-len", "32", "--max-seq-len", "48"]
    rc, out, err = _cli(["build", str(run), "-o", str(eng), *shape, "--block-size", "16"], capsys)
    assert rc == 0, err
    assert "quant_algo W4A16_GPTQ" in out and "KV cache int8" in out and "w4a16" in out
    rc, out, err = _cli(
        ["generate", str(eng), "--input-text", "Emma", "--input-text", "Mr. Knightley said",
         "--max-output-len", "5", "--no-lookahead"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert 'Input [Text 1]: "Mr. Knightley said"' in out
    assert out.count("Output [Text") == 2
    missing = tmp_path / "no-tokenizer"  # a local path only, never looked up as a hub name
    rc, _, err = _cli(["generate", str(eng), "--input-text", "Emma", "--tokenizer", str(missing)],
                      capsys)  # fmt: skip
    assert rc == 2 and f"Tokenizer folder {missing} does not exist" in err, err
    rc, out, err = _cli(["mem", str(eng)], capsys)
    assert rc == 0, err
    assert "int8" in out and "W4A16" in out
    rc, out, err = _cli(
        ["bench", str(eng), "--batch-size", "1,2", "--input-output-len", "8,3;40,20",
         "--trace", "3,4,8,2,4"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith("[BENCHMARK]")]
    assert len(rows) == 4 and sum("skipped" in r for r in rows) == 2  # 40 + 20 > max_seq_len 48
    assert "tokensPerSec" in rows[0]
    assert [ln.split()[2] for ln in out.splitlines() if ln.startswith("[TRACE]")] == [
        "inflight",
        "static",
    ]


def _edited(run: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    import json
    import shutil

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("quantlab"))
    conf = json.loads((dst / "config.json").read_text())
    edit(conf)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--input-output-len", "128;256,64", "each ';'-separated item is INPUT,OUTPUT"),
        ("--input-output-len", "128,x", "expected comma-separated integers"),
        ("--batch-size", "1,0", "expected positive integers"),
        ("--trace", "8,64,32,4,8", "MIN <= MAX"),
        ("--trace", "8,16,32", "N,IN_MIN,IN_MAX,OUT_MIN,OUT_MAX"),
    ],
)
def test_bench_refuses_bad_arguments_before_loading(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Bad bench arguments: exit 2 with the cause, before the engine folder is even read (the
    folder here does not exist, so a later check would name it instead)."""
    rc, _, err = _cli(["bench", str(tmp_path / "no-engine"), flag, value], capsys)
    assert rc == 2 and says in err and "not an engine folder" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
@pytest.mark.parametrize(
    ("name", "says"),
    [("cuda", "sees no CUDA GPU"), ("cuda:1", "sees no CUDA GPU"), ("bogus", "is not a device")],
)
def test_engine_device_refuses_what_this_machine_lacks(name: str, says: str) -> None:
    """--device names a device this machine has, or gets one message (not a loader traceback)."""
    from quantlab.engine.runtime import engine_device

    with pytest.raises(InputError, match=says):
        engine_device(name)
    assert engine_device(None) == torch.device("cpu") == engine_device("cpu")


def test_build_refuses_bad_input_before_any_work(
    engine_for: Callable[..., tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Each bad input: exit 2, one message naming the cause and the fix, no engine folder."""
    w4, _ = engine_for("llama", "INT8KV")
    w8, _ = engine_for("llama", "W8A16")
    capsys.readouterr()  # the fixture's own progress output, when it builds here

    def algo(c: dict[str, Any]) -> None:
        c["quantization"]["quant_algo"] = "W3A16_MAGIC"

    def tp2(c: dict[str, Any]) -> None:
        c["mapping"] = {"world_size": 2, "tp_size": 2, "pp_size": 1}

    (tmp_path / "empty").mkdir()
    cases = [
        (_edited(w4, tmp_path / "algo", algo), [], "W3A16_MAGIC"),
        (_edited(w4, tmp_path / "tp2", tp2), [], "tp_size"),
        (w4, ["--kv-cache-mem-gb", "0.00001"], "--kv-cache-mem-gb"),
        (w8, ["--kv-cache-dtype", "int8"], "kv_cache step"),
        (w4, ["--kv-cache-dtype", "int4"], "int4"),
        (w4, ["--max-input-len", "200", "--max-seq-len", "100"], "max-input-len"),
        (tmp_path / "empty", [], "config.json"),
        (tmp_path / "missing", [], "missing"),
    ]
    for i, (ckpt, extra, needle) in enumerate(cases):
        out_dir = tmp_path / f"engine{i}"
        rc, _, err = _cli(["build", str(ckpt), "-o", str(out_dir), *extra], capsys)
        assert rc == 2, (extra, err)
        assert err.startswith("quantlab: error: ") and needle in err, (needle, err)
        assert "Traceback" not in err
        assert not out_dir.exists() and not list(tmp_path.glob(f".engine{i}*"))


def test_build_never_replaces_an_engine_without_overwrite(
    engine_for: Callable[..., tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    run, eng = engine_for("llama", "W8A16")
    before = (eng / "config.json").read_bytes()
    rc, _, err = _cli(["build", str(run), "-o", str(eng)], capsys)
    assert rc == 2 and "--overwrite" in err
    assert (eng / "config.json").read_bytes() == before


@pytest.mark.parametrize(
    ("algo", "dtype"),
    [
        pytest.param("FLOAT", "float32", marks=pytest.mark.slow),
        ("INT8KV", "float16"),
        ("W8A8_SQ_PER_CHANNEL", "float16"),
    ],
)
def test_fused_kernels_compute_the_torch_step(
    engine_for: Callable[..., tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    algo: str,
    dtype: str,
) -> None:
    """The engine's CUDA path with the fused kernels (run here by Triton's interpreter on CPU
    tensors) gives the torch step's logits and greedy tokens: fp32 cache, an INT8 cache, and
    SmoothQuant's static int8 inputs written by the norm kernel."""
    pytest.importorskip("triton")
    from quantlab.kernels import fused_ops

    import quantlab.engine.model as engine_model

    calls = []
    norm_quant = fused_ops.rms_norm_quant
    monkeypatch.setattr(
        fused_ops, "rms_norm_quant", lambda *a: calls.append(a[-1]) or norm_quant(*a)
    )

    run, eng = engine_for("llama", algo, dtype)
    tok = AutoTokenizer.from_pretrained(str(run / "quantlab"))
    ids = [0, *tok(PROMPT, add_special_tokens=False).input_ids]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = Engine(eng).score(ids)
    want_toks = Engine(eng).generate([ids[:20]], params)[0].token_ids
    monkeypatch.setattr(engine_model, "use_fused", lambda x: True)
    got = Engine(eng).score(ids)
    got_toks = Engine(eng).generate([ids[:20]], params)[0].token_ids
    # fp16: the norm's reduction order, and the prefill kernel's fp16 probabilities (SDPA on CPU
    # keeps them in fp32), which SmoothQuant's static int8 inputs turn into whole code steps
    tol = 1e-5 if dtype == "float32" else 1e-2 if algo.startswith("W8A8") else 2e-3
    assert _rel(got, want) < tol, _rel(got, want)
    assert got_toks == want_toks
    # qkv and gate_up of every layer take their codes from the norm under SmoothQuant, else none
    assert set(calls) == ({"int8"} if algo.startswith("W8A8") else set())


def test_paged_prefill_kernel_serves_inflight_chunks(
    engine_for: Callable[..., tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA step (run by Triton's interpreter on CPU tensors) sends the chunks of several
    sequences in one step through the paged prefill kernel, INT8 KV, and every request gets the
    greedy tokens of the torch step."""
    pytest.importorskip("triton")
    from quantlab.kernels import paged_prefill

    import quantlab.engine.model as engine_model

    run, _ = engine_for("llama", "INT8KV")
    eng = run.parent / "engine-chunks"
    s = BuildSettings(
        max_batch_size=3, max_input_len=64, max_seq_len=96, max_num_tokens=24, block_size=16
    )
    build_engine(run, eng, s, show_progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (20, 33, 9)]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    want = [o.token_ids for o in Engine(eng).generate(prompts, params)]
    sizes: list[int] = []
    kernel = paged_prefill.paged_prefill_attention
    monkeypatch.setattr(
        engine_model,
        "paged_prefill_attention",
        lambda *a, **kw: sizes.append(int(a[4].shape[0])) or kernel(*a, **kw),
    )
    monkeypatch.setattr(engine_model, "use_fused", lambda x: True)
    got = [o.token_ids for o in Engine(eng).generate(prompts, params)]
    assert max(sizes) >= 2  # one launch served the chunks of two or more sequences
    assert got == want


def test_engine_w4_linear_binds_once_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine W4A16 linear binds its launch once per (M bucket, dtype, backend), reuses it,
    drops it on .to(), and gives the checked path's outputs."""
    from quantlab.kernels import packing as kpacking

    from quantlab.engine import linear as engine_linear

    n, k, g = 32, 64, 32
    qw, s, _ = kpacking.w4_from_codes(
        torch.randint(-8, 8, (n, k), dtype=torch.int8), (torch.rand(n, k // g) + 0.1).half()
    )
    lin = engine_linear.EngineLinear(
        {"kind": "w4a16", "group_size": g},
        {"qweight": qw, "scales": s, "bias": torch.randn(n).half()},
    )
    binds: list[int] = []
    real = engine_linear.bind_w4a16

    def counting(x: torch.Tensor, *args: object) -> object:
        binds.append(x.shape[0])
        return real(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_linear, "bind_w4a16", counting)
    xs = [torch.randn(m, k).half() for m in (1, 1, 3, 4, 5)]  # buckets 1, 1, 4, 4, 8
    got = [lin(x) for x in xs]
    assert binds == [1, 3, 5] and len(lin.bound) == 3
    monkeypatch.setattr(engine_linear, "BIND", False)
    for x, y in zip(xs, got, strict=True):
        torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
    lin.to(torch.device("cpu"))
    assert not lin.bound

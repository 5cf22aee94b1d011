"""KV-cache INT8 / FP8: the attention wrapper, the kv_cache calibrator, export and reload."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from quantlab.calibrators.kvcache import fp8_kv_scale, int8_kv_scale
from safetensors.torch import load_file
from torch import nn

from quantlab.adapters import adapter_for
from quantlab.attention import (
    KVCacheSpec,
    fake_quant_kv,
    install_kv_attention,
    kv_attention_active,
    kv_spec,
    record_kv,
    set_kv_quant,
)
from quantlab.calibrator import build_calibrator
from quantlab.data import DataSpec, load_windows
from quantlab.errors import InputError
from quantlab.evaluate import compare_models
from quantlab.export.reload import load_quantized
from quantlab.export.trtllm import kv_cache_quant_algo
from quantlab.models import load_model
from quantlab.pipeline import run_recipe
from quantlab.recipe import Recipe
from quantlab.runner import RunnerConfig, quantize_model
from quantlab.state import ModuleState, QuantState

QMAX = {"int8": 127.0, "fp8": 448.0}


def small_llama(impl: str = "sdpa", seed: int = 0) -> nn.Module:
    """A 2-layer GQA Llama (4 heads, 2 KV heads, head_dim 16) with the given attention implementation."""
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary embedding of x [B, H, L, D] with cos/sin [B, L, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def quant_by_hand(x: torch.Tensor, fmt: str, s: float) -> torch.Tensor:
    if fmt == "int8":
        return torch.round(x / s).clamp(-128, 127) * s
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def attention_by_hand(
    attn: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: tuple[str, float] | None,
) -> torch.Tensor:
    """Causal GQA attention of one Llama attention module, written out; kv = (format, scale) or None."""
    b, n, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, n, -1, d).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv is not None:
        k, v = quant_by_hand(k, *kv), quant_by_hand(v, *kv)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    scores = scores + torch.full((n, n), float("-inf")).triu(1)
    o = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.o_proj(o)  # type: ignore[no-any-return]


# ---- scale math ------------------------------------------------------------------------------


def test_scale_conventions() -> None:
    k, v = torch.tensor([3.0]), torch.tensor([12.7])
    assert torch.equal(int8_kv_scale(k, v), torch.tensor([12.7]) / 127)
    # ModelOpt's FP8 floor: amax below 448 gives 1.0; above it, amax / 448 of the larger of K, V.
    assert torch.equal(fp8_kv_scale(k, v), torch.tensor([1.0]))
    assert torch.equal(fp8_kv_scale(torch.tensor([896.0]), v), torch.tensor([2.0]))
    assert torch.equal(fp8_kv_scale(k, v, clamp=False), torch.tensor([12.7]) / 448)
    assert torch.equal(int8_kv_scale(torch.zeros(1), torch.zeros(1)), torch.ones(1))
    with pytest.raises(InputError):
        KVCacheSpec("int4", torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(InputError):
        KVCacheSpec("int8", torch.zeros(1))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fake_quant_kv_is_the_hand_rounding(fmt: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 17, 16) * 4
    s = float(x.abs().max()) / QMAX[fmt]
    got = fake_quant_kv(x, KVCacheSpec(fmt, torch.tensor([s])))  # type: ignore[arg-type]
    torch.testing.assert_close(got, quant_by_hand(x, fmt, s), rtol=0, atol=1e-6)
    # Saturation: a value beyond the range lands on the largest code, not on inf or a wrapped code.
    big = fake_quant_kv(torch.tensor([1e6, -1e6]), KVCacheSpec(fmt, torch.tensor([1.0])))  # type: ignore[arg-type]
    assert big.tolist() == ([127.0, -128.0] if fmt == "int8" else [448.0, -448.0])


# ---- the wrapper ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_wrapper_without_spec_is_bit_identical_and_leaves_the_original_alone(impl: str) -> None:
    model = small_llama(impl)
    ids = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the wrapper must build the same (non-causal-skip) mask
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        quant = copy.deepcopy(model)
        install_kv_attention(quant)
        assert kv_attention_active(quant) and not kv_attention_active(model)
        assert model.config._attn_implementation == impl
        assert quant.config._attn_implementation == f"quantlab_kv_{impl}"
        assert torch.equal(quant(input_ids=ids, attention_mask=mask).logits, ref)
        # A spec on the copy changes the copy only.
        set_kv_quant(quant.model.layers[0].self_attn, KVCacheSpec("int8", torch.tensor([0.02])))
        assert not torch.equal(quant(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_recorded_key_is_after_rope() -> None:
    model = small_llama()
    ids = torch.randint(0, 101, (1, 19), generator=torch.Generator().manual_seed(2))
    layer = model.model.layers[1]
    raw: dict[str, torch.Tensor] = {}
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [
        getattr(layer.self_attn, p).register_forward_hook(
            lambda _m, _a, out, p=p: raw.__setitem__(p, out.detach())
        )
        for p in ("k_proj", "v_proj")
    ]
    with torch.no_grad(), record_kv(layer, lambda n, k, v: seen.append((n, k, v))):
        model(input_ids=ids)
        cos, sin = model.model.rotary_emb(raw["k_proj"], torch.arange(19)[None])
    for h in hooks:
        h.remove()
    assert [n for n, _, _ in seen] == ["self_attn"]
    _, key, value = seen[0]
    k_proj = raw["k_proj"].view(1, 19, 2, 16).transpose(1, 2)
    torch.testing.assert_close(key, rope(k_proj, cos, sin), rtol=1e-5, atol=1e-6)
    assert (key - k_proj).abs().max() > 0.1 * k_proj.abs().max()  # not the raw projection
    assert torch.equal(value, raw["v_proj"].view(1, 19, 2, 16).transpose(1, 2))
    # The recorder is gone afterwards.
    seen.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert not seen


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_attention_equals_hand_reference(fmt: str) -> None:
    model = small_llama()
    attn = model.model.layers[0].self_attn
    torch.manual_seed(3)
    h = torch.randn(1, 21, 64) * 3
    cos, sin = model.model.rotary_emb(h, torch.arange(21)[None])
    with torch.no_grad():
        k = rope(attn.k_proj(h).view(1, 21, -1, 16).transpose(1, 2), cos, sin)
        amax = max(float(k.abs().max()), float(attn.v_proj(h).abs().max()))
        s = amax / QMAX[fmt]  # a calibrated scale (unclamped, so FP8 uses its whole range)
        float_out = attn(h, position_embeddings=(cos, sin), attention_mask=None)[0]
        torch.testing.assert_close(
            float_out, attention_by_hand(attn, h, cos, sin, None), rtol=1e-5, atol=1e-5
        )
        set_kv_quant(attn, KVCacheSpec(fmt, torch.tensor([s])))  # type: ignore[arg-type]
        q_out = attn(h, position_embeddings=(cos, sin), attention_mask=None)[0]
        ref = attention_by_hand(attn, h, cos, sin, (fmt, s))
    torch.testing.assert_close(q_out, ref, rtol=1e-5, atol=1e-5)
    rel = float((q_out - float_out).norm() / float_out.norm())
    # INT8 with s = amax/127 and E4M3 (3 mantissa bits) both perturb the output by a small,
    # non-zero amount (measured 0.7% and 2.7% relative).
    assert 1e-4 < rel < (0.02 if fmt == "int8" else 0.06), rel


# ---- calibration through the Runner ------------------------------------------------------------


@pytest.fixture
def tiny(tiny_model: Callable[[str], Path], emma: Path):  # type: ignore[no-untyped-def]
    model, tok = load_model(str(tiny_model("llama")))
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=3, seq_len=48, bos_id=0), tok
    )
    return model, adapter_for(model), windows


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_scales_bound_every_observed_key_and_value(tiny: Any, fmt: str) -> None:
    model, adapter, windows = tiny
    quant = copy.deepcopy(model)
    args = {"format": fmt, "clamp_fp8_scale": False}
    state = quantize_model(
        quant,
        adapter,
        windows,
        [build_calibrator("kv_cache", args)],
        RunnerConfig(show_progress=False),
    )
    # The reference keeps its own attention; the quantized copy runs through the wrapper.
    assert model.config._attn_implementation == "sdpa"
    assert quant.config._attn_implementation == "quantlab_kv_sdpa"
    assert sorted(state.modules) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # Re-run the calibration windows through the finished model and record what each layer caches.
    seen: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for i, layer in enumerate(quant.model.layers):
            stack.enter_context(
                record_kv(
                    layer,
                    lambda _n, k, v, i=i: seen.setdefault(f"{i}", []).append(
                        torch.stack([k.abs().max(), v.abs().max()])
                    ),
                )
            )
        for w in windows:
            quant(input_ids=w.view(1, -1))
    for i in range(2):
        ms = state.modules[f"model.layers.{i}.self_attn"]
        assert ms.meta["kv_format"] == fmt and ms.meta["k_point"] == "after_rope"
        spec = kv_spec(quant.model.layers[i].self_attn)
        assert spec is not None and spec.format == fmt
        assert torch.equal(spec.scale, ms.tensors["kv_cache_scaling_factor"])
        k_obs, v_obs = torch.stack(seen[f"{i}"]).amax(dim=0)
        # The finished model computes what the Runner propagated: same K and V maxima.
        torch.testing.assert_close(ms.tensors["k_amax"], k_obs.reshape(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(ms.tensors["v_amax"], v_obs.reshape(1), rtol=1e-5, atol=0)
        s = float(ms.tensors["kv_cache_scaling_factor"])
        # Bounded: no cached value quantizes beyond the format's range ...
        assert max(float(k_obs), float(v_obs)) / s <= QMAX[fmt] * (1 + 1e-6)
        # ... and the scale is tight: the larger of K and V reaches the top code.
        assert max(float(k_obs), float(v_obs)) / s >= QMAX[fmt] * (1 - 1e-5)


def small_v(model: nn.Module, factor: float = 8.0) -> nn.Module:
    """A copy of model computing the same function with V `factor` times smaller (o_proj compensates).

    The tiny random model's K and V have similar ranges; SmolLM2's V is up to 18x smaller than K.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.div_(factor)
            layer.self_attn.o_proj.weight.mul_(factor)
    return model


def test_equalize_keeps_the_float_model_and_gives_v_the_range_of_k(tiny: Any) -> None:
    model, adapter, windows = tiny
    model = small_v(model)
    quant = copy.deepcopy(model)
    steps = [build_calibrator("kv_equalize", {}), build_calibrator("kv_cache", {"format": "int8"})]
    state = quantize_model(quant, adapter, windows, steps, RunnerConfig(show_progress=False))
    for i in range(2):
        ms = state.modules[f"model.layers.{i}.self_attn"]
        c = float(ms.tensors["v_equalize_scale"])
        k0, v0 = ms.meta["v_equalized_from"]
        assert c == pytest.approx(k0 / v0, rel=1e-6) and c > 2
        # After the fold V spans K's range, so the one shared scale fits both.
        torch.testing.assert_close(ms.tensors["v_amax"], ms.tensors["k_amax"], rtol=1e-5, atol=0)
        assert float(ms.tensors["kv_cache_scaling_factor"]) == pytest.approx(k0 / 127, rel=1e-5)
    # The fold is exact in float: with the KV specs removed, the logits are the original model's.
    for layer in quant.model.layers:
        delattr(layer.self_attn, "quantlab_kv_spec")
    with torch.no_grad():
        for w in windows:
            a, b = model(input_ids=w.view(1, -1)).logits, quant(input_ids=w.view(1, -1)).logits
            assert float((a - b).abs().max()) < 1e-5 * float(a.abs().max())
        assert not torch.equal(
            quant.model.layers[0].self_attn.v_proj.weight,
            model.model.layers[0].self_attn.v_proj.weight,
        )


def test_equalize_lowers_the_int8_error(tiny: Any) -> None:
    """One INT8 scale shared by K and V: equalizing V first brings the model closer to float."""
    model, adapter, windows = tiny
    model = small_v(model)
    kls = []
    for steps in (["kv_cache"], ["kv_equalize", "kv_cache"]):
        quant = copy.deepcopy(model)
        cals = [build_calibrator(s, {"format": "int8"} if s == "kv_cache" else {}) for s in steps]
        quantize_model(quant, adapter, windows, cals, RunnerConfig(show_progress=False))
        kls.append(compare_models(model, quant, windows, show_progress=False).kl_mean)
    assert 0 < kls[1] < 0.2 * kls[0], kls  # measured: 55x lower


def test_export_refuses_partial_or_mixed_kv_scales() -> None:
    adapter = adapter_for(small_llama())

    def kv(fmt: str) -> ModuleState:
        return ModuleState(
            tensors={"kv_cache_scaling_factor": torch.ones(1)}, meta={"kv_format": fmt}
        )

    state = QuantState()
    assert kv_cache_quant_algo(state, adapter, 2) is None
    state.modules = {"model.layers.0.self_attn": kv("int8"), "model.layers.1.self_attn": kv("int8")}
    assert kv_cache_quant_algo(state, adapter, 2) == "INT8"
    state.modules["model.layers.1.self_attn"] = kv("fp8")
    with pytest.raises(InputError, match="one format"):
        kv_cache_quant_algo(state, adapter, 2)
    del state.modules["model.layers.1.self_attn"]
    with pytest.raises(InputError, match=r"layers \[1\]"):
        kv_cache_quant_algo(state, adapter, 2)


# ---- recipes end to end on the tiny model -----------------------------------------------------

KV_INT8 = {"calibrator": "kv_cache", "args": {"format": "int8"}}
KV_FP8 = {"calibrator": "kv_cache", "args": {"format": "fp8"}}
EQ = {
    "calibrator": "kv_equalize",
    "args": {},
}  # first: it edits v_proj / o_proj before quantization
AWQ = {"calibrator": "awq", "args": {"format": "int4_g32_sym", "grid": 10, "max_tokens": 128}}
COMBOS: dict[str, tuple[list[dict[str, Any]], str | None, str]] = {
    "int8kv": ([KV_INT8], None, "INT8"),
    "eq_int8kv": ([EQ, KV_INT8], None, "INT8"),
    "fp8kv": ([KV_FP8], None, "FP8"),
    "eq_awq_w4_int8kv": ([EQ, AWQ, KV_INT8], "W4A16_AWQ", "INT8"),
    "eq_sq_int8kv": (
        [EQ, {"calibrator": "smoothquant", "args": {}}, KV_INT8],
        "W8A8_SQ_PER_CHANNEL",
        "INT8",
    ),
    "fp8_fp8kv": ([{"calibrator": "fp8", "args": {}}, KV_FP8], "FP8", "FP8"),
    "eq_int8wo_int8kv": (
        [EQ, {"calibrator": "rtn", "args": {"format": "int8_channel"}}, KV_INT8],
        "W8A16",
        "INT8",
    ),
}


def kv_recipe(
    model_dir: Path, out: Path, steps: list[dict[str, Any]], emma: Path, pride: Path, tp: int = 1
) -> Recipe:
    data = {"source": "file", "num_samples": 3, "seq_len": 64, "bos_id": 0}
    return Recipe.model_validate(
        {
            "name": "tiny-kv",
            "model": {"source": str(model_dir)},
            "calibration": {**data, "path": str(emma)},
            "steps": steps,
            "export": {"output_dir": str(out), "tp_size": tp},
            "evaluation": {"data": {**data, "path": str(pride)}},
        }
    )


# Covered in the quick tier by the combinations that contain them (eq_awq_w4_int8kv: by
# test_kv_scale_on_every_tp_rank's tp=2 run of the same steps); run in the slow tier.
_SLOW_COMBOS = ("int8kv", "fp8kv", "eq_int8wo_int8kv", "eq_awq_w4_int8kv")


@pytest.mark.parametrize(
    "combo",
    [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW_COMBOS else c for c in COMBOS],
)
def test_recipe_exports_and_reloads_kv_cache(
    combo: str, tiny_model: Callable[[str], Path], tmp_path: Path, emma: Path, pride: Path
) -> None:
    steps, algo, kv_algo = COMBOS[combo]
    model_dir, out = tiny_model("llama"), tmp_path / "ckpt"
    res = run_recipe(kv_recipe(model_dir, out, steps, emma, pride), tmp_path, show_progress=False)
    assert res.quant_algo == algo
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == algo and q["kv_cache_quant_algo"] == kv_algo
    state = QuantState.load(out / "quantlab")
    ranks = load_file(str(out / "rank0.safetensors"))
    for i in range(2):
        ms = state.modules[f"model.layers.{i}.self_attn"]
        t = ranks[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
        assert t.dtype == torch.float32 and t.shape == (1,)
        assert torch.equal(t, ms.tensors["kv_cache_scaling_factor"])
        if kv_algo == "FP8":
            assert float(t) >= 1.0  # ModelOpt's floor
    # Reload: the KV spec comes back on every attention module and the logits reproduce the run's.
    summary = json.loads((out / "accuracy.json").read_text())["accuracy"]
    qmodel, tok = load_quantized(out / "quantlab")
    for i, layer in enumerate(qmodel.model.layers):
        spec = kv_spec(layer.self_attn)
        assert spec is not None and spec.format == kv_algo.lower()
        assert torch.equal(
            spec.scale,
            state.modules[f"model.layers.{i}.self_attn"].tensors["kv_cache_scaling_factor"],
        )
    ref, _ = load_model(str(model_dir))
    windows = load_windows(
        DataSpec(source="file", path=str(pride), num_samples=3, seq_len=64, bos_id=0), tok
    )
    again = compare_models(ref, qmodel, windows, show_progress=False)
    assert again.ppl_quant == pytest.approx(summary["ppl_quant"], rel=1e-6)
    assert again.kl_mean == pytest.approx(summary["kl_mean"], rel=1e-4, abs=1e-9)
    assert summary["kl_mean"] > 0
    # Without the KV spec the reloaded model is a different (weights-only) model.
    for layer in qmodel.model.layers:
        delattr(layer.self_attn, "quantlab_kv_spec")
    plain = compare_models(ref, qmodel, windows, show_progress=False)
    assert plain.kl_mean != summary["kl_mean"]


def test_kv_scale_on_every_tp_rank(
    tiny_model: Callable[[str], Path], tmp_path: Path, emma: Path, pride: Path
) -> None:
    steps = COMBOS["eq_awq_w4_int8kv"][0]
    out = tmp_path / "tp2"
    run_recipe(
        kv_recipe(tiny_model("llama"), out, steps, emma, pride, tp=2), tmp_path, show_progress=False
    )
    state = QuantState.load(out / "quantlab")
    for r in range(2):
        t = load_file(str(out / f"rank{r}.safetensors"))
        for i in range(2):
            assert torch.equal(
                t[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"],
                state.modules[f"model.layers.{i}.self_attn"].tensors["kv_cache_scaling_factor"],
            )


# ---- SmolLM2 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_int8kv_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], emma: Path, pride: Path, embedded_dir: Path
) -> None:
    from quantlab.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_int8kv.yaml"
    out = tmp_path / "kv"
    sets = [
        f"export.output_dir={out}",
        "evaluation.data.num_samples=4",
        "calibration.num_samples=4",
    ]
    assert main(["--quiet", "run", str(recipe), *[a for s in sets for a in ("--set", s)]]) == 0
    assert "(4 windows x 512 tokens, 2044 predicted tokens each)" in capsys.readouterr().out
    acc = json.loads((out / "accuracy.json").read_text())
    a = acc["accuracy"]
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert acc["quant_algo"] is None and q["kv_cache_quant_algo"] == "INT8"
    # INT8 KV alone costs SmolLM2 little but not nothing (a wrong scale or K point costs far more).
    assert 0 < a["kl_mean"] < 0.01 and a["top1_agreement"] > 0.95
    assert abs(a["ppl_quant"] / a["ppl_ref"] - 1) < 0.01
    t = load_file(str(out / "rank0.safetensors"))
    assert sum(k.endswith("attention.kv_cache_scaling_factor") for k in t) == 30

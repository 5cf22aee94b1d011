"""End-to-end on tiny random models: recipe -> runner -> TensorRT-LLM checkpoint (tp/pp) -> reload, bit-exact."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from quantlab.kernels.packing import unpack_int4_rows
from safetensors.torch import load_file

from quantlab.data import DataSpec, load_windows
from quantlab.evaluate import compare_models
from quantlab.export.reload import load_quantized
from quantlab.models import load_model
from quantlab.pipeline import TRTLLM_DEFAULT_EXCLUDES, run_recipe
from quantlab.recipe import Recipe
from quantlab.state import QuantState

STEPS: dict[str, list[dict[str, Any]]] = {
    "W8A16": [{"calibrator": "rtn", "args": {"format": "int8_channel"}}],
    "W4A16": [{"calibrator": "rtn", "args": {"format": "int4_channel"}}],
    "W4A16_AWQ": [{"calibrator": "rtn", "args": {"format": "int4_g32_sym"}}],
    "W4A16_GPTQ": [{"calibrator": "rtn", "args": {"format": "int4_g32_asym"}}],
    "W8A16_GPTQ": [{"calibrator": "gptq", "args": {"format": "int8_g32_asym"}}],
    "FP8": [{"calibrator": "fp8", "args": {}}],
    "FP8_PER_CHANNEL_PER_TOKEN": [
        {"calibrator": "fp8", "args": {"weights": "channel", "activations": "dynamic_token"}}
    ],
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
TRT = {
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",
    "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}


def make_recipe(
    model_dir: Path, out: Path, algo: str, emma: Path, pride: Path, tp: int = 1, pp: int = 1
) -> Recipe:
    data = {"source": "file", "num_samples": 3, "seq_len": 64, "bos_id": 0}
    return Recipe.model_validate(
        {
            "name": f"tiny-{algo}",
            "model": {"source": str(model_dir)},
            "calibration": {**data, "path": str(emma)},
            "steps": STEPS[algo],
            "export": {"output_dir": str(out), "tp_size": tp, "pp_size": pp},
            "evaluation": {"data": {**data, "path": str(pride)}},
        }
    )


def split_qkv(t: torch.Tensor, sizes: list[int], axis: int) -> list[torch.Tensor]:
    return list(t.split(sizes, dim=axis))


def decode_linear(
    tensors: dict[str, torch.Tensor], prefix: str, algo: str, sizes: list[int] | None
) -> list[dict[str, torch.Tensor]]:
    """Codes/scales/zeros of each HF linear stored under a TensorRT-LLM prefix (q|k|v split when sizes given)."""
    g = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    n_parts = len(sizes) if sizes else 1
    sz = sizes or [None]

    def parts(t: torch.Tensor, axis: int, scale_rows: int = 1) -> list[torch.Tensor]:
        if sizes is None:
            return [t]
        return split_qkv(t, [s // scale_rows for s in sizes], axis)  # type: ignore[operator]

    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n_parts)]
    if algo in ("W8A16", "W4A16"):
        for o, w, s in zip(
            out, parts(g["weight"], 0), parts(g["per_channel_scale"], 0), strict=True
        ):
            o["weight_scale"] = s.float()
            o["qweight"] = torch.round(w.float() / s.float()[:, None]).to(torch.int8)
    elif algo == "W4A16_AWQ":
        for o, w, s in zip(
            out, parts(g["weight"], 0, 2), parts(g["weights_scaling_factor"], 0), strict=True
        ):
            o["qweight"] = unpack_int4_rows(w)
            o["weight_scale"] = s.float()
        assert torch.equal(
            g["prequant_scaling_factor"], torch.ones_like(g["prequant_scaling_factor"])
        )
    elif algo == "W4A16_GPTQ":
        for o, w, s, z in zip(
            out,
            parts(g["weight"], 0, 2),
            parts(g["weights_scaling_factor"], 1),
            parts(g["zero"], 1),
            strict=True,
        ):
            o["qweight"] = (unpack_int4_rows(w).to(torch.int16) + 8).to(torch.uint8)
            o["weight_scale"] = s.t().float()
            o["weight_zero"] = (8 - torch.round(z.t().float() / s.t().float())).to(torch.uint8)
    elif algo == "W8A16_GPTQ":
        for o, w, s, z in zip(
            out,
            parts(g["weight"], 0),
            parts(g["weights_scaling_factor"], 1),
            parts(g["zero"], 1),
            strict=True,
        ):
            o["qweight"] = (w.to(torch.int16) + 128).to(torch.uint8)
            o["weight_scale"] = s.t().float()
            o["weight_zero"] = (128 - torch.round(z.t().float() / s.t().float())).to(torch.uint8)
    else:
        for o, w in zip(out, parts(g["weight"], 0), strict=True):
            o["qweight"] = w
        if algo == "FP8":
            for o in out:
                o["weight_scale"] = g["weights_scaling_factor"]
                o["input_scale"] = g["activation_scaling_factor"]
        else:
            for o, s in zip(out, parts(g["per_channel_scale"], 0), strict=True):
                o["weight_scale"] = s
    del sz
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn or b.dtype == torch.float8_e4m3fn:
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.reshape(b.shape).to(b.dtype), b)


def check_bit_exact(
    out: Path, state: QuantState, algo: str, qkv_sizes: list[int], n_layers: int
) -> None:
    t = load_file(str(out / "rank0.safetensors"))
    for i in range(n_layers):
        pre = f"model.layers.{i}"
        decoded = dict(
            zip(
                QKV,
                decode_linear(t, f"transformer.layers.{i}.attention.qkv", algo, qkv_sizes),
                strict=True,
            )
        )
        for hf, trt in TRT.items():
            decoded[hf] = decode_linear(t, f"transformer.layers.{i}.{trt}", algo, None)[0]
        for hf, d in decoded.items():
            ms = state.modules[f"{pre}.{hf}"]
            for name, v in d.items():
                assert same(v, ms.tensors[name]), (
                    f"{pre}.{hf}.{name} differs between checkpoint and QuantState"
                )


@pytest.mark.parametrize("algo", list(STEPS))
def test_llama_every_algo_bit_exact_and_reloadable(
    algo: str, tiny_model: Callable[[str], Path], tmp_path: Path, emma: Path, pride: Path
) -> None:
    model_dir = tiny_model("llama")
    out = tmp_path / "ckpt"
    res = run_recipe(make_recipe(model_dir, out, algo, emma, pride), tmp_path, show_progress=False)
    assert res.quant_algo == algo
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo
    assert cfg["quantization"]["exclude_modules"] == ["lm_head", *TRTLLM_DEFAULT_EXCLUDES]
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_key_value_heads"] == 2
    if algo.startswith(("W4A16_", "W8A16_")):
        assert cfg["quantization"]["group_size"] == 32
        assert cfg["quantization"]["has_zero_point"] == algo.endswith("_GPTQ")
    state = QuantState.load(out / "quantlab")
    assert len(state.modules) == 2 * 7
    check_bit_exact(out, state, algo, [128, 64, 64], 2)

    # The reloaded torch model reproduces the accuracy the run reported, on the same windows.
    summary = json.loads((out / "accuracy.json").read_text())
    qmodel, tok = load_quantized(out / "quantlab")
    ref, _ = load_model(str(model_dir))
    windows = load_windows(
        DataSpec(source="file", path=str(pride), num_samples=3, seq_len=64, bos_id=0), tok
    )
    again = compare_models(ref, qmodel, windows, show_progress=False)
    assert again.ppl_quant == pytest.approx(summary["accuracy"]["ppl_quant"], rel=1e-6)
    assert again.kl_mean == pytest.approx(summary["accuracy"]["kl_mean"], rel=1e-4, abs=1e-9)
    assert summary["accuracy"]["kl_mean"] > 0  # quantization did change the model


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("algo", ["W4A16_GPTQ", "FP8"])
def test_other_families(
    family: str,
    algo: str,
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    emma: Path,
    pride: Path,
) -> None:
    out = tmp_path / "ckpt"
    run_recipe(
        make_recipe(tiny_model(family), out, algo, emma, pride), tmp_path, show_progress=False
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["architecture"] == {"qwen2": "Qwen2ForCausalLM", "mistral": "LlamaForCausalLM"}[family]
    )
    t = load_file(str(out / "rank0.safetensors"))
    if family == "qwen2":  # q/k/v biases are fused like the weights
        assert t["transformer.layers.0.attention.qkv.bias"].shape == (256,)
    assert "lm_head.weight" in t and "transformer.ln_f.weight" in t
    check_bit_exact(out, QuantState.load(out / "quantlab"), algo, [128, 64, 64], 2)


def split_axis(key: str, algo: str) -> int | None:
    """Axis a tensor is sharded along across tp ranks (None: replicated), per docs/export.md."""
    leaf = key.rsplit(".", 1)[1]
    if key == "lm_head.weight":
        return 0
    if not key.startswith("transformer.layers.") or "layernorm" in key:
        return None
    transposed = algo in ("W4A16_GPTQ", "W8A16_GPTQ") and leaf in (
        "weights_scaling_factor",
        "zero",
    )  # [K/G, N]
    if ".attention.dense." in key or ".mlp.proj." in key:  # row parallel: split K
        return {
            "weight": 1,
            "prequant_scaling_factor": 0,
            "zero": 0,
            "weights_scaling_factor": 0 if transposed else (None if algo == "FP8" else 1),
        }.get(leaf)
    if leaf in ("prequant_scaling_factor", "activation_scaling_factor") or (
        algo == "FP8" and leaf == "weights_scaling_factor"
    ):
        return None
    return 1 if transposed else 0  # column parallel: split N


def merged_ranks(out: Path) -> dict[str, torch.Tensor]:
    """Re-assemble a tp x pp checkpoint into tp=1/pp=1 tensors (independent of the exporter's code)."""
    cfg = json.loads((out / "config.json").read_text())
    tp, pp, n = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    algo = cfg["quantization"]["quant_algo"]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp * pp)]
    merged: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        group = ranks[pp_rank * tp : (pp_rank + 1) * tp]
        for key in sorted(group[0]):
            parts = [g[key] for g in group]
            gkey = key
            if key.startswith("transformer.layers."):
                _, _, idx, rest = key.split(".", 3)
                gkey = f"transformer.layers.{int(idx) + pp_rank * n // pp}.{rest}"
            axis = split_axis(key, algo)
            if axis is None:
                assert all(same(p, parts[0]) for p in parts), f"{key} should be replicated"
                merged[gkey] = parts[0]
            elif ".qkv." in key:  # each rank holds q_r | k_r | v_r
                unit = parts[0].shape[axis] // (heads // tp + 2 * kv // tp)
                sizes = [heads // tp * unit, kv // tp * unit, kv // tp * unit]
                pieces = [p.split(sizes, dim=axis) for p in parts]
                merged[gkey] = torch.cat(
                    [torch.cat([pc[j] for pc in pieces], dim=axis) for j in range(3)], dim=axis
                )
            else:
                merged[gkey] = torch.cat(parts, dim=axis)
    return merged


@pytest.mark.parametrize(
    "algo",
    [
        "W4A16_AWQ",
        "W4A16_GPTQ",
        pytest.param("W8A16_GPTQ", marks=pytest.mark.slow),  # W4A16_GPTQ's transposed rules
        "FP8",
        pytest.param("W8A16", marks=pytest.mark.slow),  # per-channel: W4A16_AWQ's rules, no groups
    ],
)
def test_tp2_pp2_shards_reassemble_to_tp1(
    algo: str, tiny_model: Callable[[str], Path], tmp_path: Path, emma: Path, pride: Path
) -> None:
    model_dir = tiny_model("llama")
    one, four = tmp_path / "tp1", tmp_path / "tp2pp2"
    run_recipe(make_recipe(model_dir, one, algo, emma, pride), tmp_path, show_progress=False)
    run_recipe(
        make_recipe(model_dir, four, algo, emma, pride, tp=2, pp=2), tmp_path, show_progress=False
    )
    cfg = json.loads((four / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert sorted(p.name for p in four.glob("rank*.safetensors")) == [
        f"rank{i}.safetensors" for i in range(4)
    ]
    r0, r3 = load_file(str(four / "rank0.safetensors")), load_file(str(four / "rank3.safetensors"))
    assert "transformer.vocab_embedding.weight" in r0 and "lm_head.weight" not in r0
    assert "lm_head.weight" in r3 and "transformer.vocab_embedding.weight" not in r3
    assert {k.split(".")[2] for k in r3 if k.startswith("transformer.layers.")} == {
        "0"
    }  # local layer index
    ref = load_file(str(one / "rank0.safetensors"))
    got = merged_ranks(four)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert same(got[k], v), k

"""Every adapter architecture on a tiny random config (2 layers, its quirks kept; conftest ARCH_TINY):
the adapter names every linear, scale folds leave the float model unchanged, every calibrator runs
with KV-cache quantization inside the architecture's own attention, and what a run writes reloads
exactly (quantlab's folder, the HF-layout folders through their own readers and loaders).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from quantlab.calibrators.awq import fold_scale, pair_index
from torch import nn

from quantlab.adapters import adapter_for
from quantlab.calibrator import LayerContext
from quantlab.cli import main
from quantlab.models import load_model

DENSE = ["llama3", "gemma2", "gemma3", "qwen3", "phi3"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
ARCHS = DENSE + MOE

RECIPE = """\
name: arch
model: {{source: {model}}}
calibration: {{source: file, path: {emma}, num_samples: 3, seq_len: 64, bos_id: 0}}
steps:
{steps}
export:
  format: {formats}
  output_dir: {out}
  dtype: float32
evaluation:
  data: {{source: file, path: {pride}, num_samples: 2, seq_len: 64, bos_id: 0}}
"""
# name -> (steps, HF-layout formats a dense architecture also writes)
ALGOS: dict[str, tuple[str, list[str]]] = {
    "awq_int8kv": (
        "  - calibrator: awq\n    args: {format: int4_g32_sym, grid: 4}\n"
        "  - calibrator: kv_cache\n    args: {format: int8}",
        [],
    ),
    "sq_fp8kv": (
        "  - calibrator: kv_equalize\n"
        "  - calibrator: smoothquant\n    args: {alpha: search, grid: 4}\n"
        "  - calibrator: kv_cache\n    args: {format: fp8}",
        ["modelopt_hf"],
    ),
    "rtn": ("  - calibrator: rtn\n    args: {format: int4_g32_sym}", ["compressed_tensors"]),
    "gptq": ("  - calibrator: gptq\n    args: {format: int4_g32_asym}", []),
    "fp8": (
        "  - calibrator: fp8\n  - calibrator: kv_cache\n    args: {format: fp8}",
        ["modelopt_hf"],
    ),
}
QUICK = ("awq_int8kv", "sq_fp8kv")


def _run(
    tmp: Path, model: Path, steps: str, formats: list[str], emma: Path, pride: Path
) -> tuple[int, Path]:
    out = tmp / "out"
    text = RECIPE.format(model=model, emma=emma, pride=pride, steps=steps, formats=formats, out=out)
    (tmp / "r.yaml").write_text(text)
    return main(["--quiet", "run", str(tmp / "r.yaml")]), out


def _ids() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_names_every_linear_with_its_shape(
    arch: str, tiny_arch: Callable[[str], Path]
) -> None:
    model, _ = load_model(str(tiny_arch(arch)))
    adapter = adapter_for(model)
    shapes = adapter.shapes(model.config)
    assert set(shapes) == set(adapter.linears)
    for layer in model.get_submodule(adapter.layers):
        found = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        # Every nn.Linear of a layer is quantized, or a router / gate the adapter keeps float.
        assert found == set(adapter.linears) | (found & set(adapter.float_modules))
        for name in adapter.linears:
            w = layer.get_submodule(name).weight
            assert tuple(w.shape) == shapes[name], name
    for norm, members in adapter.smoothing_groups:  # the fold targets exist
        layer.get_submodule(norm)
        for m in members:
            layer.get_submodule(m)


@pytest.mark.parametrize("arch", MOE)
def test_unfused_experts_compute_the_fused_model(
    arch: str, tiny_arch: Callable[[str], Path]
) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.moe import UnfusedExperts

    folder = tiny_arch(arch)
    fused = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model, _ = load_model(str(folder))
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    with torch.no_grad():
        want, got = fused(input_ids=_ids()).logits, model(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _fold_everything(model: nn.Module, seed: int, offset: float | None = None) -> None:
    """Fold random scales into every smoothing group and producer -> consumer pair of every layer."""
    adapter = adapter_for(model)
    if offset is not None:  # a deliberately wrong adapter (tests the test)
        import dataclasses

        adapter = dataclasses.replace(adapter, norm_offset=offset)
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.get_submodule(adapter.layers)):
        ctx = LayerContext(i, f"{adapter.layers}.{i}", layer, list(adapter.linears), adapter, list)
        for norm, members in adapter.smoothing_groups:
            k = ctx.weight(members[0]).shape[1]
            fold_scale(ctx, norm, members, torch.rand(k, generator=g) * 4 + 0.1)
        for pair in adapter.pairs:
            index, rows = pair_index(ctx, pair, "test")
            s = torch.rand(rows[1] - rows[0], generator=g) * 4 + 0.1
            fold_scale(ctx, pair.producer, (), s, rows)
            fold_scale(ctx, None, (pair.consumer,), s[index])


@pytest.mark.parametrize("arch", ARCHS)
def test_folds_leave_the_float_output_unchanged(
    arch: str, tiny_arch: Callable[[str], Path]
) -> None:
    model, _ = load_model(str(tiny_arch(arch)))
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
        _fold_everything(model, 1)
        after = model(input_ids=_ids()).logits
    assert (after - before).abs().max() < 1e-5
    if arch.startswith("gemma"):  # folding into (1 + w) as into w breaks the model: not vacuous
        model, _ = load_model(str(tiny_arch(arch)))
        _fold_everything(model, 1, offset=0.0)
        with torch.no_grad():
            assert (model(input_ids=_ids()).logits - before).abs().max() > 1e-2


def test_sliding_and_global_layers_get_their_own_mask_and_rope(
    tiny_arch: Callable[[str], Path],
) -> None:
    from quantlab.runner import capture_layer_inputs, decoder_layers, run_layer

    model, _ = load_model(str(tiny_arch("gemma3")))
    adapter = adapter_for(model)
    ids = _ids()[:1, :40]  # 40 tokens > the 16-token sliding window
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    inputs = capture_layer_inputs(model, adapter, [ids[0]])
    layers = decoder_layers(model, adapter)
    out0 = run_layer(layers[0], inputs)
    torch.testing.assert_close(out0[0], hs[1], rtol=1e-5, atol=1e-5)
    out1 = run_layer(layers[1], [(out0[0], inputs[0][1])])  # the global layer
    final = model.get_submodule(adapter.final_norm)(out1[0])
    torch.testing.assert_close(final, hs[2], rtol=1e-5, atol=1e-5)
    # With the sliding layer's mask and rope the global layer computes something else.
    kw = {k: v for k, v in inputs[0][1].items() if not k.startswith("quantlab")}
    wrong = layers[1](out0[0], **kw)
    wrong = wrong[0] if isinstance(wrong, tuple) else wrong
    assert (model.get_submodule(adapter.final_norm)(wrong) - hs[2]).abs().max() > 1e-3


def _check_reload(
    out: Path, pride: Path, kv: bool, perplexity: Callable[[nn.Module, list[torch.Tensor]], float]
) -> None:
    """quantlab's folder rebuilds the run's quantized model: same perplexity, KV quantized inside."""
    from quantlab.attention import clear_kv_quant, kv_spec
    from quantlab.data import DataSpec, load_windows
    from quantlab.export.reload import load_quantized

    model, tok = load_quantized(out / "quantlab")
    spec = DataSpec(source="file", path=str(pride), num_samples=2, seq_len=64, bos_id=0)
    windows = load_windows(spec, tok)
    reported = json.loads((out / "accuracy.json").read_text())["accuracy"]["ppl_quant"]
    assert perplexity(model, windows) == pytest.approx(reported, rel=1e-6)
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert attn and all((kv_spec(m) is not None) == kv for m in attn)
    if kv:  # the KV quantization really runs inside this architecture's attention
        with torch.no_grad():
            q = model(input_ids=windows[0][None]).logits
            for m in attn:
                clear_kv_quant(m)
            assert not torch.equal(model(input_ids=windows[0][None]).logits, q)


def _check_modelopt_hf(out: Path) -> None:
    from quantlab.export.modelopt_hf import read_modelopt_hf
    from quantlab.state import QuantState

    state, _, _ = read_modelopt_hf(out / "modelopt_hf")
    saved = QuantState.load(out / "quantlab")
    assert {m for m, ms in state.modules.items() if ms.weight_format} == {
        m for m, ms in saved.modules.items() if ms.weight_format
    }
    for m, ms in state.modules.items():
        for t, v in ms.tensors.items():
            ref = saved.modules[m].tensors.get(t)
            if ref is not None:
                assert torch.equal(v.to(ref.dtype).reshape(ref.shape), ref), (m, t)


def _check_compressed_tensors(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.export.reload import load_quantized

    loaded = AutoModelForCausalLM.from_pretrained(
        str(out / "compressed_tensors"), dtype=torch.float32
    ).eval()
    sim, _ = load_quantized(out / "quantlab")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, sim(input_ids=_ids()).logits)


@pytest.mark.parametrize(
    "algo", [a if a in QUICK else pytest.param(a, marks=pytest.mark.slow) for a in ALGOS]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_calibrators_run_and_reload(
    arch: str,
    algo: str,
    tmp_path: Path,
    tiny_arch: Callable[[str], Path],
    emma: Path,
    pride: Path,
    perplexity: Callable[[nn.Module, list[torch.Tensor]], float],
) -> None:
    steps, formats = ALGOS[algo]
    if arch in MOE:  # MoE: no compressed-tensors yet (docs/models.md)
        formats = [f for f in formats if f != "compressed_tensors"]
    rc, out = _run(tmp_path, tiny_arch(arch), steps, formats, emma, pride)
    assert rc == 0
    _check_reload(out, pride, "kv" in algo or algo == "fp8", perplexity)
    if "modelopt_hf" in formats:
        _check_modelopt_hf(out)
    if "compressed_tensors" in formats:
        _check_compressed_tensors(out)
    summary = json.loads((out / "accuracy.json").read_text())
    assert summary["accuracy"]["kl_mean"] < 0.05
    assert (summary["under_calibrated"] is None) == (arch in DENSE)


def test_experts_short_of_tokens_fall_back_and_are_counted(
    tmp_path: Path, tiny_arch: Callable[[str], Path], emma: Path, pride: Path
) -> None:
    # 3 windows x 64 tokens, top-2 of 4 experts: at most 192 tokens per expert, fewer than 1000.
    steps = "  - calibrator: gptq\n    args: {format: int4_g32_sym, min_tokens: 1000}"
    rc, out = _run(tmp_path, tiny_arch("mixtral"), steps, [], emma, pride)
    assert rc == 0
    under = json.loads((out / "accuracy.json").read_text())["under_calibrated"]
    assert under["linears"] == 2 * 4 * 3 and under["experts"] == 2 * 4
    assert under["actions"] == ["rtn"] and under["experts_per_layer"] == 4
    # Attention linears keep GPTQ (a dense linear below min_tokens would be an error).
    from quantlab.state import QuantState

    state = QuantState.load(out / "quantlab")
    assert "fallback" not in state.modules["model.layers.0.self_attn.q_proj"].meta
    assert state.modules["model.layers.1.mlp.experts.3.down_proj"].meta["fallback"] == "rtn"


@pytest.mark.parametrize(
    ("arch", "formats", "needle"),
    [
        ("phi3", ["trtllm"], "no TensorRT-LLM checkpoint for Phi3ForCausalLM"),
        ("mixtral", ["compressed_tensors"], "sparse-MoE model (MixtralForCausalLM) is not written"),
    ],
)
def test_formats_without_a_layout_are_refused_before_work(
    arch: str,
    formats: list[str],
    needle: str,
    tmp_path: Path,
    tiny_arch: Callable[[str], Path],
    emma: Path,
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    steps = "  - calibrator: fp8"
    rc, out = _run(tmp_path, tiny_arch(arch), steps, formats, emma, pride)
    assert rc == 2 and not out.exists()
    assert needle in " ".join(capsys.readouterr().err.split())


# ModelOpt 0.47's own export of the same tiny model: (ModelOpt config, block size, FP8 KV, steps).
MODELOPT: dict[str, tuple[str, int | None, bool, str]] = {
    "FP8": (
        "FP8_DEFAULT_CFG",
        None,
        True,
        "  - calibrator: fp8\n  - calibrator: kv_cache\n    args: {format: fp8}",
    ),
    "W4A16_AWQ": (
        "INT4_AWQ_CFG",
        32,
        False,
        "  - calibrator: awq\n    args: {format: int4_g32_sym, grid: 4}",
    ),
    "W8A8_SQ_PER_CHANNEL": ("INT8_SMOOTHQUANT_CFG", None, False, "  - calibrator: smoothquant"),
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(MODELOPT))
@pytest.mark.parametrize("arch", ["gemma3", "qwen3", "phi3", "mixtral", "qwen2_moe"])
def test_modelopt_hf_has_modelopts_own_layout(
    arch: str,
    algo: str,
    tmp_path: Path,
    tiny_arch: Callable[[str], Path],
    emma: Path,
    pride: Path,
    modelopt_export: Callable[..., Path],
    tensor_layout: Callable[[Path], Any],
) -> None:
    pytest.importorskip("modelopt")
    if arch in MOE and algo == "W4A16_AWQ":
        pytest.skip("ModelOpt 0.47's INT4 AWQ fails on transformers 5's fused experts (len())")
    text = RECIPE.format(
        model=tiny_arch(arch), emma=emma, pride=pride, steps=MODELOPT[algo][3],
        formats=["modelopt_hf"], out=tmp_path / "ql",
    ).replace("dtype: float32", "dtype: float16")  # fmt: skip
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    cfg_name, block, kv, _ = MODELOPT[algo]
    theirs = modelopt_export(tiny_arch(arch), cfg_name, block, kv, tmp_path / "mo")
    assert tensor_layout(tmp_path / "ql" / "modelopt_hf") == tensor_layout(theirs)
    quant = json.loads((tmp_path / "ql" / "modelopt_hf" / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == algo


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen3"])
def test_trtllm_checkpoint_of_gemma_and_qwen3(
    arch: str, tmp_path: Path, tiny_arch: Callable[[str], Path], emma: Path, pride: Path
) -> None:
    """TensorRT-LLM's own layouts (tensorrt_llm/models/gemma, qwen): the extra norms under their
    names, Gemma's norms as 1 + w, the attention config; linears fused as for Llama."""
    from safetensors.torch import load_file

    from quantlab.state import QuantState

    steps = "  - calibrator: fp8\n  - calibrator: kv_cache\n    args: {format: fp8}"
    rc, out = _run(tmp_path, tiny_arch(arch), steps, ["trtllm"], emma, pride)
    assert rc == 0  # the run also passed check-export's TensorRT-LLM rules before publishing
    conf = json.loads((out / "config.json").read_text())
    t = load_file(str(out / "rank0.safetensors"))
    floats = load_file(str(out / "quantlab" / "float_weights.safetensors"))
    gemma = arch.startswith("gemma")
    off = 1.0 if gemma else 0.0
    hf = "model.layers.1."
    pairs = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}
    if gemma:
        pairs |= {n: n for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")}
    if arch != "gemma2":
        pairs |= {"self_attn.q_norm": "attention.q_layernorm"}
        pairs |= {"self_attn.k_norm": "attention.k_layernorm"}
    for src, dst in pairs.items():
        want = floats[f"{hf}{src}.weight"].float() + off
        assert torch.equal(t[f"transformer.layers.1.{dst}.weight"], want)  # float32 export
    ln_f = floats["model.norm.weight"].float() + off
    assert torch.equal(t["transformer.ln_f.weight"], ln_f)
    assert (
        conf["architecture"]
        == {
            "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[arch]
    )
    if gemma:
        assert conf["hidden_act"] == "gelu" and conf["query_pre_attn_scalar"] == 24
        assert conf["inter_layernorms"] is True
    if arch == "gemma3":  # layer_types [sliding, full]: every 2nd layer is global
        assert conf["_sliding_window_pattern"] == 2 and conf["qk_layernorm"] is True
    if arch == "qwen3":
        assert conf["qwen_type"] == "qwen3"
    # The fused q|k|v codes are the run's codes (FP8: one shared per-tensor scale).
    state = QuantState.load(out / "quantlab")
    codes = [state.modules[f"{hf}self_attn.{p}_proj"].tensors["qweight"] for p in "qkv"]
    got = t["transformer.layers.1.attention.qkv.weight"]
    assert torch.equal(got.view(torch.uint8), torch.cat(codes).view(torch.uint8))

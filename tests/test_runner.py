"""The Runner: layer-by-layer propagation, data-free steps, fused-scale sharing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantlab.adapters import adapter_for
from quantlab.calibrator import build_calibrator
from quantlab.data import DataSpec, load_windows
from quantlab.models import load_model
from quantlab.qmodules import QuantLinear
from quantlab.runner import RunnerConfig, capture_layer_inputs, quantize_model


@pytest.fixture
def tiny(tiny_model: Callable[[str], Path], emma: Path):  # type: ignore[no-untyped-def]
    model, tok = load_model(str(tiny_model("llama")))
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=2, seq_len=40, bos_id=0), tok
    )
    return model, adapter_for(model), windows


def test_capture_matches_a_full_forward(tiny) -> None:  # type: ignore[no-untyped-def]
    model, adapter, windows = tiny
    inputs = capture_layer_inputs(model, adapter, windows)
    assert len(inputs) == 2 and inputs[0][0].shape == (1, 40, 128)
    # Running the captured inputs through every layer + norm + head reproduces the model's logits.
    h = [x for x, _ in inputs]
    for layer in model.model.layers:
        h = [layer(x, **kw) for x, (_, kw) in zip(h, inputs, strict=True)]
        h = [x[0] if isinstance(x, tuple) else x for x in h]
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(h[0]))
        full = model(input_ids=windows[0].view(1, -1)).logits
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_fp8_shares_scales_within_fused_groups(tiny) -> None:  # type: ignore[no-untyped-def]
    model, adapter, windows = tiny
    state = quantize_model(
        model, adapter, windows, [build_calibrator("fp8", {})], RunnerConfig(show_progress=False)
    )
    for i in range(2):
        m = {n: state.modules[f"model.layers.{i}.{n}"].tensors for n in adapter.linears}
        for group in adapter.fused_groups:
            scales = {float(m[n]["weight_scale"]) for n in group}
            acts = {float(m[n]["input_scale"]) for n in group}
            assert len(scales) == 1 and len(acts) == 1
        assert float(m["self_attn.q_proj"]["input_scale"]) != float(
            m["mlp.down_proj"]["input_scale"]
        )
    assert sum(isinstance(x, QuantLinear) for x in model.modules()) == 14


def test_propagation_mode_changes_what_later_layers_see(tiny) -> None:  # type: ignore[no-untyped-def]
    model, adapter, windows = tiny
    fp8 = {"activations": "static_tensor"}
    a = quantize_model(
        model, adapter, windows, [build_calibrator("fp8", fp8)], RunnerConfig(show_progress=False)
    )
    model2, _ = load_model(str(Path(model.name_or_path)))
    b = quantize_model(
        model2,
        adapter,
        windows,
        [build_calibrator("fp8", fp8)],
        RunnerConfig("float", show_progress=False),
    )
    first = "model.layers.0.self_attn.q_proj"
    later = "model.layers.1.mlp.down_proj"
    # Layer 0 sees identical inputs either way; layer 1 sees quantized vs float outputs of layer 0.
    assert torch.equal(
        a.modules[first].tensors["input_scale"], b.modules[first].tensors["input_scale"]
    )
    assert not torch.equal(
        a.modules[later].tensors["input_scale"], b.modules[later].tensors["input_scale"]
    )


def test_data_free_steps_never_run_the_model(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model, adapter, windows = tiny
    calls = []
    monkeypatch.setattr("quantlab.runner.capture_layer_inputs", lambda *a: calls.append(a) or [])
    state = quantize_model(
        model,
        adapter,
        windows,
        [build_calibrator("rtn", {"format": "int4_g32_asym"})],
        RunnerConfig(show_progress=False),
    )
    assert not calls and len(state.modules) == 14


def test_exclude_patterns(tiny) -> None:  # type: ignore[no-untyped-def]
    model, adapter, windows = tiny
    cfg = RunnerConfig(
        exclude=["*.mlp.down_proj", "model.layers.0.self_attn.o_proj"], show_progress=False
    )
    state = quantize_model(model, adapter, windows, [build_calibrator("rtn", {})], cfg)
    assert "model.layers.1.mlp.down_proj" not in state.modules
    assert "model.layers.0.self_attn.o_proj" not in state.modules
    assert "model.layers.1.self_attn.o_proj" in state.modules
    assert len(state.modules) == 14 - 3


def test_later_weight_step_replaces_earlier_codes_entirely() -> None:
    from quantlab.formats import preset
    from quantlab.state import ModuleState

    ms = ModuleState(
        preset("int4_g32_asym"), None, {"qweight": torch.zeros(1), "weight_zero": torch.ones(1)}
    )
    ms.merge(
        ModuleState(
            preset("int4_g32_sym"), None, {"qweight": torch.ones(1), "weight_scale": torch.ones(1)}
        )
    )
    assert set(ms.tensors) == {"qweight", "weight_scale"} and ms.weight_format == preset(
        "int4_g32_sym"
    )
    ms.merge(ModuleState(None, preset("fp8_tensor"), {"input_scale": torch.ones(1)}))
    assert set(ms.tensors) == {"qweight", "weight_scale", "input_scale"}

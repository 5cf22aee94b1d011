"""Activation statistics, and the shipped notebook's code running top to bottom."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from quantlab.data import DataSpec, load_windows
from quantlab.inspect import activation_absmax, outlier_table
from quantlab.models import load_model

REPO = Path(__file__).resolve().parents[1]


def test_activation_absmax_finds_an_injected_outlier(
    tiny_model: Callable[[str], Path], emma: Path
) -> None:
    model, tok = load_model(str(tiny_model("llama")))
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=2, seq_len=32, bos_id=0), tok
    )
    # Make channel 5 of the first layer's input norm 50x larger: q/k/v inputs get an outlier there.
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 50
    stats = activation_absmax(model, windows)
    assert len(stats) == 2 * 7 and stats["model.layers.0.self_attn.q_proj"].shape == (128,)
    assert stats["model.layers.1.mlp.down_proj"].shape == (256,)
    rows = outlier_table(stats)
    top = {r.module: r for r in rows[:3]}
    assert set(top) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert top["model.layers.0.self_attn.q_proj"].top_channels[0] == 5
    assert top["model.layers.0.self_attn.q_proj"].max_over_median > 20

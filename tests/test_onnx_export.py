"""The TensorRT stage's ONNX graph, run by onnxruntime, against the simulated model of the same
QuantState: every quant_algo the checkpoint exports, prefill and cached decode, tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from quantlab.deploy.onnx_export import export_decoder
from quantlab.deploy.ort import OrtDecoder
from quantlab.engine.checkpoint import load_checkpoint
from quantlab.export.reload import load_quantized
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
# the ONNX form of each algo's linears (onnx_linear.py)
KIND = {"W8A16": "w8a16", "W8A16_GPTQ": "w8a16_group", "W8A16_GPTQ_ASYM": "w8a16_group"}
KIND |= {a: "w4a16" for a in ("W4A16", "W4A16_AWQ", "W4A16_GPTQ", "INT8KV")}
KIND |= {a: "fp8" for a in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8KV")}
KIND |= {a: "w8a8" for a in STEPS if a.startswith("W8A8")} | {"FLOAT": "float"}
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def run_for(
    tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, emma: Path
) -> Callable[..., Path]:
    """(family, algo) -> a finished `quantlab run` folder of the tiny model, cached per module."""
    made: dict[tuple[str, str], Path] = {}

    def make(family: str, algo: str) -> Path:
        if (family, algo) not in made:
            root = tmp_path_factory.mktemp(f"onnx-{family}-{algo}")
            data = {"source": "file", "num_samples": 4, "seq_len": 64, "bos_id": 0}
            recipe = Recipe.model_validate(
                {
                    "name": f"tiny-{algo}",
                    "model": {"source": str(tiny_model(family))},
                    "calibration": {**data, "path": str(emma)},
                    "steps": STEPS[algo],
                    "export": {"output_dir": str(root / "run"), "dtype": "float32"},
                    "evaluation": {"enabled": False},
                }
            )
            run_recipe(recipe, root, show_progress=False)
            made[(family, algo)] = root / "run"
        return made[(family, algo)]

    return make


def _ids(run: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "quantlab"))
    return [0, *tok(PROMPT, add_special_tokens=False).input_ids]


def _export(run: Path, tmp: Path, **kw: Any) -> tuple[OrtDecoder, Any]:
    ckpt = load_checkpoint(run)
    kv = {"INT8": "int8", "FP8": "fp8"}.get(ckpt.quant.get("kv_cache_quant_algo") or "", "fp32")
    dec = export_decoder(ckpt, torch.float32, kv, **kw)
    onnx.checker.check_model(dec.model, full_check=True)
    path = tmp / "model.onnx"
    onnx.save(dec.model, str(path))
    return OrtDecoder(path), dec


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("family", "algo"),
    [("llama", a) for a in STEPS]
    + [
        ("llama", "W8A16_GPTQ_ASYM"),
        ("qwen2", "W4A16_GPTQ"),
        ("mistral", "W8A8_SQ_PER_CHANNEL"),
        ("qwen2", "FP8KV"),
    ],
)
def test_onnx_logits_match_simulated_model(
    run_for: Callable[..., Path], tmp_path: Path, family: str, algo: str
) -> None:
    """onnxruntime on the fp32 graph reproduces the fp32 simulated model at (almost) every
    position: a wrong code, scale, zero point, layout or KV scale moves every position's logits by
    far more than the 1e-4 allowed. Quantized activations may land on the other side of a rounding
    boundary when the graph sums in another order: such a flip moves one position, not all."""
    run = run_for(family, algo)
    sess, dec = _export(run, tmp_path)
    assert dec.linear_kinds.get(KIND[algo]) == 8, (
        dec.linear_kinds
    )  # 2 layers x qkv, dense, gate_up, proj
    ids = _ids(run)
    sim, _ = load_quantized(run / "quantlab")
    with torch.no_grad():
        want = sim(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    got = sess.score(ids)
    cached = sess.score(ids, split=len(ids) - 4)  # prefill, then 4 decode steps through the cache
    for logits in (got, cached):
        per_pos = np.linalg.norm(logits - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert float((per_pos < 1e-4).mean()) >= 0.85, per_pos
        assert _rel(logits, want) < 2e-2
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.9

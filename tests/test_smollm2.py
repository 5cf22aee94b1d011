"""End to end on the embedded SmolLM2-135M-Instruct: the shipped recipes, shortened evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, out: Path, capsys: pytest.CaptureFixture[str], *sets: str) -> dict:  # type: ignore[type-arg]
    args = [
        "--quiet",
        "run",
        str(REPO / "recipes" / recipe),
        "--set",
        f"export.output_dir={out}",
        "--set",
        "evaluation.data.num_samples=4",
    ]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "ppl quant" in table and "(4 windows x 512 tokens, 2044 predicted tokens each)" in table
    return json.loads((out / "accuracy.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_int4_g64_asym_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pride: Path, embedded_dir: Path
) -> None:
    acc = run("smollm2_int4_g64_asym.yaml", tmp_path / "w4", capsys)
    a = acc["accuracy"]
    assert acc["quant_algo"] == "W4A16_GPTQ" and a["tokens"] == 4 * 511
    # INT4 g64 costs SmolLM2 accuracy, but a bounded amount (a broken scale or packing costs far more).
    assert a["ppl_ref"] < a["ppl_quant"] < 1.5 * a["ppl_ref"]
    assert 0.01 < a["kl_mean"] < 0.5 and 0.6 < a["top1_agreement"] < 0.99
    cfg = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["quantization"]["group_size"] == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.slow
def test_fp8_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], emma: Path, pride: Path, embedded_dir: Path
) -> None:
    acc = run("smollm2_fp8.yaml", tmp_path / "fp8", capsys, "calibration.num_samples=4")
    a = acc["accuracy"]
    assert acc["quant_algo"] == "FP8" and acc["calibration_windows"] == 4
    assert (
        a["ppl_quant"] < 1.06 * a["ppl_ref"] and a["kl_mean"] < 0.05 and a["top1_agreement"] > 0.85
    )
    assert (tmp_path / "fp8" / "quantlab.log").read_text().count("layer ") >= 30

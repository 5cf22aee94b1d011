"""Accuracy-budget mixed precision (quantlab/budget.py) on a tiny Llama: the search meets the
budget with the fewest layers it tried, the chosen layers are float in the checkpoint and in
TensorRT-LLM's exclude_modules, and the numbers agree with the run's own evaluation."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from quantlab.budget import parse_budget
from quantlab.cli import main

RECIPE = """\
name: budget
model:
  source: {model}
calibration:
  source: file
  path: {emma}
  num_samples: 2
  seq_len: 64
  bos_id: 0
steps:
{steps}
export:
  output_dir: {out}
  dtype: float32
evaluation:
  enabled: {evaluate}
  data:
    source: file
    path: {pride}
    num_samples: 4
    seq_len: 64
    bos_id: 0
"""
RTN = "  - calibrator: rtn\n    args: {format: int4_g32_sym}\n"
LAYER_MODULES = ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"]


def _run(
    tmp: Path, model: Path, emma: Path, pride: Path, name: str, *extra: str, **kw: str
) -> tuple[int, Path, str]:
    out = tmp / name
    p = tmp / f"{name}.yaml"
    fields = {"steps": RTN, "evaluate": "true", **kw}
    p.write_text(RECIPE.format(model=model, emma=emma, pride=pride, out=out, **fields))
    code = main(["--quiet", "run", str(p), *extra])
    return code, out, ""


def test_parse_budget() -> None:
    """Percent and fraction forms; anything else is an InputError."""
    from quantlab.errors import InputError

    assert parse_budget("1%") == pytest.approx(0.01)
    assert parse_budget(" 0.5 % ") == pytest.approx(0.005)
    assert parse_budget("0.02") == pytest.approx(0.02)
    assert parse_budget(0.1) == pytest.approx(0.1)
    for bad in ("one percent", "-1%", "5000%", "1%%"):
        with pytest.raises(InputError):
            parse_budget(bad)


def test_budget_keeps_fewest_layers_in_float(
    tmp_path: Path, tiny_model: Callable[[str], Path], emma: Path, pride: Path
) -> None:
    """Budget = half the all-quantized ppl increase: the chosen mixed model meets it, every smaller
    k tried misses it, the checkpoint holds float weights for exactly the kept layers, and the
    run's evaluation measures the same ppl the search did."""
    model = tiny_model("llama")
    code, full, _ = _run(tmp_path, model, emma, pride, "full")
    assert code == 0
    acc = json.loads((full / "accuracy.json").read_text())["accuracy"]
    worst = acc["ppl_quant"] / acc["ppl_ref"] - 1
    assert worst > 0
    budget = worst / 2
    code, out, _ = _run(
        tmp_path, model, emma, pride, "mixed", "--max-ppl-increase", f"{100 * budget:.6f}%"
    )
    assert code == 0
    summary = json.loads((out / "accuracy.json").read_text())
    b = summary["budget"]
    assert b["met"] and b["increase"] <= b["budget"] + 1e-12
    assert abs(b["budget"] - budget) < 1e-7
    k = len(b["float_layers"])
    assert 1 <= k <= 2 and len(b["ranking"]) == 2
    # minimal among the k tried: every smaller k measured misses the budget
    assert all(t["increase"] > b["budget"] for t in b["tried"] if t["k"] < k)
    assert b["float_layers"] == sorted(r["layer"] for r in b["ranking"][:k])
    # the all-quantized point of the search is the first run's model
    assert b["ppl_all_quantized"] == pytest.approx(acc["ppl_quant"], rel=1e-5)
    # the run's own evaluation of the exported mixed model is the search's number
    assert summary["accuracy"]["ppl_quant"] == pytest.approx(b["ppl"], rel=1e-5)
    assert summary["accuracy"]["ppl_ref"] == pytest.approx(b["ref_ppl"], rel=1e-5)
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    ex = cfg["exclude_modules"]
    tensors = load_file(str(out / "rank0.safetensors"))
    for i in range(2):
        for m in LAYER_MODULES:
            name = f"transformer.layers.{i}.{m}"
            kept = i in b["float_layers"]
            assert any(fnmatch.fnmatchcase(name, p) for p in ex) == kept, name
            assert any(fnmatch.fnmatchcase(f"{name}.weight", p) for p in ex) == kept, name
            assert (f"{name}.weights_scaling_factor" not in tensors) == kept, name
            if kept:
                assert tensors[f"{name}.weight"].is_floating_point(), name
    assert (
        summary["checkpoint_bytes"]
        > json.loads((full / "accuracy.json").read_text())["checkpoint_bytes"]
    )


def test_budget_refuses_what_it_cannot_serve(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A KV step, no evaluation data, a malformed budget: exit 2 before any work, no folder."""
    model = tiny_model("llama")
    kv = RTN + "  - calibrator: kv_cache\n    args: {format: int8}\n"
    cases = [
        ("kv", {"steps": kv}, ["--max-ppl-increase", "1%"], "kv_cache step"),
        ("noeval", {"evaluate": "false"}, ["--max-ppl-increase", "1%"], "needs evaluation data"),
        ("bad", {}, ["--max-ppl-increase", "lots"], "is not a number"),
    ]
    for name, kw, extra, msg in cases:
        code, out, _ = _run(tmp_path, model, emma, pride, name, *extra, **kw)
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (name, err)
        assert not out.exists() and "Traceback" not in err

"""The accuracy-diff report: metric functions on hand-computed cases, the layer analysis, MC scoring, the CLI."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from quantlab.calibrators.awq import fold_scale, gqa_index
from torch import nn

from quantlab.adapters import adapter_for
from quantlab.calibrator import LayerContext
from quantlab.cli import main
from quantlab.models import load_model
from quantlab.qmodules import QuantLinear
from quantlab.report.html import fmt_value, get
from quantlab.report.layers import analyse_layers, reference_passes
from quantlab.report.metrics import (
    ErrorStats,
    block_ids,
    paired_diff_interval,
    ppl_diff_interval,
    wilson_interval,
)
from quantlab.report.tasks import MCExample, MCTask, load_bigbench, load_mmlu, score_task
from quantlab.state import ModuleState, QuantState


def test_sqnr_of_a_known_noise() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g)
    noise = torch.randn(64, 32, generator=g)
    noise *= (ref.pow(2).sum() / noise.pow(2).sum() / 1000.0).sqrt()  # exactly 30 dB
    s = ErrorStats()
    s.add(ref, ref + noise)
    assert s.sqnr_db == pytest.approx(30.0, abs=1e-6)
    assert s.rel_error == pytest.approx(math.sqrt(1e-3), rel=1e-6)
    same = ErrorStats()
    same.add(ref, ref.clone())
    assert same.sqnr_db is None and same.rel_error == 0.0 and same.cosine == pytest.approx(1.0)
    flipped = ErrorStats()
    flipped.add(ref, -ref)
    assert flipped.cosine == pytest.approx(-1.0) and flipped.sqnr_db == pytest.approx(
        10 * math.log10(0.25)
    )


def test_wilson_interval_hand_computed() -> None:
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39677, abs=1e-4) and hi == pytest.approx(0.89223, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == pytest.approx(1.0)


def test_block_ids_never_cross_windows() -> None:
    b = block_ids([5, 3], block=2)
    assert b.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]


def test_bootstrap_interval_covers_the_true_difference() -> None:
    # Paired 0/1 outcomes where the quantized model is right 5 points less often: the 95 %
    # interval of the mean difference must cover -0.05 in about 95 % of repetitions.
    g = torch.Generator().manual_seed(1)
    hits = 0
    trials = 200
    for t in range(trials):
        ref = (torch.rand(300, generator=g) < 0.6).double()
        flip = torch.rand(300, generator=g)
        quant = torch.where(flip < 0.10, 1 - ref, ref)  # 10 % flipped ...
        quant = torch.where((flip < 0.10) & (ref == 0), ref, quant)  # ... only right -> wrong
        true = -0.10 * 0.6
        lo, hi = paired_diff_interval(ref, quant, resamples=400, seed=t)
        hits += lo <= true <= hi
    assert 0.88 <= hits / trials <= 0.99, hits


def test_ppl_interval_of_identical_models_is_zero() -> None:
    nll = torch.rand(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    r = ppl_diff_interval(nll, nll.clone(), block_ids([100, 100]))
    assert r["ppl_delta"] == 0.0 and r["ppl_delta_ci"] == [0.0, 0.0]
    shifted = ppl_diff_interval(nll, nll + 0.01, block_ids([100, 100]))
    lo, hi = shifted["ppl_delta_ci"]
    assert 0 < lo <= shifted["ppl_delta"] <= hi  # a uniform shift is significant
    assert shifted["ppl_delta_pct"] == pytest.approx(100 * (math.exp(0.01) - 1))


class _Unigram(nn.Module):
    """A 'model' whose next-token log-probs ignore the context: a fixed unigram table [V]."""

    def __init__(self, logp: torch.Tensor) -> None:
        super().__init__()
        self.logp = nn.Parameter(logp, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        b, n = input_ids.shape
        logits = self.logp.expand(b, n, -1)
        keep = _.get("logits_to_keep", 0)
        return type("Out", (), {"logits": logits[:, -keep:] if keep else logits})()


def test_mc_scoring_matches_hand_computed_loglik(embedded_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_dir))
    vocab = len(tok)
    logp = torch.full((vocab,), -20.0)
    words = {" red": -1.0, " blue": -2.0, " green": -0.5, " yes": -3.0, " no": -0.2}
    for w, v in words.items():
        (i,) = tok(w, add_special_tokens=False)["input_ids"]
        logp[i] = v
    task = MCTask(
        "fixture",
        "test",
        (
            MCExample("Colour:", (" red", " blue"), 0),  # red -1 > blue -2: right
            MCExample("Colour:", (" blue", " green"), 0),  # green wins: wrong
            MCExample("Answer: ", ("yes", "no"), 1),  # the context's trailing space moves
        ),
    )
    s = score_task(_Unigram(logp), tok, task, bos_id=0, show_progress=False)
    z = float(torch.logsumexp(logp, 0))  # the model's log-softmax normalizer
    want = [[-1.0, -2.0], [-2.0, -0.5], [-3.0, -0.2]]
    assert s.loglik == [[pytest.approx(v - z, abs=1e-4) for v in row] for row in want]
    assert s.correct.tolist() == [1.0, 0.0, 1.0]
    # acc_norm divides by the choice's characters: " red" -1/4 vs " blue" -2/5 -> red.
    assert s.correct_norm.tolist() == [1.0, 0.0, 1.0]
    assert task.chance == pytest.approx(0.5)


def test_task_loaders_and_their_errors(tmp_path: Path, data_file: Callable[[str], Path]) -> None:
    bb = load_bigbench(data_file("bigbench/general_knowledge.json"))
    assert len(bb.examples) == 70 and bb.examples[0].choices[bb.examples[0].gold] == "four"
    assert bb.examples[0].context.startswith("\nQ: How many legs") and "\n  choice: six" in (
        bb.examples[0].context
    )
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "astronomy_test.csv").write_text('"What orbits Earth?",Moon,Sun,Mars,Venus,A\n')
    (t,) = load_mmlu(mmlu)
    assert t.name == "mmlu/astronomy" and t.examples[0].gold == 0
    assert t.examples[0].context.endswith("D. Venus\nAnswer:")
    (mmlu / "bad_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(Exception, match="not an MMLU-format file"):
        load_mmlu(mmlu)
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"examples": [{"input": "2+2", "target": "4"}]}))
    with pytest.raises(Exception, match="generative"):
        load_bigbench(gen)


def _identity_variant(model: nn.Module, fold: bool) -> tuple[nn.Module, QuantState]:
    """A copy of model whose linears are QuantLinears with no format (float), optionally with random
    scale folds applied (recorded as a calibrator records them): its output equals the model's."""
    quant = copy.deepcopy(model)
    adapter = adapter_for(quant)
    state = QuantState()
    g = torch.Generator().manual_seed(3)
    for i, layer in enumerate(quant.get_submodule(adapter.layers)):
        ctx = LayerContext(i, f"model.layers.{i}", layer, list(adapter.linears), adapter, list)
        if fold:
            for norm, members in adapter.smoothing_groups:
                fold_scale(ctx, norm, members, torch.rand(128, generator=g) * 4 + 0.1)
            s = torch.rand(64, generator=g) * 4 + 0.1
            fold_scale(ctx, "self_attn.v_proj", (), s)
            fold_scale(ctx, None, ("self_attn.o_proj",), s[gqa_index(128, 64, 32)])
        state.update(ctx.prefix, {n: ModuleState(tensors=t) for n, t in ctx.folds.items()})
        for n in adapter.linears:
            parent, _, child = n.rpartition(".")
            lin = layer.get_submodule(n)
            assert isinstance(lin, nn.Linear)
            setattr(layer.get_submodule(parent), child, QuantLinear(lin, ModuleState()))
    return quant, state


@pytest.mark.parametrize("fold", [False, True])
def test_layer_analysis_of_an_unquantized_variant_shows_no_error(
    fold: bool, tiny_model: Callable[[str], Path], pride: Path
) -> None:
    from quantlab.data import DataSpec, load_windows

    ref, tok = load_model(str(tiny_model("llama")))
    windows = load_windows(DataSpec(path=str(pride), num_samples=2, seq_len=48, bos_id=0), tok, ref)
    quant, state = _identity_variant(ref, fold)
    adapter = adapter_for(ref)
    la = analyse_layers(ref, quant, state, adapter, reference_passes(ref, adapter, windows))
    assert len(la.linears) == 2 * 7
    for r in la.linears:
        if fold:  # folding is exact in real arithmetic; float32 rounding stays far below INT8 noise
            assert r["rel_error"] < 1e-5 and (r["sqnr_db"] is None or r["sqnr_db"] > 90), r
        else:
            assert r["sqnr_db"] is None and r["rel_error"] == 0.0 and r["weight_sqnr_db"] is None
    for row in la.layers:
        assert row["growth_rel_error"] < 1e-5 and row["local_rel_error"] < 1e-5
        assert abs(row["sensitivity_kl"]) < 1e-6 and abs(row["sensitivity_nll_delta"]) < 1e-5


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str, str, str]] = []
        self._open: tuple[str, str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "data-path" in a:
            self._open = (str(a["data-path"]), str(a["data-value"]), str(a["data-kind"]))
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open:
            self.cells.append((*self._open, self._text))
            self._open = None


def _tiny_run(
    name: str,
    steps: list[dict[str, Any]],
    model: Path,
    out: Path,
    emma: Path,
    pride: Path,
    report: dict[str, Any] | None = None,
) -> Path:
    from quantlab.pipeline import run_recipe
    from quantlab.recipe import Recipe

    data = {"source": "file", "num_samples": 2, "seq_len": 48, "bos_id": 0}
    recipe = Recipe.model_validate(
        {
            "name": name,
            "model": {"source": str(model)},
            "calibration": {**data, "path": str(emma)},
            "steps": steps,
            "export": {"output_dir": str(out / name)},
            "evaluation": {"data": {**data, "path": str(pride)}},
            "report": report or {},
        }
    )
    run_recipe(recipe, out, show_progress=False)
    return out / name


@pytest.mark.slow
def test_report_cli_end_to_end(
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    emma: Path,
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tiny_model("llama")
    rtn = _tiny_run(
        "rtn",
        [{"calibrator": "rtn", "args": {"format": "int4_g32_sym"}}],
        model,
        tmp_path,
        emma,
        pride,
    )
    awq_args = {"format": "int4_g32_sym", "grid": 4, "max_tokens": 64}
    own = {"enabled": True, "layer_windows": 1, "sensitivity": False}
    awq_steps = [{"calibrator": "awq", "args": awq_args}]
    awq = _tiny_run("awq", awq_steps, model, tmp_path, emma, pride, own)
    # The recipe's report: section wrote its own report beside the run.
    own_doc = json.loads((tmp_path / "awq-report" / "report.json").read_text())
    assert (
        own_doc["variants"][0]["name"] == "awq"
        and "sensitivity_kl" not in own_doc["variants"][0]["layers"][0]
    )
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "colours_test.csv").write_text(
        "Sky?,blue,red,green,black,A\nGrass?,red,green,blue,white,B\n"
    )
    out = tmp_path / "report"
    argv = [
        "--quiet",
        "report",
        str(model),
        str(rtn),
        str(awq),
        "-o",
        str(out),
        "--layer-windows",
        "2",
    ]
    assert main([*argv, "--task", str(mmlu)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in doc["variants"]] == ["rtn", "awq"]
    for v in doc["variants"]:
        m = v["model"]
        lo, hi = m["ppl_delta_ci"]
        assert lo <= m["ppl_delta"] <= hi and m["kl_mean"] > 0
        assert len(v["linears"]) == 14 and len(v["layers"]) == 2
        # INT4 g32 on a random-init model: every linear is noisy but far from useless.
        assert all(5 < r["sqnr_db"] < 40 for r in v["linears"]), v["linears"]
        assert v["tasks"][0]["n"] == 2
        assert f"| {v['name']} |" in printed
    # Every number cell of the HTML is a JSON value, displayed in its format.
    parser = _Cells()
    parser.feed((out / "report.html").read_text())
    assert len(parser.cells) > 60
    for path, value, kind, text in parser.cells:
        assert json.loads(value) == get(doc, path), path
        assert text == fmt_value(get(doc, path), kind), path
    assert (out / "report.html").read_text().count("<svg") >= 5
    # Bad input: a folder that is not a run, and a variant of another model.
    assert main(["--quiet", "report", str(model), str(tmp_path), "-o", str(tmp_path / "r2")]) == 2
    other = tiny_model("qwen2")
    assert main(["--quiet", "report", str(other), str(rtn), "-o", str(tmp_path / "r3")]) == 2
    assert "another model" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()

"""Calibrators are found by name through the entry-point group; a third party's plugs in unchanged."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantlab.calibrator import Calibrator, available_calibrators, build_calibrator, get_calibrator
from quantlab.errors import InputError
from quantlab.pipeline import run_recipe
from quantlab.recipe import Recipe
from quantlab.state import QuantState

PLUGIN = '''
"""A third-party calibrator: int8 per-channel weights, scales clipped to a percentile of |W|."""
from typing import ClassVar
import torch
from quantlab.calibrator import CalibratorArgs, LayerContext
from quantlab.formats import QuantFormat
from quantlab.primitives import quantize
from quantlab.state import ModuleState

class Args(CalibratorArgs):
    quantile: float = 0.999

class ClipInt8:
    name: ClassVar[str] = "clip_int8"
    Args: ClassVar[type[CalibratorArgs]] = Args
    edits_weights: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    seen: ClassVar[dict[str, int]] = {}

    def __init__(self, args):
        self.q = args.quantile
        self.fmt = QuantFormat("int8", "channel")

    def planned_formats(self):
        return self.fmt, None

    def targets(self, ctx: LayerContext):
        return list(ctx.linears)

    def observe(self, name, x):
        ClipInt8.seen[name] = ClipInt8.seen.get(name, 0) + x.shape[-2]

    def solve(self, ctx):
        out = {}
        for n in ctx.linears:
            w = ctx.weight(n)
            s = torch.quantile(w.abs().float(), self.q, dim=1) / 127
            out[n] = ModuleState(self.fmt, None, {"qweight": quantize(w, s, None, self.fmt), "weight_scale": s})
        return out
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type:
    (tmp_path / "ql_plugin_test.py").write_text(PLUGIN)
    dist = tmp_path / "ql_plugin_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ql-plugin-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [quantlab.calibrators]
        clip_int8 = ql_plugin_test:ClipInt8
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return get_calibrator("clip_int8")


def test_builtins_are_registered_like_third_parties() -> None:
    eps = available_calibrators()
    assert eps["rtn"].value == "quantlab.calibrators.rtn:RTNCalibrator"
    assert eps["fp8"].value == "quantlab.calibrators.fp8:FP8Calibrator"
    assert isinstance(build_calibrator("rtn", {"format": "int4_g64_sym"}), Calibrator)


def test_unknown_calibrator_lists_registered() -> None:
    with pytest.raises(
        InputError, match=r"Unknown calibrator 'gptqq'\. Registered calibrators: .*fp8.*rtn"
    ):
        get_calibrator("gptqq")


def test_third_party_calibrator_runs_through_the_runner(
    plugin: type, tiny_model: Callable[[str], Path], tmp_path: Path, emma: Path
) -> None:
    data = {"source": "file", "path": str(emma), "num_samples": 2, "seq_len": 48, "bos_id": 0}
    recipe = Recipe.model_validate(
        {
            "name": "plugin",
            "model": {"source": str(tiny_model("llama"))},
            "calibration": data,
            "steps": [{"calibrator": "clip_int8", "args": {"quantile": 0.99}}],
            "export": {"output_dir": str(tmp_path / "out")},
            "evaluation": {"enabled": False},
        }
    )
    res = run_recipe(recipe, tmp_path, show_progress=False)
    assert res.quant_algo == "W8A16"
    # It observed every linear of both layers on all 2 x 48 calibration tokens.
    assert (
        plugin.seen["self_attn.q_proj"] == 2 * 2 * 48 and plugin.seen["mlp.down_proj"] == 2 * 2 * 48
    )
    state = QuantState.load(tmp_path / "out" / "quantlab")
    q = state.modules["model.layers.1.mlp.up_proj"].tensors["qweight"]
    assert (
        q.dtype == torch.int8 and int(q.abs().max()) == 127
    )  # clipped: the largest weights saturate

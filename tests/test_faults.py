"""Property tests: kills at any layer (and mid-write) resume to identical results; the recipe parser never crashes.

The kill is simulated in process: a BaseException raised inside the resume folder's writer at
the chosen point stops the run with nothing after it executed, which is what SIGKILL leaves on
disk (every file there is written under a temporary name and renamed). The real SIGKILL is
tests/test_resume.py's subprocess test.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from quantlab.adapters import adapter_for
from quantlab.calibrator import build_calibrator
from quantlab.data import DataSpec, load_windows
from quantlab.errors import QuantlabError
from quantlab.recipe import load_recipe
from quantlab.resume import LayerCheckpoint
from quantlab.runner import RunnerConfig, quantize_model

LAYERS = 4


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise point runs."""


@pytest.fixture(scope="module")
def setup(tiny_model: Callable[[str], Path], emma: Path) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=2, seq_len=32, bos_id=0), tok
    )
    return {"model": model, "windows": windows}


def _calibrate(
    setup: dict[str, Any], ckpt: Path | None
) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """(QuantState files, float state dict) of one full calibration, resuming from ckpt if given."""
    model = copy.deepcopy(setup["model"])
    steps = [
        build_calibrator("awq", {"format": "int4_g32_asym", "grid": 3}),
        build_calibrator("gptq", {"format": "int4_g32_asym"}),
    ]
    cfg = RunnerConfig(show_progress=False, checkpoint_dir=ckpt, fingerprint="fp")
    state = quantize_model(model, adapter_for(model), setup["windows"], steps, cfg)
    with tempfile.TemporaryDirectory() as d:
        state.save(Path(d))
        files = {p.name: p.read_bytes() for p in Path(d).iterdir()}
    return files, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def straight(setup: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    return _calibrate(setup, None)


# A kill point: (layer, "after" = once progress.json records it, "before" = its files are written
# but progress.json still points to the previous layer).
KILL = st.tuples(st.integers(0, LAYERS - 1), st.sampled_from(["after", "before"]))


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kills=st.lists(KILL, min_size=1, max_size=3))
def test_any_sequence_of_kills_then_resume_is_identical(
    setup: dict[str, Any],
    straight: tuple[dict[str, bytes], dict[str, torch.Tensor]],
    kills: list[tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = LayerCheckpoint._write_progress
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "resume"
        for layer, when in kills:

            def write(
                self: LayerCheckpoint, done: int, layer: int = layer, when: str = when
            ) -> None:
                if when == "before" and done == layer + 1:
                    raise _Killed
                real(self, done)
                if when == "after" and done == layer + 1:
                    raise _Killed

            monkeypatch.setattr(LayerCheckpoint, "_write_progress", write)
            with contextlib.suppress(_Killed):
                _calibrate(setup, ckpt)
            monkeypatch.setattr(LayerCheckpoint, "_write_progress", real)
        files, tensors = _calibrate(setup, ckpt)
    want_files, want_tensors = straight
    assert files == want_files
    assert tensors.keys() == want_tensors.keys()
    assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors)


# --- the recipe parser and --set under random input: a result or a QuantlabError, nothing else ---

KEYS = st.sampled_from(
    ["name", "model", "source", "steps", "calibrator", "args", "format", "export", "output_dir",
     "tp_size", "calibration", "num_samples", "seq_len", "evaluation", "enabled", "data", "runner",
     "x", "0", ""]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=10)
    | st.sampled_from(["rtn", "int4_g64_sym", "embedded:smollm2", "out", "${HOME}", "${NOPE_QL}"])
)
VALUES = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(KEYS, c, max_size=4), max_leaves=12
)
BASE = {
    "name": "f",
    "steps": [{"calibrator": "rtn", "args": {"format": "int4_g64_sym"}}],
    "export": {"output_dir": "out"},
    "evaluation": {"enabled": False},
}


def _load(text: str, sets: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(text, encoding="utf-8")
        try:
            load_recipe(p, sets)
        except QuantlabError as e:
            assert str(e).strip()


@settings(max_examples=80, deadline=None)
@given(doc=st.dictionaries(KEYS, VALUES, max_size=6), merge=st.booleans())
def test_random_recipe_documents(doc: dict[str, Any], merge: bool) -> None:
    _load(yaml.safe_dump({**BASE, **doc} if merge else doc), [])


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@ \n\t0.$")), max_size=60))
def test_random_recipe_text(text: str) -> None:
    _load(text, [])


SET_CHARS = st.sampled_from(list("abcdefgnmos_.=0123[]{}: -'\"!&*"))


@settings(max_examples=100, deadline=None)
@given(
    sets=st.lists(
        st.one_of(
            st.text(alphabet=SET_CHARS, max_size=24),
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
                ["export.tp_size", "steps.0.args.format", "steps.1", "steps.0", "name.x", "model",
                 "calibration.num_samples", "runner.exclude.0", "steps.-1.args", "a..b"]
            ), st.text(alphabet=SET_CHARS, max_size=12)),
        ),
        max_size=4,
    )
)  # fmt: skip
def test_random_set_overrides(sets: list[str]) -> None:
    _load(yaml.safe_dump(BASE), sets)

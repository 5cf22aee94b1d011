"""manifest.json provenance and `quantlab check-export` (manifest hashes + TensorRT-LLM loader rules)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from quantlab.cli import main

RECIPE = """\
name: man
model:
  source: {model}
calibration:
  source: file
  path: {emma}
  num_samples: 2
  seq_len: 32
steps:
  - calibrator: rtn
    args: {{format: int8_channel}}
  - calibrator: kv_cache
    args: {{format: int8}}
export:
  output_dir: {out}
evaluation:
  enabled: false
"""


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path], emma: Path
) -> Path:
    d = tmp_path_factory.mktemp("manifest")
    (d / "r.yaml").write_text(RECIPE.format(model=tiny_model("llama"), emma=emma, out=d / "out"))
    assert main(["--quiet", "run", str(d / "r.yaml")]) == 0
    return d / "out"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_manifest_records_files_model_data_and_versions(
    run_dir: Path, tiny_model: Callable[[str], Path], emma: Path
) -> None:
    doc = json.loads((run_dir / "manifest.json").read_text())
    files = doc["files"]
    assert {"config.json", "rank0.safetensors", "accuracy.json", "quantlab.log"} <= set(files)
    assert files["rank0.safetensors"]["sha256"] == _sha(run_dir / "rank0.safetensors")
    model = tiny_model("llama")
    assert doc["model"]["files"]["model.safetensors"]["sha256"] == _sha(model / "model.safetensors")
    assert doc["data"]["calibration"]["sha256"] == _sha(emma)
    assert doc["recipe"]["name"] == "man" and doc["recipe"]["steps"][1]["calibrator"] == "kv_cache"
    assert doc["versions"]["quantlab"] and doc["versions"]["torch"]
    assert doc["device"]["device"] == "cpu" and doc["calibration_seconds"] > 0


def test_check_export_is_clean_on_a_fresh_run(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-export", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_check_export_finds_tampering_and_broken_rules(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _copy(run_dir, tmp_path / "c")
    (d / "extra.txt").write_text("x")
    rank = d / "rank0.safetensors"
    t = load_file(str(rank))
    del t["transformer.layers.1.mlp.fc.per_channel_scale"]
    t["transformer.layers.0.attention.kv_cache_scaling_factor"] *= -1
    save_file(t, str(rank))
    conf = json.loads((d / "config.json").read_text())
    conf["quantization"]["exclude_modules"] = ["lm_head"]  # replaces TensorRT-LLM's defaults
    (d / "config.json").write_text(json.dumps(conf))
    assert main(["check-export", str(d)]) == 1
    out = capsys.readouterr().out
    assert "manifest: rank0.safetensors: changed since it was written" in out
    assert "manifest: config.json: changed" in out and "extra.txt: not listed" in out
    assert "transformer.layers.1.mlp.fc.per_channel_scale is missing" in out
    assert "kv_cache_scaling_factor holds zero, negative or non-finite" in out
    assert "does not cover transformer.vocab_embedding" in out


def test_check_export_on_a_folder_that_is_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-export", str(tmp_path)]) == 2
    assert "not a TensorRT-LLM checkpoint" in capsys.readouterr().err

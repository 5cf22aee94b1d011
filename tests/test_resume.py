"""Resume after SIGKILL (bit-identical checkpoint), per-layer profiles, layer offloading."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantlab.adapters import adapter_for
from quantlab.calibrator import build_calibrator
from quantlab.cli import main
from quantlab.data import DataSpec, load_windows
from quantlab.models import load_model
from quantlab.runner import KILL_AFTER_LAYER_ENV, LayerProfile, RunnerConfig, quantize_model

# AWQ edits float weights (norms, v/o, up/down) and GPTQ updates them: a resumed run has to restore
# both the edited float tensors and the codes to match a straight run bit for bit.
RECIPE = """\
name: resume-test
model:
  source: {model}
calibration:
  source: file
  path: {emma}
  num_samples: 3
  seq_len: 48
steps:
  - calibrator: awq
    args: {{format: int4_g32_asym, grid: 4}}
  - calibrator: gptq
    args: {{format: int4_g32_asym}}
export:
  output_dir: {out}
  dtype: float32
evaluation:
  enabled: false
"""


def _run(recipe: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_LAYER_ENV}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "quantlab.cli", "--quiet", "run", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _files(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name not in ("accuracy.json", "quantlab.log", "manifest.json")
    }


def test_sigkill_then_restart_gives_a_bit_identical_checkpoint(
    tmp_path: Path, tiny_model: Callable[[str], Path], emma: Path
) -> None:
    model = tiny_model("llama")
    # Same recipe text (relative output folder) in two folders, so even quant_state.json's copy
    # of the recipe must match byte for byte.
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "r.yaml").write_text(RECIPE.format(model=model, emma=emma, out="out"))
    straight, resumed = tmp_path / "a" / "out", tmp_path / "b" / "out"

    # The straight and the resumed run go in process (no interpreter start), on one thread like
    # the killed subprocess (OMP_NUM_THREADS=1): float sums must see the same reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--quiet", "run", str(tmp_path / "a" / "r.yaml")]) == 0
        killed = _run(tmp_path / "b" / "r.yaml", {KILL_AFTER_LAYER_ENV: "0"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not resumed.exists()
        progress = json.loads((tmp_path / "b" / "out.resume" / "progress.json").read_text())
        assert progress["done"] == 1
        assert (tmp_path / "b" / "out.resume" / "layer_0000" / "float.safetensors").is_file()
        assert main(["--quiet", "run", str(tmp_path / "b" / "r.yaml")]) == 0
    finally:
        torch.set_num_threads(threads)

    log = (resumed / "quantlab.log").read_text()
    assert "resuming after layer 0 of 2" in log
    prof = json.loads((resumed / "accuracy.json").read_text())["calibration_profile"]["layers"]
    assert [p["resumed"] for p in prof] == [True, False]
    assert not (tmp_path / "b" / "out.resume").exists()
    assert not list((tmp_path / "b").glob(".out.tmp-*"))  # the killed run's temp folder was removed

    a, b = _files(straight), _files(resumed)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ


def test_resume_folder_of_another_recipe_is_discarded(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, tok = load_model(str(tiny_model("llama")))
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=2, seq_len=32, bos_id=0), tok
    )
    ckpt = tmp_path / "out.resume"

    def calibrate(fp: str) -> None:
        cfg = RunnerConfig(show_progress=False, checkpoint_dir=ckpt, fingerprint=fp)
        steps = [build_calibrator("gptq", {"format": "int4_g32_asym"})]
        quantize_model(copy.deepcopy(model), adapter_for(model), windows, steps, cfg)

    calibrate("recipe-a")
    assert json.loads((ckpt / "progress.json").read_text()) == {
        "fingerprint": "recipe-a",
        "done": 2,
    }
    with caplog.at_level(logging.INFO, logger="quantlab"):
        calibrate("recipe-b")
    assert "belongs to a different recipe" in caplog.text and "resuming" not in caplog.text
    assert json.loads((ckpt / "progress.json").read_text())["fingerprint"] == "recipe-b"


def test_profile_has_one_entry_per_layer(tiny_model: Callable[[str], Path], emma: Path) -> None:
    model, tok = load_model(str(tiny_model("qwen2")))
    windows = load_windows(
        DataSpec(source="file", path=str(emma), num_samples=2, seq_len=32, bos_id=0), tok
    )
    profile: list[LayerProfile] = []
    quantize_model(
        model,
        adapter_for(model),
        windows,
        [build_calibrator("fp8", {})],
        RunnerConfig(show_progress=False),
        profile=profile,
    )
    assert [p.layer for p in profile] == [0, 1]
    assert all(p.seconds > 0 and not p.resumed for p in profile)
    if sys.platform == "linux":
        assert all(p.peak_host_mb is not None and p.peak_host_mb > 50 for p in profile)
    assert all(p.peak_device_mb is None for p in profile)  # CPU run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_keeps_only_one_layer_on_the_gpu() -> None:
    # Self-contained (no tokenizer or data files) so it runs on a bare GPU machine.
    from transformers import LlamaConfig, LlamaForCausalLM

    # Large enough that library workspaces (cuBLAS's, tens of MiB) do not dominate the peak.
    cfg = LlamaConfig(
        vocab_size=8000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    windows = [torch.randint(0, 8000, (64,)) for _ in range(4)]
    profile: list[LayerProfile] = []
    run = RunnerConfig(show_progress=False, device="cuda", offload=True)
    # The class itself, not the registry: a bare GPU machine may not have quantlab pip-installed.
    from quantlab.calibrators.gptq import GPTQArgs, GPTQCalibrator

    gptq = GPTQCalibrator(GPTQArgs())
    state = quantize_model(model, adapter_for(model), windows, [gptq], run, profile=profile)
    assert len(state.modules) == 24 * 7
    assert all(t.device.type == "cpu" for ms in state.modules.values() for t in ms.tensors.values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    assert len(profile) == 24
    peaks = [p.peak_device_mb * 2**20 for p in profile if p.peak_device_mb is not None]
    assert len(peaks) == 24
    # One layer at a time: the peak does not grow with depth (no layer or result is left behind
    # on the GPU) and stays well below the whole model. For a model this small the per-layer work
    # space (Hessians, solver and cuBLAS buffers) is several layers' worth, hence 24 layers.
    assert max(peaks) - min(peaks) < 0.5 * layer_bytes, [round(x / 2**20) for x in peaks]
    assert max(peaks) < 0.5 * model_bytes, (max(peaks) / 2**20, model_bytes / 2**20)

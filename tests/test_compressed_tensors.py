"""compressed-tensors export, proven by its consumer: transformers + compressed-tensors load the folder.

The folder is written by compressed-tensors' ModelCompressor from quantlab's QuantState; the test
loads it with `AutoModelForCausalLM.from_pretrained` (which decompresses on the CPU) and checks
that its perplexity on the run's evaluation windows equals the number quantlab reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quantlab.cli import main
from quantlab.data import DataSpec, load_windows

RECIPE = """\
name: ct
model:
  source: {model}
steps:
  - calibrator: {cal}
    args: {{format: {fmt}}}
export:
  format: [trtllm, compressed_tensors]
  output_dir: {out}
  dtype: float32
evaluation:
  data: {{source: file, path: {pride}, num_samples: 2, seq_len: 64, bos_id: 0}}
"""


@pytest.mark.parametrize(
    ("cal", "fmt", "bits"),
    [
        ("rtn", "int4_g32_sym", 4),
        pytest.param("gptq", "int4_g32_sym", 4, marks=pytest.mark.slow),
        ("rtn", "int8_channel", 8),
    ],
)
def test_transformers_loads_it_with_quantlabs_perplexity(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    perplexity: Callable[[torch.nn.Module, list[torch.Tensor]], float],
    cal: str,
    fmt: str,
    bits: int,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model("qwen2")
    recipe = RECIPE.format(model=model_dir, cal=cal, fmt=fmt, out=tmp_path / "out", pride=pride)
    if cal == "gptq":
        recipe = recipe.replace(
            "steps:",
            f"calibration: {{source: file, path: {emma}, num_samples: 2, seq_len: 64}}\nsteps:",
        )
    (tmp_path / "r.yaml").write_text(recipe)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    folder = tmp_path / "out" / "compressed_tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert qc["ignore"] == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = load_windows(
        DataSpec(source="file", path=str(pride), num_samples=2, seq_len=64, bos_id=0), tok
    )
    reported = json.loads((tmp_path / "out" / "accuracy.json").read_text())["accuracy"]
    assert perplexity(loaded, windows) == pytest.approx(reported["ppl_quant"], rel=1e-3)
    # A random tiny model's perplexity hardly moves: the logits must be quantlab's exactly.
    from quantlab.export.reload import load_quantized

    sim, _ = load_quantized(tmp_path / "out" / "quantlab")
    with torch.no_grad():
        ids = windows[0].view(1, -1)
        assert torch.equal(loaded(input_ids=ids).logits, sim(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("cal", "args", "fmt", "expect"),
    [
        ("smoothquant", "{}", "int-quantized", (8, "int", "tensor", False)),
        ("smoothquant", "{activations: dynamic_token}", "int-quantized", (8, "int", "token", True)),
        ("fp8", "{}", "float-quantized", (8, "float", "tensor", False)),
        (
            "fp8",
            "{weights: channel, activations: dynamic_token}",
            "float-quantized",
            (8, "float", "token", True),
        ),
    ],
)
def test_w8a8_and_fp8_load_with_quantlabs_perplexity(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    perplexity: Callable[[torch.nn.Module, list[torch.Tensor]], float],
    cal: str,
    args: str,
    fmt: str,
    expect: tuple[int, str, str, bool],
) -> None:
    """W8A8 INT8 (static / dynamic per-token) and FP8 through the library's int-/float-quantized
    formats: transformers applies the activation quantization itself when it runs the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = RECIPE.format(
        model=tiny_model("qwen2"), cal=cal, fmt="x", out=tmp_path / "out", pride=pride
    ).replace("{format: x}", args)
    recipe = recipe.replace(
        "steps:",
        f"calibration: {{source: file, path: {emma}, num_samples: 2, seq_len: 64}}\nsteps:",
    )
    (tmp_path / "r.yaml").write_text(recipe)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    folder = tmp_path / "out" / "compressed_tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["type"], acts["strategy"], acts["dynamic"]) == expect
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    windows = load_windows(
        DataSpec(source="file", path=str(pride), num_samples=2, seq_len=64, bos_id=0), tok
    )
    reported = json.loads((tmp_path / "out" / "accuracy.json").read_text())["accuracy"]
    got = perplexity(loaded, windows)
    if expect[1:] != ("int", "token", True):
        assert got == pytest.approx(reported["ppl_quant"], rel=1e-3)
    # Perplexity alone cannot tell (a random tiny model is near-uniform): the logits must be
    # quantlab's simulated model's, and measurably not those without activation quantization.
    from quantlab.export.reload import load_quantized

    sim, _ = load_quantized(tmp_path / "out" / "quantlab")
    if expect[1:] == ("int", "token", True):
        # compressed-tensors' own per-token INT8 scale is amax / 127.5 (its symmetric bit range
        # 255 / 2), quantlab's and vLLM's kernel's amax / 127: transformers runs the former.
        for m in sim.modules():
            if getattr(m, "input_format", None) is not None:
                m.input_format = dataclasses.replace(m.input_format, scale_method="half_step")
    ids = windows[0].view(1, -1)
    with torch.no_grad():
        ours, theirs = sim(input_ids=ids).logits, loaded(input_ids=ids).logits
        for m in sim.modules():
            if hasattr(m, "input_format"):
                m.input_format = None
        weights_only = sim(input_ids=ids).logits
    off, act = float((theirs - ours).abs().max()), float((weights_only - ours).abs().max())
    print(f"{cal} {args}: loaded vs quantlab {off:.3g}, activation quantization moves {act:.3g}")
    assert off <= 0.02 * act


@pytest.mark.parametrize(
    ("fmt", "why"),
    [("int4_g32_asym", "asymmetric weights"), ("int8_channel", "a KV-cache step")],
)
def test_formats_it_cannot_express_are_refused_before_calibration(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    pride: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    why: str,
) -> None:
    text = RECIPE.format(
        model=tiny_model("llama"), cal="rtn", fmt=fmt, out=tmp_path / "out", pride=pride
    )
    if why == "a KV-cache step":
        text = text.replace("export:", "  - calibrator: kv_cache\n    args: {format: fp8}\nexport:")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "compressed_tensors cannot be written" in err and why in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_quantlab_export_rewrites_a_finished_run_without_calibrating(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import AutoModelForCausalLM

    text = RECIPE.format(
        model=tiny_model("llama"), cal="rtn", fmt="int8_channel", out=tmp_path / "out", pride=pride
    ).replace("format: [trtllm, compressed_tensors]", "format: trtllm")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    run = tmp_path / "out"
    assert not (run / "compressed_tensors").exists()
    assert main(["export", str(run), "--format", "compressed_tensors"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(str(run / "compressed_tensors")).eval()
    ids = torch.tensor([[0, 11, 400, 7, 90]])
    from quantlab.export.reload import load_quantized

    sim, _ = load_quantized(run / "quantlab")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, sim(ids).logits)
    capsys.readouterr()
    assert main(["check-export", str(run)]) == 0  # the manifest records the re-export
    assert json.loads((run / "manifest.json").read_text())["added_later"][0]["what"] == (
        "compressed_tensors"
    )
    assert main(["export", str(run), "--format", "compressed_tensors"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


def test_check_export_compressed_tensors_names_each_broken_rule(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    text = RECIPE.format(
        model=tiny_model("llama"), cal="rtn", fmt="int4_g32_sym", out=tmp_path / "out", pride=pride
    )
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    good = tmp_path / "out" / "compressed_tensors"
    assert main(["check-export", str(good), "--target", "compressed_tensors"]) == 0
    cases = [
        ("model.layers.1.mlp.up_proj.weight_scale", "", "weight_scale is missing"),
        ("model.layers.0.self_attn.q_proj.weight_packed", "", "weight_packed is missing"),
        ("", "model.layers.9.mlp.up_proj", "names no module"),
    ]
    for i, (drop, ignore, expect) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        tensors = load_file(str(bad / "model.safetensors"))
        tensors.pop(drop, None)
        save_file(tensors, str(bad / "model.safetensors"))
        conf = json.loads((bad / "config.json").read_text())
        conf["quantization_config"]["ignore"] += [ignore] if ignore else []
        (bad / "config.json").write_text(json.dumps(conf))
        capsys.readouterr()
        assert main(["check-export", str(bad)]) == 1
        out = capsys.readouterr().out
        assert expect in out and out.strip().endswith("1 problem(s)"), out

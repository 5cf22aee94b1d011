"""ModelOpt unified HF export, checked against ModelOpt's own export of the same tiny model.

For each quant_algo quantlab writes, nvidia-modelopt (installed on this CPU machine) quantizes the
same tiny Llama with its matching config and writes its folder with `export_hf_checkpoint`; the
two folders must agree on tensor names, dtypes and shapes and on the config fields, except the
differences docs/export.md names (each asserted here, so a new one fails). quantlab's folder also
reads back into exactly the run's QuantState.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantlab.cli import main

# One worker runs this module: its module fixture (five runs and five ModelOpt exports, ~28 s)
# would otherwise be built on both (`make test` distributes with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("modelopt_hf")

RECIPE = """\
name: mo
model:
  source: {model}
  dtype: float16
calibration: {{source: file, path: {emma}, num_samples: 2, seq_len: 64}}
steps:
{steps}
export:
  format: [trtllm, modelopt_hf]
  output_dir: {out}
  dtype: float16
evaluation:
  data: {{source: file, path: {pride}, num_samples: 2, seq_len: 64, bos_id: 0}}
"""

# quant_algo -> (quantlab steps, ModelOpt config name, ModelOpt block size, FP8 KV)
CASES: dict[str, tuple[str, str, int | None, bool]] = {
    "W8A16": (
        "  - calibrator: rtn\n    args: {format: int8_channel}",
        "INT8_WEIGHT_ONLY_CFG",
        None,
        False,
    ),
    "W4A16_AWQ": (
        "  - calibrator: awq\n    args: {format: int4_g32_sym, grid: 4}",
        "INT4_AWQ_CFG",
        32,
        False,
    ),
    "FP8": (
        "  - calibrator: fp8\n  - calibrator: kv_cache\n    args: {format: fp8}",
        "FP8_DEFAULT_CFG",
        None,
        True,
    ),
    "FP8_PER_CHANNEL_PER_TOKEN": (
        "  - calibrator: fp8\n    args: {weights: channel, activations: dynamic_token}",
        "FP8_PER_CHANNEL_PER_TOKEN_CFG",
        None,
        False,
    ),
    "W8A8_SQ_PER_CHANNEL": ("  - calibrator: smoothquant", "INT8_SMOOTHQUANT_CFG", None, False),
}


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    modelopt_export: Callable[..., Path],
) -> dict[str, tuple[Path, Path]]:
    """quant_algo -> (quantlab's run folder, ModelOpt's export folder), tiny Llama, fp16."""
    pytest.importorskip("modelopt")
    model_dir = tiny_model("llama")
    root = tmp_path_factory.mktemp("modelopt")
    out: dict[str, tuple[Path, Path]] = {}
    for algo, (steps, cfg, block, kv) in CASES.items():
        run = root / f"ql-{algo}"
        (root / f"{algo}.yaml").write_text(
            RECIPE.format(model=model_dir, emma=emma, pride=pride, steps=steps, out=run)
        )
        assert main(["--quiet", "run", str(root / f"{algo}.yaml")]) == 0
        out[algo] = (run, modelopt_export(model_dir, cfg, block, kv, root / f"mo-{algo}"))
    return out


@pytest.mark.parametrize("algo", list(CASES))
def test_same_tensors_dtypes_shapes_and_config_as_modelopt(
    runs: dict[str, tuple[Path, Path]], algo: str, tensor_layout: Callable[[Path], Any]
) -> None:
    ours_dir, theirs_dir = runs[algo][0] / "modelopt_hf", runs[algo][1]
    ours, theirs = tensor_layout(ours_dir), tensor_layout(theirs_dir)
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert v == theirs[k], k
    hq_ours = json.loads((ours_dir / "hf_quant_config.json").read_text())
    hq_theirs = json.loads((theirs_dir / "hf_quant_config.json").read_text())
    assert hq_ours["producer"]["name"] == "quantlab" and hq_theirs["producer"]["name"] == "modelopt"
    assert hq_ours["quantization"] == hq_theirs["quantization"]
    qc_ours = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    qc_theirs = json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    qc_ours.pop("producer"), qc_theirs.pop("producer")
    assert qc_ours == qc_theirs
    # The rest of config.json is the model's HF config, as ModelOpt writes it.
    c_ours = json.loads((ours_dir / "config.json").read_text())
    c_theirs = json.loads((theirs_dir / "config.json").read_text())
    for key in (
        "architectures",
        "hidden_size",
        "num_key_value_heads",
        "tie_word_embeddings",
        "dtype",
    ):
        assert c_ours[key] == c_theirs[key], key


@pytest.mark.parametrize("algo", list(CASES))
def test_folder_reads_back_into_the_runs_quantstate(
    runs: dict[str, tuple[Path, Path]], algo: str
) -> None:
    from quantlab.export.modelopt_hf import read_modelopt_hf
    from quantlab.export.reload import FLOAT_FILE
    from quantlab.state import QuantState
    from quantlab.tensorio import load_tensors

    run = runs[algo][0]
    state, floats, _ = read_modelopt_hf(run / "modelopt_hf")
    saved = QuantState.load(run / "quantlab")
    # quantlab's state also keeps calibration statistics (k_amax, ...) that no format carries.
    kept = QuantState(
        modules={
            m: type(ms)(
                ms.weight_format,
                ms.input_format,
                {t: v for t, v in ms.tensors.items() if t in state.modules[m].tensors},
            )
            for m, ms in saved.modules.items()
            if m in state.modules
        }
    )
    assert set(state.modules) == {
        m for m, ms in saved.modules.items() if ms.weight_format or ms.meta
    }
    for m, ms in state.modules.items():
        ms.weight_format = ms.weight_format and saved.modules[m].weight_format
    assert kept.diff(state) == []
    ref = load_tensors(run / "quantlab" / FLOAT_FILE, "")
    assert set(floats) == set(ref)
    for k, v in floats.items():
        assert torch.equal(v, ref[k].to(v.dtype)), k


def test_formats_it_cannot_express_are_refused_before_calibration(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for steps, why in (
        (
            "  - calibrator: rtn\n    args: {format: int4_g32_asym}",
            "no quant_algo for weights int4 g32 asym",
        ),
        (
            "  - calibrator: rtn\n    args: {format: int8_channel}\n  - calibrator: kv_cache\n    args: {format: int8}",
            "FP8 KV-cache scales only",
        ),
    ):
        text = RECIPE.format(
            model=tiny_model("llama"), emma=emma, pride=pride, steps=steps, out=tmp_path / "out"
        )
        (tmp_path / "r.yaml").write_text(text)
        assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 2
        err = capsys.readouterr().err
        assert "modelopt_hf cannot be written" in err and why in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("algo", list(CASES))
def test_check_export_passes_both_tools_folders(
    runs: dict[str, tuple[Path, Path]], algo: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run, theirs = runs[algo]
    assert main(["check-export", str(theirs), "--target", "modelopt_hf"]) == 0, capsys.readouterr()
    assert main(["check-export", str(theirs)]) == 0  # recognised without --target
    assert main(["check-export", str(run)]) == 0  # trtllm checkpoint + modelopt_hf/ + manifest


def _corrupt(src: Path, dst: Path, drop: str = "", exclude: str = "") -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors.pop(drop, None)
    save_file(tensors, str(dst / "model.safetensors"))
    if exclude:
        hq = json.loads((dst / "hf_quant_config.json").read_text())
        hq["quantization"]["exclude_modules"].append(exclude)
        (dst / "hf_quant_config.json").write_text(json.dumps(hq))
    return dst


@pytest.mark.parametrize(
    ("algo", "drop", "exclude", "tp", "expect", "count"),
    [
        (
            "FP8",
            "model.layers.1.mlp.up_proj.input_scale",
            "",
            1,
            "up_proj.input_scale is missing",
            1,
        ),
        (
            "W4A16_AWQ",
            "model.layers.0.self_attn.o_proj.pre_quant_scale",
            "",
            1,
            "o_proj.pre_quant_scale is missing",
            1,
        ),
        ("W8A16", "", "model.layers.7.mlp.down_proj", 1, "names no module", 1),
        ("FP8", "model.layers.0.self_attn.k_proj.k_scale", "", 1, "k_proj.k_scale is missing", 1),
        # tp 3: heads 4, KV heads 2 and intermediate 256 all fail to split
        ("W8A16", "", "", 3, "num_attention_heads=4 cannot be split over tp=3", 3),
        # k_proj excluded alone: a partly quantized fused qkv, and k_proj still holds int8 codes
        ("W8A16", "", "model.layers.0.self_attn.k_proj", 1, "leaves part of", 2),
    ],
)
def test_check_export_names_each_broken_rule(
    runs: dict[str, tuple[Path, Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    algo: str,
    drop: str,
    exclude: str,
    tp: int,
    expect: str,
    count: int,
) -> None:
    bad = _corrupt(runs[algo][0] / "modelopt_hf", tmp_path / "bad", drop, exclude)
    capsys.readouterr()
    assert main(["check-export", str(bad), "--tp", str(tp)]) == 1
    out = capsys.readouterr().out
    assert expect in out and out.strip().endswith(f"{count} problem(s)"), out


def test_a_run_with_only_the_hf_format_is_checked_as_such(
    tmp_path: Path, tiny_model: Callable[[str], Path], emma: Path, pride: Path
) -> None:
    steps = "  - calibrator: rtn\n    args: {format: int8_channel}"
    text = RECIPE.format(
        model=tiny_model("llama"), emma=emma, pride=pride, steps=steps, out=tmp_path / "out"
    ).replace("format: [trtllm, modelopt_hf]", "format: modelopt_hf")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    run = tmp_path / "out"
    assert not (run / "config.json").exists() and (run / "modelopt_hf" / "config.json").is_file()
    assert main(["check-export", str(run)]) == 0  # the HF folder and the manifest, no checkpoint

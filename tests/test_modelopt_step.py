"""The `modelopt` step: NVIDIA ModelOpt's own algorithm, captured as a QuantState.

Checked against ModelOpt itself on a tiny Llama: the simulated model quantlab rebuilds from the
captured state computes what ModelOpt's own quantized model computes (where ModelOpt's export
does not re-smooth), and quantlab's modelopt_hf folder of the run equals ModelOpt's own export
tensor for tensor (import -> export is lossless).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from quantlab.cli import main

RECIPE = """\
name: mo-{algo}
model:
  source: {model}
  dtype: float32
calibration: {{source: file, path: {emma}, num_samples: 2, seq_len: 64}}
steps:
  - calibrator: modelopt
    args: {{algorithm: {algo}, group_size: 32, dtype: {dtype}}}
export:
  format: [trtllm, modelopt_hf]
  output_dir: {out}
  dtype: float16
evaluation:
  data: {{source: file, path: {pride}, num_samples: 2, seq_len: 64, bos_id: 0}}
"""


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
) -> Callable[..., Path]:
    pytest.importorskip("modelopt")
    root = tmp_path_factory.mktemp("mostep")
    model = tiny_model("llama")

    def run(algo: str, dtype: str = "float32") -> Path:
        out = root / f"{algo}-{dtype}"
        if not out.exists():
            text = RECIPE.format(
                model=model, emma=emma, pride=pride, algo=algo, dtype=dtype, out=out
            )
            (root / "r.yaml").write_text(text)
            assert main(["--quiet", "run", str(root / "r.yaml")]) == 0
        return out

    return run


def _modelopt_model(model_dir: Path, emma: Path, algo: str, dtype: torch.dtype) -> torch.nn.Module:
    """ModelOpt's own quantized model of model_dir, calibrated on the recipe's windows."""
    import modelopt.torch.quantization as mtq
    from quantlab.calibrators.modelopt import ModelOptArgs, modelopt_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlab.data import DataSpec, load_windows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = load_windows(DataSpec(source="file", path=str(emma), num_samples=2, seq_len=64), tok)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for w in windows:
                m(input_ids=w.view(1, -1))

    return mtq.quantize(
        model, modelopt_config(ModelOptArgs(algorithm=algo, group_size=32)), forward_loop
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "algo",
    [
        pytest.param("int8_weight_only", marks=pytest.mark.slow),  # the int8 path of smoothquant
        "fp8_per_channel_per_token",
        "int8_smoothquant",
        pytest.param("fp8", marks=pytest.mark.slow),  # per-tensor: the static path of smoothquant
    ],
)
def test_captured_state_computes_what_modelopts_model_computes(
    setup: Callable[..., Path], tiny_model: Callable[[str], Path], emma: Path, algo: str
) -> None:
    from quantlab.export.reload import load_quantized

    run = setup(algo)
    sim, _ = load_quantized(run / "quantlab")
    theirs = _modelopt_model(tiny_model("llama"), emma, algo, torch.float32)
    ids = torch.tensor([[0, 11, 400, 7, 90, 3000, 12, 5, 800, 41]])
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits.float(), sim(input_ids=ids).logits.float()
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) < 1e-4, algo
    if algo in ("int8_weight_only", "fp8_per_channel_per_token"):  # no static rounding boundary
        assert float((a - b).abs().max()) < 1e-3 * float(a.abs().max())
    if algo == "int8_smoothquant":  # ModelOpt's unfolded smoothing scales are kept and applied
        st = json.loads((run / "quantlab" / "quant_state.json").read_text())["modules"]
        assert "pre_quant_scale" in st["model.layers.0.self_attn.o_proj"]["tensors"]


@pytest.mark.parametrize("algo", ["int4_awq", "int8_smoothquant"])
def test_modelopt_hf_of_the_run_equals_modelopts_own_export(
    setup: Callable[..., Path],
    tiny_model: Callable[[str], Path],
    emma: Path,
    tmp_path: Path,
    algo: str,
) -> None:
    from modelopt.torch.export import export_hf_checkpoint

    run = setup(algo, "float16")
    export_hf_checkpoint(
        _modelopt_model(tiny_model("llama"), emma, algo, torch.float16), export_dir=str(tmp_path)
    )
    ours, theirs = (
        load_file(str(run / "modelopt_hf" / "model.safetensors")),
        load_file(str(tmp_path / "model.safetensors")),
    )
    assert set(ours) == set(theirs)
    differ = [
        k
        for k, v in theirs.items()
        if ours[k].dtype != v.dtype
        or not torch.equal(ours[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    ]
    for k in differ:
        print(
            k,
            ours[k].dtype,
            theirs[k].dtype,
            float((ours[k].float() - theirs[k].float()).abs().max()),
        )
    assert differ == []
    if algo == "int4_awq":  # ModelOpt folded the q/k/v and gate/up scales into the norms
        st = json.loads((run / "quantlab" / "quant_state.json").read_text())["modules"]
        assert "fold_in_scale" in st["model.layers.0.self_attn.q_proj"]["tensors"]


def test_modelopt_step_must_stand_alone(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    pride: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("modelopt")
    text = RECIPE.format(
        model=tiny_model("llama"),
        emma=emma,
        pride=pride,
        algo="fp8",
        dtype="float32",
        out=tmp_path / "out",
    )
    (tmp_path / "r.yaml").write_text(text + "runner: {exclude: ['*.mlp.down_proj']}\n")
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 2
    assert "remove runner.exclude" in capsys.readouterr().err
    two = text.replace(
        "steps:\n", "steps:\n  - calibrator: rtn\n    args: {format: int8_channel}\n"
    )
    (tmp_path / "r.yaml").write_text(two)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 2
    assert "must be the only step" in capsys.readouterr().err
    awq = text.replace("algorithm: fp8", "algorithm: int4_awq").replace(
        "format: [trtllm, modelopt_hf]", "format: [trtllm, compressed_tensors]"
    )
    (tmp_path / "r.yaml").write_text(awq)
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 2
    assert "compressed-tensors cannot carry" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]

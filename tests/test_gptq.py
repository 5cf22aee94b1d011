"""GPTQ: the pure function on small Linear problems, the calibrator's streaming Hessian, end to end."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from quantlab.calibrators.gptq import GPTQArgs, GPTQCalibrator, HessianError, gptq_quantize
from quantlab.calibrators.rtn import rtn_quantize
from quantlab.kernels.packing import unpack_int4_rows
from safetensors.torch import load_file

from quantlab.adapters import adapter_for
from quantlab.calibrator import CalibratorArgs, LayerContext, build_calibrator, param
from quantlab.cli import main
from quantlab.data import DataSpec, load_windows
from quantlab.evaluate import compare_models
from quantlab.export.reload import load_quantized
from quantlab.formats import PRESETS
from quantlab.models import load_model
from quantlab.pipeline import run_recipe
from quantlab.primitives import compute_qparams, dequantize, quantize, sqnr
from quantlab.recipe import Recipe
from quantlab.runner import RunnerConfig, quantize_model
from quantlab.state import ModuleState, QuantState

REPO = Path(__file__).resolve().parents[1]


def correlated(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    """Inputs x [n_tokens, k] with strongly correlated columns and two outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n_tokens, k, generator=g) @ mix
    x[:, 3] *= 8
    x[:, k // 2] *= 5
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def output_sqnrs(
    w: torch.Tensor, x: torch.Tensor, fmt_name: str, **kw: bool
) -> tuple[float, float, float]:
    """(GPTQ SQNR, RTN SQNR, GPTQ loss recomputed from the dequantized codes) of x @ w^T."""
    fmt = PRESETS[fmt_name]
    h = hessian(x)
    r = gptq_quantize(w, h, fmt, **kw)
    wq = dequantize(r.qweight, r.scale, r.zero, fmt)
    rt = rtn_quantize(w, fmt)
    wr = dequantize(rt["qweight"], rt["weight_scale"], rt.get("weight_zero"), fmt)
    ref = x @ w.t()
    dw = (w - wq).double()
    loss = float(((dw @ h.double()) * dw).sum() / (2 * w.shape[0]))
    return sqnr(ref, x @ wq.t()), sqnr(ref, x @ wr.t()), loss


CASES = [
    ("int4_g64_sym", {}),
    ("int4_g64_asym", {}),
    ("int4_g32_asym", {"act_order": True, "static_groups": True}),
    ("int4_g128_sym", {"static_groups": True}),
    ("int4_channel", {"act_order": True}),
    ("int8_channel", {}),
]


@pytest.mark.parametrize(("fmt_name", "kw"), CASES)
def test_gptq_beats_rtn_on_correlated_inputs(fmt_name: str, kw: dict[str, bool]) -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 256)
    x = correlated(2048, 256, seed=2)
    s_gptq, s_rtn, loss = output_sqnrs(w, x, fmt_name, **kw)
    # Measured: GPTQ gains 3.7-4.5 dB over RTN on these inputs in every case; 2 dB leaves margin.
    assert s_gptq > s_rtn + 2.0
    assert s_gptq > (45.0 if fmt_name.startswith("int8") else 20.0)
    r = gptq_quantize(w, hessian(x), PRESETS[fmt_name], **kw)
    # The reported loss is the one of the codes and scales returned (what export will carry).
    assert r.loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("fmt_name", ["int4_g64_sym", "int4_g64_asym", "int8_channel"])
def test_codes_scales_zeros_are_consistent_and_exportable(fmt_name: str) -> None:
    fmt = PRESETS[fmt_name]
    torch.manual_seed(3)
    w = torch.randn(16, 128)
    r = gptq_quantize(w, hessian(correlated(512, 128, 4)), fmt, scale_dtype=torch.float16)
    n_groups = 128 // (fmt.group_size or 128)
    assert r.scale.dtype == torch.float32
    assert r.scale.shape == ((16, n_groups) if fmt.group_size else (16,))
    assert torch.equal(r.scale.half().float(), r.scale)  # rounded to the checkpoint dtype
    assert r.qweight.dtype == (torch.int8 if fmt.symmetric else torch.uint8)
    if fmt.symmetric:
        assert r.zero is None
    else:
        assert r.zero is not None and r.zero.dtype == torch.uint8 and r.zero.shape == r.scale.shape
    qmin, qmax = fmt.qrange()
    assert int(r.qweight.min()) >= qmin and int(r.qweight.max()) <= qmax
    # The codes are the rounding of their own dequantized values: scale/zero really made them.
    wq = dequantize(r.qweight, r.scale, r.zero, fmt)
    assert torch.equal(quantize(wq, r.scale, r.zero, fmt), r.qweight)


@pytest.mark.parametrize(
    ("fmt_name", "kw"),
    [("int8_channel", {}), ("int4_g64_asym", {"act_order": True, "static_groups": True})],
)
def test_lazy_batch_updates_match_column_by_column(fmt_name: str, kw: dict[str, bool]) -> None:
    # Block size only changes when the deferred updates land, not their value: block 1 applies
    # every update at once. Measured: identical codes for blocks 1, 16, 64, 200 vs 128.
    torch.manual_seed(14)
    w, h = torch.randn(24, 192), hessian(correlated(1024, 192, 15))
    a = gptq_quantize(w, h, PRESETS[fmt_name], block_size=128, **kw)
    b = gptq_quantize(w, h, PRESETS[fmt_name], block_size=1, **kw)
    assert (a.qweight != b.qweight).float().mean() <= 1e-3  # float ties may flip a rare code
    assert a.loss == pytest.approx(b.loss, rel=1e-4)


def test_static_groups_take_scales_from_the_original_weights() -> None:
    fmt = PRESETS["int4_g32_asym"]
    torch.manual_seed(5)
    w = torch.randn(8, 128)
    r = gptq_quantize(w, hessian(correlated(512, 128, 6)), fmt, act_order=True, static_groups=True)
    scale, zero = compute_qparams(w, fmt)
    assert torch.equal(r.scale, scale) and r.zero is not None and torch.equal(r.zero, zero)
    # Dynamic groups see the already-updated weights, so their scales differ.
    r2 = gptq_quantize(w, hessian(correlated(512, 128, 6)), fmt)
    assert not torch.equal(r2.scale, scale)


def test_recovers_from_a_singular_hessian() -> None:
    # 24 tokens for 96 inputs: H has rank 24; columns 7 and 40 never see a non-zero input.
    fmt = PRESETS["int4_g32_asym"]
    torch.manual_seed(7)
    x = correlated(24, 96, seed=8)
    x[:, [7, 40]] = 0
    w = torch.randn(16, 96)
    r = gptq_quantize(w, hessian(x), fmt)
    assert r.damp_used == 0.01
    wq = dequantize(r.qweight, r.scale, r.zero, fmt)
    assert torch.isfinite(wq).all()
    assert torch.equal(wq[:, [7, 40]], torch.zeros(16, 2))  # dead inputs: weight zeroed
    rt = rtn_quantize(w, fmt)
    wr = dequantize(rt["qweight"], rt["weight_scale"], rt.get("weight_zero"), fmt)
    ref = x @ w.t()
    assert sqnr(ref, x @ wq.t()) > sqnr(ref, x @ wr.t()) + 3.0  # measured: +11 dB


def test_damping_escalates_when_cholesky_fails(caplog: pytest.LogCaptureFixture) -> None:
    # Smallest eigenvalue -3% of mean(diag H): 1% damping cannot fix it, 10% does.
    fmt = PRESETS["int4_g32_sym"]
    h = hessian(correlated(16, 64, seed=9))
    h -= 0.03 * h.diagonal().mean() * torch.eye(64)
    with caplog.at_level(logging.INFO, logger="quantlab.calibrators.gptq"):
        r = gptq_quantize(torch.randn(8, 64), h, fmt, name="bad.linear")
    assert r.damp_used == pytest.approx(0.1)
    assert "bad.linear" in caplog.text and "damp raised to 0.1" in caplog.text
    # damp 0 on a rank-deficient H escalates from nothing to 1%.
    assert (
        gptq_quantize(torch.randn(8, 64), hessian(correlated(16, 64, 10)), fmt, damp=0.0).damp_used
        > 0
    )

    with pytest.raises(HessianError, match="cannot be factorised"):
        gptq_quantize(torch.randn(8, 64), -torch.eye(64), fmt, name="broken")


def test_args_validation() -> None:
    with pytest.raises(ValidationError, match="static_groups"):
        GPTQArgs(format="int4_g64_asym", act_order=True)
    with pytest.raises(ValidationError, match="not an integer weight format"):
        GPTQArgs(format="fp8_tensor")
    with pytest.raises(ValidationError):
        GPTQArgs(block_size=0)
    with pytest.raises(ValidationError):
        GPTQArgs(bogus=1)  # type: ignore[call-arg]
    assert GPTQArgs(format="int8_channel", act_order=True).act_order
    cal = build_calibrator("gptq", {"format": "int4_g64_sym", "scale_method": "half_step"})
    assert isinstance(cal, GPTQCalibrator) and cal.planned_formats()[0] == PRESETS[
        "int4_g64_sym"
    ].__class__("int4", "group", 64, True, "half_step")


def test_observe_streams_the_hessian_and_shares_it_between_same_input_linears() -> None:
    cal = GPTQCalibrator(GPTQArgs())
    batches = [correlated(n, 32, seed=s) for n, s in ((7, 11), (64, 12), (1, 13))]
    for b in batches:
        x = b.reshape(1, -1, 32)
        cal.observe("q", x)
        cal.observe("k", x)  # the same tensor object, as q/k/v receive it
        cal.observe("o", x.clone())
    full = torch.cat(batches)
    assert sorted(cal._h) == ["o", "q"] and cal._alias == {"k": "q"}
    for name in ("q", "o"):
        torch.testing.assert_close(cal._h[name], hessian(full), rtol=1e-5, atol=1e-5)
        assert cal._n[name] == full.shape[0]


def tiny_recipe(model_dir: Path, out: Path, fmt: str, emma: Path, pride: Path) -> Recipe:
    data = {"source": "file", "num_samples": 3, "seq_len": 64, "bos_id": 0}
    return Recipe.model_validate(
        {
            "name": f"tiny-gptq-{fmt}",
            "model": {"source": str(model_dir)},
            "calibration": {**data, "path": str(emma)},
            "steps": [{"calibrator": "gptq", "args": {"format": fmt}}],
            "export": {"output_dir": str(out)},
            "evaluation": {"data": {**data, "path": str(pride)}},
        }
    )


@pytest.mark.parametrize(
    ("fmt", "algo"),
    [("int4_g32_asym", "W4A16_GPTQ"), ("int4_g32_sym", "W4A16_AWQ"), ("int8_channel", "W8A16")],
)
def test_tiny_model_end_to_end(
    fmt: str,
    algo: str,
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    emma: Path,
    pride: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_dir = tiny_model("llama")
    out = tmp_path / "ckpt"
    with caplog.at_level(logging.DEBUG, logger="quantlab.calibrators.gptq"):
        res = run_recipe(
            tiny_recipe(model_dir, out, fmt, emma, pride), tmp_path, show_progress=False
        )
    assert res.quant_algo == algo
    state = QuantState.load(out / "quantlab")
    assert len(state.modules) == 2 * 7
    for ms in state.modules.values():
        assert ms.meta["damp"] == 0.01 and ms.meta["loss"] > 0
    assert caplog.text.count("gptq loss") == 2 * 7  # one line per linear, with loss and damp

    if algo != "W4A16_GPTQ":
        return
    # The checkpoint carries exactly the state's codes, scales and zeros.
    t = load_file(str(out / "rank0.safetensors"))
    ms = state.modules["model.layers.1.self_attn.o_proj"]
    pre = "transformer.layers.1.attention.dense"
    s = t[f"{pre}.weights_scaling_factor"].t().float()
    assert torch.equal(s, ms.tensors["weight_scale"])
    q = (unpack_int4_rows(t[f"{pre}.weight"]).to(torch.int16) + 8).to(torch.uint8)
    assert torch.equal(q, ms.tensors["qweight"])
    z = (8 - torch.round(t[f"{pre}.zero"].t().float() / s)).to(torch.uint8)
    assert torch.equal(z, ms.tensors["weight_zero"])

    # The reloaded model reproduces the reported accuracy.
    summary = json.loads((out / "accuracy.json").read_text())["accuracy"]
    qmodel, tok = load_quantized(out / "quantlab")
    ref, _ = load_model(str(model_dir))
    spec = DataSpec(source="file", path=str(pride), num_samples=3, seq_len=64, bos_id=0)
    again = compare_models(ref, qmodel, load_windows(spec, tok), show_progress=False)
    assert again.ppl_quant == pytest.approx(summary["ppl_quant"], rel=1e-6)
    # No GPTQ-vs-RTN claim here: a random-init model's inputs are nearly uncorrelated and 189
    # calibration tokens under-determine H (K = 256); measured KL 5.2e-4 (GPTQ) vs 5.1e-4 (RTN).
    assert 0 < summary["kl_mean"] < 0.01


class FoldScales:
    """A stand-in for AWQ/SmoothQuant: folds per-channel scales s into each norm and its linears."""

    name = "fold"
    Args = CalibratorArgs
    edits_weights = True
    needs_data = False

    def __init__(self, s: torch.Tensor) -> None:
        self.s = s

    def planned_formats(self) -> tuple[None, None]:
        return None, None

    def targets(self, ctx: LayerContext) -> list[str]:
        return []

    def observe(self, name: str, x: torch.Tensor) -> None:
        pass

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        with torch.no_grad():
            for norm, linears in ctx.adapter.smoothing_groups:
                param(ctx.module(norm), "weight").div_(self.s)
                for n in linears:
                    param(ctx.module(n), "weight").mul_(self.s)
        return {}


def test_composes_after_a_scale_folding_step(tiny_model: Callable[[str], Path], emma: Path) -> None:
    model, tok = load_model(str(tiny_model("llama")))
    adapter = adapter_for(model)
    spec = DataSpec(source="file", path=str(emma), num_samples=2, seq_len=64, bos_id=0)
    windows = load_windows(spec, tok)
    s = 1.0 + 3.0 * (torch.arange(128) % 4 == 0)  # every 4th channel scaled x4
    w_float = param(model.get_submodule("model.layers.0.mlp.gate_proj"), "weight").clone()
    steps = [FoldScales(s), GPTQCalibrator(GPTQArgs(format="int4_g32_asym"))]
    state = quantize_model(model, adapter, windows, steps, RunnerConfig(show_progress=False))
    ms = state.modules["model.layers.0.mlp.gate_proj"]
    wq = dequantize(ms.tensors["qweight"], ms.tensors["weight_scale"], ms.tensors["weight_zero"],
                    ms.weight_format)  # fmt: skip
    # GPTQ quantized the folded weight (W * s), not the original one (measured 14.0 vs -3.7 dB;
    # int4 g32 with error feedback stays well off W in weight space, hence the modest floor).
    assert sqnr(w_float * s, wq) > 10.0 and sqnr(w_float, wq) < 0.0
    assert ms.meta["damp"] == 0.01


@pytest.mark.slow
def test_smollm2_int4_g64_asym_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], emma: Path, pride: Path, embedded_dir: Path
) -> None:
    out = tmp_path / "w4"
    sets = [
        f"export.output_dir={out}",
        "calibration.num_samples=8",
        "evaluation.data.num_samples=4",
    ]
    args = ["--quiet", "run", str(REPO / "recipes" / "smollm2_int4_g64_gptq_asym.yaml")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    acc = json.loads((out / "accuracy.json").read_text())
    a = acc["accuracy"]
    assert acc["quant_algo"] == "W4A16_GPTQ" and acc["calibration_windows"] == 8
    # Measured on these windows (docs/gptq.md, damp 0.01): GPTQ ppl 22.48 / KL 0.112 / top-1 0.822
    # against ref 20.85; RTN 25.79 / 0.308 / 0.686 fails all three bounds.
    assert a["ppl_ref"] < a["ppl_quant"] < 1.15 * a["ppl_ref"]
    assert a["kl_mean"] < 0.2 and a["top1_agreement"] > 0.75
    assert (out / "quantlab.log").read_text().count("gptq loss") == 30 * 7

"""The TensorRT-LLM checkpoint against TensorRT-LLM's own loading rules (read from its sources).

Rules applied here, as TensorRT-LLM's 2025 main line states them (docs/export.md):
- quantize_layers: a module is left float when fnmatch(module name, pattern) hits a pattern of
  exclude_modules, and a config.json list replaces the default list;
- weight_only_quantize_dict (W8A16/W4A16 preprocessing): a tensor is quantized unless
  fnmatch(tensor name, pattern) hits, when its name contains qkv/dense/fc/proj/gate.weight;
- WeightOnly(Groupwise)QuantLinear pads N and K to multiples of 64 * tp (max(64, G) * tp);
- dup_kv_weight: with tp above the KV head count each KV head is repeated tp / kv_heads times
  and config.json keeps the original num_key_value_heads.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlab.adapters import ADAPTERS
from quantlab.cli import main
from quantlab.errors import InputError
from quantlab.export.trtllm import ExportConfig, plan_export
from quantlab.formats import preset
from quantlab.preflight import ConfigView

RECIPE = """\
name: rules
model:
  source: {model}
steps:
  - calibrator: {cal}
    args: {args}
runner:
  exclude: {exclude}
export:
  output_dir: {out}
  dtype: float32
  tp_size: {tp}
  pp_size: {pp}
evaluation:
  enabled: false
"""

LAYER_MODULES = ["attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"]
WEIGHT_ONLY_KEYS = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")


def _export(
    tmp_path: Path,
    model: Path,
    name: str,
    cal: str = "rtn",
    args: str = "{format: int8_channel}",
    exclude: str = "[]",
    tp: int = 1,
    pp: int = 1,
) -> tuple[int, Path]:
    out = tmp_path / name
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        RECIPE.format(model=model, cal=cal, args=args, exclude=exclude, out=out, tp=tp, pp=pp)
    )
    return main(["--quiet", "run", str(p)]), out


def _module_excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_defaults_kept_and_runner_exclude_hits_modules_and_tensors(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    code, out = _export(
        tmp_path, tiny_model("llama"), "ex", exclude="['model.layers.1.mlp.down_proj']"
    )
    assert code == 0
    ex = json.loads((out / "config.json").read_text())["quantization"]["exclude_modules"]
    # The embedding and lm_head stay float for TensorRT-LLM too (not weight-only embeddings).
    assert _module_excluded("transformer.vocab_embedding", ex)
    assert _module_excluded("lm_head", ex)
    tensors = load_file(str(out / "rank0.safetensors"))
    for i in range(2):
        for m in LAYER_MODULES:
            name = f"transformer.layers.{i}.{m}"
            want = (i, m) == (1, "mlp.proj")
            assert _module_excluded(name, ex) == want, name
            assert _module_excluded(f"{name}.weight", ex) == want, name
            # What quantlab wrote agrees: an excluded linear has no per_channel_scale.
            assert (f"{name}.per_channel_scale" not in tensors) == want, name
    # The tensors the weight-only preprocessing would quantize are exactly the non-excluded ones.
    quantized = {
        k for k in tensors if any(s in k for s in WEIGHT_ONLY_KEYS) and not _module_excluded(k, ex)
    }
    assert "transformer.layers.1.mlp.proj.weight" not in quantized
    assert len(quantized) == 2 * len(LAYER_MODULES) - 1


def test_per_layer_exclude_with_pp_is_refused(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _export(
        tmp_path, tiny_model("llama"), "pp", exclude="['model.layers.1.mlp.down_proj']", pp=2
    )
    assert code == 2 and not out.exists()
    assert "numbers layers per pipeline rank" in capsys.readouterr().err


def _dims(hidden: int, inter: int, heads: int, kv: int) -> ConfigView:
    return ConfigView(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=1024,
        num_hidden_layers=2,
    )


def test_weight_only_padding_rule() -> None:
    llama = ADAPTERS["LlamaForCausalLM"]
    # hidden 192 at tp 2: TensorRT-LLM pads K = 192 to 256 (64 * 2): refused before calibration.
    cfg = _dims(192, 512, 4, 4)
    with pytest.raises(InputError, match=r"pads the weight-only .* multiples of 128 at tp_size 2"):
        plan_export(cfg, llama, preset("int8_channel"), None, ExportConfig(Path("."), tp_size=2))
    plan_export(cfg, llama, preset("int8_channel"), None, ExportConfig(Path("."), tp_size=1))
    # Group-wise: max(64, G) * tp; FP8 is not a weight-only layer and has no such rule.
    cfg = _dims(256, 640, 4, 4)
    with pytest.raises(InputError, match="multiples of 256 at tp_size 2"):
        plan_export(cfg, llama, preset("int4_g128_sym"), None, ExportConfig(Path("."), tp_size=2))
    fp8 = preset("fp8_tensor")
    plan_export(cfg, llama, fp8, fp8, ExportConfig(Path("."), tp_size=2))


def test_tp_above_kv_heads_repeats_each_kv_head(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    model = tiny_model("llama")  # 4 heads, 2 KV heads, head_dim 32
    args = "{activations: dynamic_token, weights: channel}"
    assert _export(tmp_path, model, "tp1", cal="fp8", args=args)[0] == 0
    code, out = _export(tmp_path, model, "tp4", cal="fp8", args=args, tp=4)
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["mapping"]["tp_size"] == 4
    full = load_file(str(tmp_path / "tp1" / "rank0.safetensors"))
    hd = 32
    for key in ("weight", "per_channel_scale"):
        name = f"transformer.layers.0.attention.qkv.{key}"
        w = full[name].float()
        q, k, v = w[: 4 * hd], w[4 * hd : 6 * hd], w[6 * hd :]
        for r in range(4):
            got = load_file(str(out / f"rank{r}.safetensors"))[name].float()
            kv = r // 2  # ranks 0, 1 read KV head 0; ranks 2, 3 KV head 1
            want = torch.cat(
                [q[r * hd : (r + 1) * hd], k[kv * hd : (kv + 1) * hd], v[kv * hd : (kv + 1) * hd]]
            )
            assert torch.equal(got, want), (key, r)


def test_tp_that_cannot_repeat_kv_heads_is_refused() -> None:
    llama = ADAPTERS["LlamaForCausalLM"]
    with pytest.raises(InputError, match="not a multiple of it"):
        plan_export(_dims(384, 768, 6, 4), llama, None, None, ExportConfig(Path("."), tp_size=6))

"""Save and reload a quantized model in torch for evaluation: HF config + tokenizer + float tensors + QuantState."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from quantlab.errors import InputError
from quantlab.moe import prepare_model
from quantlab.qmodules import QuantLinear, apply_state
from quantlab.state import QuantState
from quantlab.tensorio import load_tensors

FLOAT_FILE = "float_weights.safetensors"


def save_reloadable(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, state: QuantState, directory: Path
) -> None:
    """Write what load_quantized needs into directory (created): state, float tensors, config, tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    state.save(directory)
    quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k not in quantized
        and not (tied and k == "lm_head.weight")
        and not k.endswith(("input_scale", "pre_quant_scale"))  # QuantLinear buffers: in the state
    }
    save_file(tensors, str(directory / FLOAT_FILE))
    getattr(model, "config").save_pretrained(str(directory))  # noqa: B009 - nn.Module types it as Tensor|Module
    tokenizer.save_pretrained(str(directory))
    (directory / "README.txt").write_text(
        "quantlab reloadable model: quantlab.export.reload.load_quantized(<this folder>) rebuilds the\n"
        "quantized model in torch (weights dequantized from the QuantState codes).\n"
    )


def load_quantized(
    directory: Path, device: str = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Rebuild a quantized model (QuantLinear modules) saved by save_reloadable; safetensors only."""
    directory = Path(directory)
    if not (directory / FLOAT_FILE).is_file():
        raise InputError(
            f"{directory} is not a quantlab reloadable model folder (no {FLOAT_FILE})."
        )
    config = AutoConfig.from_pretrained(str(directory))
    state = QuantState.load(directory)
    float_tensors = load_tensors(
        directory / FLOAT_FILE, "Re-run the recipe that wrote this folder to export it again."
    )
    dtype = next(iter(float_tensors.values())).dtype
    # Built on a real device (not meta) so non-persistent buffers such as rotary inv_freq are computed.
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    prepare_model(model)  # MoE experts unfused as they were when the state was made
    missing, unexpected = model.load_state_dict(float_tensors, strict=False)
    allowed = {f"{m}.weight" for m in state.modules}
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        allowed.add("lm_head.weight")
    if unexpected or set(missing) - allowed:
        raise InputError(
            f"{directory}: float weights do not match the model (missing {sorted(set(missing) - allowed)[:5]}, unexpected {unexpected[:5]})."
        )
    apply_state(model, state)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(directory))
    meta = json.loads((directory / "quant_state.json").read_text())
    model.quantlab_recipe = meta.get("recipe", {})  # type: ignore[assignment]
    return model, tok


def half_keeping_input_scales(model: nn.Module) -> nn.Module:
    """model cast to fp16 in place, its QuantLinear static activation scales kept float32 (as the
    export writes them): the simulated model at the activation dtype a deployed engine runs."""
    scales = {n: m.input_scale for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.half()
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.input_scale = scales[n]
    return model

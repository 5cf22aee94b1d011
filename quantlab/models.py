"""Load causal LMs and their tokenizers; convert GGUF files to plain HF folders.

The embedded model (SmolLM2-135M-Instruct) is fetched and converted by quantlab.embedded.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quantlab.embedded import (  # noqa: F401  (re-exported: the public names of the embedded model)
    EMBEDDED_ALIASES,
    EMBEDDED_DIR_NAME,
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
)
from quantlab.errors import InputError, QuantlabError, first_line
from quantlab.moe import prepare_model
from quantlab.tensorio import check_safetensors
from quantlab.zoo import is_zoo, zoo_model_dir

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# SmolLM2's chat turns end with <|im_end|> (id 2); generation must stop there.
SMOLLM2_EOS = "<|im_end|>"

# "org/name" with Hub-legal characters; anything else that does not exist locally is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A sentence with punctuation, digits, a leading space and a non-ASCII character: a wrong
# tokenizer class (LlamaTokenizer instead of the byte-level BPE) changes its ids.
_PROBE_TEXT = (
    " It is a truth universally acknowledged, that 2 men in Pemberley’s hall\n\nsaid: «no»."
)


def torch_dtype(dtype: str) -> torch.dtype:
    """Map a dtype name (float32, float16, bfloat16) to the torch dtype."""
    if dtype not in DTYPES:
        raise InputError(
            f"Unknown dtype {dtype!r}. quantlab loads and stores models in one of "
            f"{', '.join(DTYPES)}; pick one of those."
        )
    return DTYPES[dtype]


def load_model(
    source: str, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode with weights of `dtype` on `device`, tokenizer) from a folder,
    `embedded[:smollm2]`, `zoo:<name>` (quantlab.zoo) or a Hub id; weights are read from safetensors only, never unpickled."""
    torch_dt = torch_dtype(dtype)
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(
            f"Unknown device {device!r} ({exc}). Use 'cpu', 'cuda' or 'cuda:<index>'."
        ) from exc

    if source in EMBEDDED_ALIASES:
        folder: str = str(embedded_model_dir())
    elif is_zoo(source):
        folder = str(zoo_model_dir(source))
    else:
        path = Path(source).expanduser()
        if path.exists():
            _check_hf_folder(path)
            folder = str(path)
        elif _HUB_ID.match(source):
            folder = source  # let transformers try the Hub (or its local cache)
        else:
            raise InputError(
                f"Model folder {source!r} does not exist (resolved to {path.resolve()}). "
                "Pass an existing Hugging Face folder (config.json + *.safetensors), a Hub id "
                "such as 'HuggingFaceTB/SmolLM2-135M', or 'embedded:smollm2'."
            )

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dt, use_safetensors=True)
    except SafetensorError as exc:
        raise InputError(
            f"The weights in {folder} cannot be read ({first_line(exc)}): a truncated or "
            "corrupt *.safetensors file. Copy or download the model again."
        ) from exc
    except (OSError, ValueError) as exc:
        if folder == source and not Path(source).exists():
            raise InputError(
                f"Model {source!r}: no such local folder, and loading it as a Hugging Face Hub "
                f"id failed ({first_line(exc)}). The Hub is probably unreachable from here or "
                "the id is wrong; download the model on a connected machine and pass its "
                "folder, or use 'embedded:smollm2'."
            ) from exc
        raise InputError(
            f"Could not load the model in {folder} ({first_line(exc)}). The folder needs "
            "config.json, a tokenizer (tokenizer.json) and safetensors weights; quantlab never "
            "reads pickled .bin weights. Re-save it with safetensors."
        ) from exc
    # transformers wraps .to in a decorator whose typing mypy misreads as unbound.
    model.to(dev)  # type: ignore[call-arg, arg-type]
    model.eval()
    prepare_model(model)
    log.info("loaded %s (%s, %s) in %.1f s", folder, dtype, dev, time.perf_counter() - t0)
    return model, tokenizer


def _check_hf_folder(path: Path) -> None:
    if not path.is_dir():
        raise InputError(
            f"Model source {path} is a file, not a folder. Pass a Hugging Face model folder; "
            "for a .gguf file, convert it first with quantlab.models.import_gguf."
        )
    if not (path / "config.json").is_file():
        raise InputError(
            f"Model folder {path} has no config.json, so it is not a Hugging Face model "
            "folder. Point to the folder that holds config.json and the *.safetensors weights."
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise InputError(
            f"Model folder {path} has no *.safetensors weights. quantlab loads safetensors "
            "only (pickled .bin files can run code when loaded); convert the weights with "
            "transformers: model.save_pretrained(folder, safe_serialization=True)."
        )
    for shard in shards:
        check_safetensors(shard, "Copy or download the model again.")


def import_gguf(
    gguf_file: Path, out_dir: Path, dtype: str = "float16", overwrite: bool = False
) -> Path:
    """Convert a GGUF file into an HF folder at `out_dir` with weights stored in `dtype`."""
    gguf_file = Path(gguf_file).expanduser()
    out_dir = Path(out_dir).expanduser()
    torch_dt = torch_dtype(dtype)
    if not gguf_file.is_file():
        raise InputError(
            f"GGUF file {gguf_file} does not exist (resolved to {gguf_file.resolve()}). "
            "Check the path; relative paths are resolved against the current directory."
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(
            f"Output folder {out_dir} already exists and is not empty. Choose a new folder, "
            "empty it, or pass overwrite=True to replace it."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("converting %s -> %s (%s)", gguf_file, out_dir, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_hf_folder(gguf_file, tmp, torch_dt)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir


def _write_hf_folder(gguf_file: Path, folder: Path, torch_dt: torch.dtype) -> None:
    # Dequantise to fp32 first, then cast once: the stored values are then the fp32
    # dequantised weights rounded a single time to the target dtype.
    parent, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise InputError(
            f"transformers could not read {gguf_file} ({first_line(exc)}). Check that it is a "
            "GGUF file of an architecture transformers supports (llama, mistral, qwen2, ...)."
        ) from exc

    config = copy.deepcopy(model.config)
    # transformers 5.23 attaches a GgufHfQuantizer; the written weights are plain floats, so
    # the folder must not claim a quantization method (the loader would look for gguf data).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch_dt
    tie = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))

    state = model.state_dict()
    out_emb = model.get_output_embeddings()
    if tie and out_emb is not None:
        # safetensors refuses tensors that share memory, and the loader re-ties lm_head to
        # the input embedding, so the tied copy is not written.
        out_name = next(n for n, m in model.named_modules() if m is out_emb)
        state.pop(f"{out_name}.weight", None)
    tensors = {k: v.detach().to(torch_dt).contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)

    tokenizer.save_pretrained(folder)
    _fix_tokenizer_files(folder, tokenizer)
    _check_tokenizer(folder, tokenizer, gguf_file)


def _fix_tokenizer_files(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    # Older transformers copy the whole GGUF (98 MB for SmolLM2) as tokenizer.model; the
    # fast tokenizer lives in tokenizer.json and the copy would only be picked by slow classes.
    (folder / "tokenizer.model").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    # With tokenizer_class LlamaTokenizer transformers 5 rebuilds a sentencepiece-style
    # tokenizer and tokenizes SmolLM2's byte-level BPE wrongly (perplexity 178 instead of 22.4).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if SMOLLM2_EOS in tokenizer.get_vocab():
        cfg["eos_token"] = SMOLLM2_EOS
    for key in ("is_local", "local_files_only"):  # facts about this load, not the tokenizer
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_tokenizer(folder: Path, reference: PreTrainedTokenizerBase, gguf_file: Path) -> None:
    # Cheap (~0.5 s) guard against the tokenizer traps: the written folder must tokenize
    # exactly like the GGUF's own tokenizer.
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    want = reference(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    got = reloaded(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if want != got:
        raise QuantlabError(
            f"The tokenizer written for {gguf_file} tokenizes differently from the GGUF's own "
            f"({got[:8]} vs {want[:8]}); this is a quantlab bug, please report it."
        )


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(trash)
        src.rename(dst)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        src.rename(dst)


def model_info(model: PreTrainedModel) -> dict[str, Any]:
    """Summarise a model: architecture, layer/width/head counts, vocab, dtype, parameter count."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None)
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        # model.parameters() counts a tied lm_head once.
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """InputError when the tokenizer can produce ids the model's embedding [V, H] has no row for."""
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return
    rows = int(weight.shape[0])
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= rows:
        where = getattr(tokenizer, "name_or_path", "?")
        raise InputError(
            f"The tokenizer of {where} has ids up to {top}, but the model's embedding has "
            f"{rows} rows: the tokenizer does not belong to this model (or the embedding was "
            "resized without saving the tokenizer). Put the model's own tokenizer files "
            "(tokenizer.json, tokenizer_config.json) in its folder."
        )

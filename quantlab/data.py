"""Calibration and evaluation token windows from text files, HF datasets or the model itself.

The project's standard accuracy protocol is `DataSpec(source="file", path=<book>,
num_samples=16, seq_len=512, bos_id=0)`: window i is `[0] + ids[512*i : 512*i + 511]`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from quantlab.errors import InputError, first_line

if TYPE_CHECKING:  # transformers costs seconds to import; recipes only need DataSpec
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Sequences generated together for source=model: 8 x 512 tokens keeps the KV cache of a 135M
# model under 100 MB while a CPU step still amortises the per-call overhead.
GENERATION_BATCH = 8
# Tokens per data section (num_samples x seq_len) accepted without allow_large: 1024 windows of
# 512 tokens, 64x the standard protocol's evaluation.
MAX_TOKENS = 1 << 19
# Documents in a .txt file are separated by one or more blank lines.
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


class DataSpec(BaseModel):
    """Where token windows come from and how they are cut (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["file", "hf", "model"] = "file"
    path: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = Field(32, gt=0)
    seq_len: int = Field(512, gt=1)
    seed: int = 0
    packing: Literal["concat", "per_document"] = "concat"
    bos_id: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0)
    # num_samples x seq_len above MAX_TOKENS is refused unless this is set (hours on a CPU).
    allow_large: bool = False

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataSpec:
        if self.source in ("file", "hf") and not self.path:
            what = "a text file (.txt, .jsonl, .parquet)" if self.source == "file" else "a dataset"
            raise ValueError(f"source={self.source!r} needs `path`: {what}.")
        if self.source == "model" and self.path:
            raise ValueError(
                "source='model' generates its own text and takes no `path`; "
                "remove `path` or set source='file'."
            )
        if self.num_samples * self.seq_len > MAX_TOKENS and not self.allow_large:
            raise ValueError(
                f"num_samples x seq_len = {self.num_samples * self.seq_len} tokens is over the "
                f"cap of {MAX_TOKENS} (a pass over them takes hours on a CPU); lower num_samples or "
                "set allow_large: true in this section."
            )
        return self


def load_windows(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> list[torch.Tensor]:
    """Return up to spec.num_samples 1-D int64 token windows (length seq_len; per_document: <=)."""
    if spec.source == "model":
        if model is None:
            raise InputError(
                "DataSpec source='model' (data-free calibration) generates text with the model "
                "being quantized, but no model was passed to load_windows; pass model=..."
            )
        return _generate_windows(spec, tokenizer, model)

    docs = _read_documents(spec)
    if spec.packing == "concat":
        windows = _concat_windows(spec, tokenizer, docs)
    else:
        windows = _document_windows(spec, tokenizer, docs)
    where = f"{spec.source} {spec.path!r}"
    if not windows:
        raise InputError(
            f"No token window of {spec.seq_len} tokens could be cut from {where} "
            f"(packing={spec.packing}). Use a longer text, a smaller seq_len, or check "
            f"text_field={spec.text_field!r}."
        )
    if len(windows) < spec.num_samples:
        log.warning(
            "%s gives only %d windows of %d tokens (num_samples=%d asked); using %d",
            where,
            len(windows),
            spec.seq_len,
            spec.num_samples,
            len(windows),
        )
    return windows


def _read_documents(spec: DataSpec) -> list[str]:
    assert spec.path is not None  # guaranteed by DataSpec's validator
    if spec.source == "hf":
        return _hf_documents(spec)
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise InputError(
            f"Data file {spec.path} does not exist (resolved to {path.resolve()}). Check the "
            "path (relative paths are resolved against the current directory), or use "
            "source='hf' for a Hugging Face dataset name."
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"Data file {path} is not UTF-8 text ({exc}). Re-encode it as UTF-8."
            ) from exc
        # concat keeps the file byte for byte: the standard protocol tokenizes the whole file.
        if spec.packing == "concat":
            return [text]
        # per_document: a paragraph's edge whitespace (the file's final newline) is not text.
        return [doc.strip() for doc in _BLANK_LINES.split(text)]
    if suffix in (".jsonl", ".json", ".parquet"):
        return _dataset_documents(spec, "parquet" if suffix == ".parquet" else "json", path)
    raise InputError(
        f"Data file {path} has an unsupported extension {suffix!r}. Use .txt (documents "
        "separated by blank lines), .jsonl or .parquet (text in the field `text_field`)."
    )


def _dataset_documents(spec: DataSpec, builder: str, path: Path) -> list[str]:
    import datasets  # deferred: importing datasets costs about 1 s

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ or exc  # datasets wraps the parser's own, more precise error
        raise InputError(
            f"Could not read {path} as {builder} records ({first_line(cause)}). Check that "
            "the file is valid: one JSON object per line for .jsonl, a parquet table for "
            ".parquet."
        ) from exc
    return _column(ds, spec, str(path))


def _hf_documents(spec: DataSpec) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, split=spec.split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise InputError(
            f"Could not load Hugging Face dataset {spec.path!r} split {spec.split!r} "
            f"({first_line(exc)}). Check the name and split, and that the Hub (or the local "
            "datasets cache) is reachable; or export the text to a local .jsonl/.txt and use "
            "source='file'."
        ) from exc
    return _column(ds, spec, f"dataset {spec.path!r}")


def _column(ds: Any, spec: DataSpec, where: str) -> list[str]:
    if spec.text_field not in ds.column_names:
        raise InputError(
            f"{where} has no field {spec.text_field!r}; its fields are {ds.column_names}. "
            "Set text_field to the one that holds the text."
        )
    return [t for t in ds[spec.text_field] if isinstance(t, str)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # verbose=False: a whole book is longer than model_max_length, which is expected here.
    out = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids) for ids in out]


def _concat_windows(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, docs: list[str]
) -> list[torch.Tensor]:
    ids = _tokenize(tokenizer, ["\n\n".join(docs)])[0]
    n, L = spec.seq_len, len(ids)
    windows: list[torch.Tensor] = []
    if spec.bos_id is not None:
        # Stride n, n-1 text tokens after the BOS: one text token between windows is never
        # seen. This is the standard protocol exactly ([0] + ids[512*i : 512*i + 511]).
        count = min(spec.num_samples, (L + 1) // n)
        for i in range(count):
            chunk = [spec.bos_id, *ids[n * i : n * i + n - 1]]
            windows.append(torch.tensor(chunk, dtype=torch.int64))
    else:
        count = min(spec.num_samples, L // n)
        for i in range(count):
            windows.append(torch.tensor(ids[n * i : n * (i + 1)], dtype=torch.int64))
    return windows


def _document_windows(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, docs: list[str]
) -> list[torch.Tensor]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        return []
    # A document shorter than 2 tokens has nothing to predict.
    all_ids = [ids for ids in _tokenize(tokenizer, docs) if len(ids) >= 2]
    if len(all_ids) > spec.num_samples:
        gen = torch.Generator().manual_seed(spec.seed)
        pick = torch.randperm(len(all_ids), generator=gen)[: spec.num_samples]
        all_ids = [all_ids[i] for i in sorted(pick.tolist())]  # keep document order
    head = [] if spec.bos_id is None else [spec.bos_id]
    keep = spec.seq_len - len(head)
    return [torch.tensor(head + ids[:keep], dtype=torch.int64) for ids in all_ids]


@torch.inference_mode()
def _generate_windows(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> list[torch.Tensor]:
    bos = spec.bos_id
    if bos is None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    windows: list[torch.Tensor] = []
    steps = spec.seq_len - 1
    bar = tqdm(total=spec.num_samples * steps, desc="generating calibration text", unit="tok")
    with bar:
        for start in range(0, spec.num_samples, GENERATION_BATCH):
            batch = min(GENERATION_BATCH, spec.num_samples - start)
            seq = torch.full((batch, 1), bos, dtype=torch.int64, device=device)
            step_input, past = seq, None
            for _ in range(steps):
                # Fixed length: sampling continues past an EOS, which keeps every window full.
                out = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float() / spec.temperature
                if spec.top_k is not None and spec.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, spec.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                step_input = torch.multinomial(probs, 1, generator=gen)
                seq = torch.cat([seq, step_input], dim=1)
                bar.update(batch)
            windows.extend(row.to("cpu", torch.int64) for row in seq)
    return windows

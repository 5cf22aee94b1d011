"""quantlab.data: token windows from the real texts in shared/data and from the model itself."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from quantlab.data import DataSpec, load_windows
from quantlab.errors import InputError
from quantlab.models import embedded_model_dir, load_model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="module")
def model(tiny_model):  # type: ignore[no-untyped-def]
    """A tiny random Llama with SmolLM2's tokenizer: sampling mechanics need no real weights."""
    return load_model(str(tiny_model("llama")))[0]


@pytest.fixture(scope="module")
def pp_ids(tok, data_file) -> list[int]:
    text = data_file("austen/prideandprejudice.txt").read_text(encoding="utf-8")
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


@pytest.fixture
def paragraphs(data_file) -> list[str]:
    """The first 40 paragraphs of Persuasion longer than 80 characters."""
    text = data_file("austen/persuasion.txt").read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 80][:40]


def test_standard_protocol(tok, pp_ids: list[int], data_file) -> None:
    path = data_file("austen/prideandprejudice.txt")
    spec = DataSpec(source="file", path=str(path), num_samples=16, seq_len=512, bos_id=0)
    windows = load_windows(spec, tok)
    assert len(windows) == 16
    for i, w in enumerate(windows):
        assert w.dtype == torch.int64 and w.shape == (512,)
        # The protocol's own words: window i is [0] + ids[512*i : 512*i + 511].
        assert w.tolist() == [0, *pp_ids[512 * i : 512 * i + 511]]


def test_concat_without_bos_is_contiguous(tok, pp_ids: list[int], data_file) -> None:
    path = data_file("austen/prideandprejudice.txt")
    windows = load_windows(DataSpec(path=str(path), num_samples=5, seq_len=100), tok)
    assert [w.shape for w in windows] == [(100,)] * 5
    assert torch.cat(windows).tolist() == pp_ids[:500]


def test_fewer_windows_than_asked(tok, tmp_path: Path, paragraphs, caplog) -> None:
    f = tmp_path / "short.txt"
    text = "\n\n".join(paragraphs[:10])
    f.write_text(text, encoding="utf-8")
    n_ids = len(tok(text, add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="quantlab.data"):
        windows = load_windows(DataSpec(path=str(f), num_samples=1000, seq_len=64, bos_id=0), tok)
    # Window i needs ids up to 64*i + 63, so (n + 1) // 64 full windows exist.
    assert len(windows) == (n_ids + 1) // 64 > 0
    assert "only" in caplog.text and "1000" in caplog.text
    with caplog.at_level(logging.WARNING, logger="quantlab.data"):
        assert len(load_windows(DataSpec(path=str(f), num_samples=1000, seq_len=64), tok)) == (
            n_ids // 64
        )


def test_zero_windows_is_an_error(tok, tmp_path: Path) -> None:
    f = tmp_path / "tiny.txt"
    f.write_text("Emma Woodhouse, handsome, clever, and rich.", encoding="utf-8")
    with pytest.raises(InputError, match="No token window"):
        load_windows(DataSpec(path=str(f), seq_len=512), tok)


def test_missing_file(tok, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "book.txt"
    with pytest.raises(InputError, match="does not exist") as info:
        load_windows(DataSpec(path=str(missing)), tok)
    assert str(missing) in str(info.value)


def test_unsupported_extension(tok, tmp_path: Path) -> None:
    f = tmp_path / "book.pdf"
    f.write_bytes(b"%PDF")
    with pytest.raises(InputError, match="unsupported extension"):
        load_windows(DataSpec(path=str(f)), tok)


def test_per_document_txt(tok, data_file) -> None:
    path = data_file("austen/prideandprejudice.txt")
    spec = DataSpec(path=str(path), packing="per_document", num_samples=8, seq_len=64, bos_id=0)
    a = load_windows(spec, tok)
    assert len(a) == 8
    assert all(w[0] == 0 and 3 <= len(w) <= 64 and w.dtype == torch.int64 for w in a)
    # Seeded sampling: the same seed picks the same paragraphs, another seed others.
    assert all(torch.equal(x, y) for x, y in zip(a, load_windows(spec, tok), strict=True))
    b = load_windows(spec.model_copy(update={"seed": 1}), tok)
    assert [w.tolist() for w in a] != [w.tolist() for w in b]


def test_per_document_skips_short_and_truncates(tok, tmp_path: Path, paragraphs) -> None:
    f = tmp_path / "docs.txt"
    docs = [paragraphs[0], "a", paragraphs[1], "", paragraphs[2]]  # "a" is 1 token
    f.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    windows = load_windows(DataSpec(path=str(f), packing="per_document", seq_len=16), tok)
    want = [tok(p, add_special_tokens=False)["input_ids"][:16] for p in paragraphs[:3]]
    assert [w.tolist() for w in windows] == want


def _write_jsonl(path: Path, docs: list[str], field: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")


def test_jsonl_and_parquet(tok, tmp_path: Path, paragraphs) -> None:
    import datasets

    jsonl = tmp_path / "docs.jsonl"
    _write_jsonl(jsonl, paragraphs, "body")
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"body": paragraphs}).to_parquet(str(parquet))

    want_concat = tok("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"][:96]
    for path in (jsonl, parquet):
        spec = DataSpec(path=str(path), text_field="body", num_samples=3, seq_len=32)
        assert torch.cat(load_windows(spec, tok)).tolist() == want_concat
        per_doc = load_windows(spec.model_copy(update={"packing": "per_document"}), tok)
        assert len(per_doc) == 3 and all(len(w) <= 32 for w in per_doc)

    with pytest.raises(InputError, match="'body'"):
        load_windows(DataSpec(path=str(jsonl), text_field="content"), tok)


def test_malformed_jsonl(tok, tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match="one JSON object per line"):
        load_windows(DataSpec(path=str(f)), tok)


def test_hf_source_local_folder(tok, tmp_path: Path, paragraphs) -> None:
    # load_dataset accepts a local folder of data files, so the hf path is testable offline.
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", paragraphs, "text")
    spec = DataSpec(source="hf", path=str(folder), split="train", num_samples=2, seq_len=32)
    want = tok("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"][:64]
    assert torch.cat(load_windows(spec, tok)).tolist() == want
    with pytest.raises(InputError, match="split"):
        load_windows(spec.model_copy(update={"split": "validation"}), tok)


def test_dataspec_validation() -> None:
    with pytest.raises(ValidationError, match="needs `path`"):
        DataSpec(source="file")
    with pytest.raises(ValidationError, match="needs `path`"):
        DataSpec(source="hf")
    with pytest.raises(ValidationError, match="takes no `path`"):
        DataSpec(source="model", path="x.txt")
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataSpec(path="x.txt", num_sample=3)  # type: ignore[call-arg]
    for bad in ({"num_samples": 0}, {"seq_len": 1}, {"temperature": 0.0}, {"top_k": 0}):
        with pytest.raises(ValidationError):
            DataSpec(path="x.txt", **bad)
    assert DataSpec(source="model").seq_len == 512


def test_model_source_needs_model(tok) -> None:
    with pytest.raises(InputError, match=r"model=\.\.\."):
        load_windows(DataSpec(source="model"), tok)


def test_model_source_is_seeded(tok, model) -> None:
    spec = DataSpec(source="model", num_samples=3, seq_len=8, seed=7)
    a = load_windows(spec, tok, model)
    assert len(a) == 3
    assert all(w.shape == (8,) and w.dtype == torch.int64 for w in a)
    assert all(w[0] == tok.bos_token_id for w in a)  # default start token
    b = load_windows(spec, tok, model)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = load_windows(spec.model_copy(update={"seed": 8}), tok, model)
    assert [w.tolist() for w in a] != [w.tolist() for w in c]


def test_model_source_top_k_1_is_greedy(tok, model) -> None:
    spec = DataSpec(source="model", num_samples=2, seq_len=10, bos_id=0, top_k=1)
    a = load_windows(spec, tok, model)
    b = load_windows(spec.model_copy(update={"seed": 123}), tok, model)
    assert all(w[0] == 0 for w in a)
    assert [w.tolist() for w in a] == [w.tolist() for w in b]
    # The greedy continuation of the BOS, computed with transformers' own generate.
    greedy = model.generate(torch.tensor([[0]]), max_new_tokens=9, do_sample=False, min_length=0)
    assert a[0].tolist() == greedy[0].tolist()

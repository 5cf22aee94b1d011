"""quantlab.models: loading, GGUF import and the embedded SmolLM2 model.

The embedded model is converted once per machine into the real cache (~25 s the first time);
the three conversion traps (tokenizer class, tokenizer.model copy, eos) are checked against the
model and tokenizer loaded straight from the GGUF file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantlab.errors import InputError
from quantlab.models import (
    embedded_gguf_path,
    embedded_model_dir,
    import_gguf,
    load_model,
    model_info,
)

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.",
    " Mr. Bennet's 3 daughters—Jane, Elizabeth & Lydia—were “out” at 15½!\n\n\tNetherfield?",
    "def f(x):\n    return x ** 2  # 日本語 and émigré",
]


@pytest.fixture(scope="module")
def embedded_dir() -> Path:
    return embedded_model_dir()


@pytest.fixture(scope="module")
def folder_model(embedded_dir: Path):
    return load_model(str(embedded_dir))


@pytest.fixture(scope="module")
def gguf_model():
    """The embedded model and tokenizer loaded straight from the GGUF (~15 s)."""
    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    return model, tok


def test_embedded_folder_is_plain_hf(embedded_dir: Path) -> None:
    names = {p.name for p in embedded_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "tokenizer.model" not in names  # trap: a 98 MB copy of the GGUF
    assert "generation_config.json" in names
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    tok_cfg = json.loads((embedded_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # trap: not LlamaTokenizer
    assert tok_cfg["eos_token"] == "<|im_end|>"  # trap: the chat turn end
    with safe_open(str(embedded_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to model.embed_tokens.weight
        assert f.get_tensor("model.norm.weight").dtype == torch.float32


def test_embedded_model_dir_is_cached(embedded_dir: Path) -> None:
    stamp = (embedded_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_dir() == embedded_dir
    assert (embedded_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_load_embedded_alias(folder_model) -> None:
    model, tok = load_model("embedded:smollm2")
    assert not model.training
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref, _ = folder_model
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_model_info(folder_model) -> None:
    info = model_info(folder_model[0])
    assert info == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 30,
        "hidden_size": 576,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "num_parameters": 134_515_008,
    }


def test_load_model_dtype(embedded_dir: Path) -> None:
    model, _ = load_model(str(embedded_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


@pytest.mark.slow
def test_tokenizer_matches_gguf(folder_model, gguf_model) -> None:
    tok, ref = folder_model[1], gguf_model[1]
    for text in SENTENCES:
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert tok(text, add_special_tokens=False)["input_ids"] == want
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.decode(want) == ref.decode(want)
    # A byte-level BPE tokenizer: the first sentence has this exact tokenization.
    assert tok(SENTENCES[0], add_special_tokens=False)["input_ids"][:6] == [
        1589,
        314,
        253,
        4569,
        21902,
        14494,
    ]
    assert tok.eos_token_id == ref.eos_token_id == 2
    assert tok.bos_token_id == ref.bos_token_id


@pytest.mark.slow
def test_logits_match_gguf(folder_model, gguf_model) -> None:
    tok = folder_model[1]
    ids = torch.tensor(
        [[0, *tok(SENTENCES[0] + SENTENCES[1], add_special_tokens=False)["input_ids"]]]
    )
    with torch.inference_mode():
        got = folder_model[0](ids).logits
        want = gguf_model[0](ids).logits
    # Same fp32 weights and the same kernels: only summation-order noise is allowed.
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_greedy_generation_matches_gguf(folder_model, gguf_model) -> None:
    tok = folder_model[1]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
    texts = []
    for model, t in (folder_model, gguf_model):
        out = model.generate(input_ids, max_new_tokens=24, do_sample=False)
        texts.append(t.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
    assert texts[0] == texts[1]
    assert "Paris" in texts[0]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_folder_without_safetensors(tmp_path: Path, embedded_dir: Path) -> None:
    (tmp_path / "config.json").write_text((embedded_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(InputError, match="safetensors"):
        load_model(str(tmp_path))


def test_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="import_gguf"):
        load_model(str(f))


def test_bad_dtype_and_device(embedded_dir: Path) -> None:
    with pytest.raises(InputError, match="float32"):
        load_model(str(embedded_dir), dtype="int8")
    with pytest.raises(InputError, match="device"):
        load_model(str(embedded_dir), device="tpu:banana")


def test_unreachable_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode makes the Hub attempt fail at once instead of retrying for ~50 s.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="no such local folder"):
        load_model("quantlab-test/no-such-model-xyz")


def test_import_gguf_refuses_nonempty_out_dir(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="overwrite=True"):
        import_gguf(gguf, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_import_gguf_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_import_gguf_not_a_gguf(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(InputError):
        import_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # temp dir cleaned up


@pytest.mark.slow
def test_import_gguf_float16_overwrite(tmp_path: Path, folder_model) -> None:
    out = tmp_path / "f16"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert import_gguf(embedded_gguf_path(), out, dtype="float16", overwrite=True) == out
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16"]  # no temp dirs left
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = load_model(str(out), dtype="float32")
    ref_model, ref_tok = folder_model
    text = SENTENCES[0]
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = torch.tensor([[0, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.inference_mode():
        got, want = model(ids).logits, ref_model(ids).logits
    # fp16 storage rounds the dequantised weights: close to fp32, but not identical.
    assert not torch.equal(got, want)
    assert (got - want).abs().max().item() < 0.5
    assert torch.equal(got[0, -4:].argmax(-1), want[0, -4:].argmax(-1))


def test_unsupported_architecture_names_the_closest_family_and_the_docs() -> None:
    from quantlab.adapters import adapter_for_architectures
    from quantlab.errors import InputError

    with pytest.raises(InputError) as e:
        adapter_for_architectures(["Qwen3NextForCausalLM"])
    msg = str(e.value)
    assert "'Qwen3NextForCausalLM'" in msg and "closest by name is Qwen3" in msg
    assert "docs/models.md" in msg

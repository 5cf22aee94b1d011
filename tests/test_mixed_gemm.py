"""TensorRT-LLM's mixed-GEMM weight layout (quantlab/export/mixed_gemm.py).

The permutation form in the module is checked against a second, independent model of the C++
loops (whole 32-bit rows moved, a sub-byte transpose, the interleave's word offsets, the bias as
a nibble xor and the register shuffle as bit moves), against hand-derived first bytes, and for
being a bijection with an exact inverse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlab.cli import main
from quantlab.export.mixed_gemm import gather_index, preprocess, row_order, unpreprocess

CASES = [
    (75, "main"),
    (80, "main"),
    (89, "main"),
    (90, "main"),
    (90, "ampere"),
    (90, "transpose_only"),
    (120, "main"),
]


def _bytes_of(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = codes.reshape(-1).to(torch.int16)
    if bits == 8:
        return (c & 0xFF).to(torch.uint8)
    return ((c[0::2] & 0xF) | ((c[1::2] & 0xF) << 4)).to(torch.uint8)


def _codes_of(b: torch.Tensor, bits: int) -> torch.Tensor:
    u = b.to(torch.int16)
    if bits == 8:
        return u - 256 * (u >= 128).to(torch.int16)
    c = torch.stack([u & 0xF, u >> 4], -1).reshape(-1)
    return c - 16 * (c >= 8).to(torch.int16)


def _loops(q: torch.Tensor, bits: int, sm: int, layout: str) -> torch.Tensor:
    """The C++ op step by step on packed bytes (an independent model, not the module's)."""
    k, n = q.shape
    reorder = not (sm == 90 and layout == "transpose_only")
    interleave = sm != 90 or layout == "ampere"
    words = _bytes_of(q, bits).view(torch.int32).reshape(k, -1)  # packed along N, 32-bit words
    if reorder:
        rows = 128 // bits
        per = rows // 4
        order = [2 * (t // per) + 8 * ((t % per) // 2) + (t % 2) for t in range(rows)]
        words = torch.cat([words[b + torch.tensor(order)] for b in range(0, k, rows)])
    codes = _codes_of(words.view(torch.uint8).reshape(-1), bits).reshape(k, n)
    stream = torch.cat([_bytes_of(codes[:, c], bits) for c in range(n)])  # column-major bytes
    if interleave:
        per_word, cols = 32 // bits, 16 // bits
        w_in = stream.view(torch.int32)
        w_out = torch.empty_like(w_in)
        col_words, tile_words = k // per_word, TILE // per_word
        for c in range(n):
            for r in range(col_words):
                base = (r // tile_words) * tile_words
                dst = (
                    (c // cols) * col_words * cols
                    + cols * base
                    + tile_words * (c % cols)
                    + r % tile_words
                )
                w_out[dst] = w_in[c * col_words + r]
        stream = w_out.view(torch.uint8)
    if sm != 90 or layout != "transpose_only":
        if bits == 8:
            stream = ((stream.to(torch.int16) + 128) & 0xFF).to(torch.uint8)
            stream = stream.reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(-1)
        else:
            b = stream.to(torch.int64)
            stream = (((b & 0xF) ^ 8) | (((b >> 4) ^ 8) << 4)).to(torch.uint8)
            regs = stream.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            new = torch.zeros_like(regs)
            for slot in range(8):
                src = 2 * slot if slot < 4 else 2 * (slot - 4) + 1
                new |= ((regs >> (4 * src)) & 0xF) << (4 * slot)
            stream = torch.where(new >= 2**31, new - 2**32, new).to(torch.int32).view(torch.uint8)
    return stream.view(torch.int8).reshape(k, n * bits // 8)


TILE = 64


def test_row_order_is_the_tensor_core_load_order() -> None:
    assert row_order(8).tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert row_order(4).tolist()[:12] == [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("sm", "layout"), CASES)
@pytest.mark.parametrize(("k", "n"), [(64, 64), (128, 192)])
def test_layout_matches_the_loop_model_and_inverts(
    bits: int, sm: int, layout: str, k: int, n: int
) -> None:
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(
        lo, hi, (k, n), dtype=torch.int8, generator=torch.Generator().manual_seed(k + n + sm)
    )
    out = preprocess(q, bits, sm, layout)
    assert out.dtype == torch.int8 and out.shape == (k, n * bits // 8)
    assert out.view(torch.float16).shape == (k, n * bits // 16)  # what the checkpoint stores
    assert torch.equal(out, _loops(q, bits, sm, layout))
    assert torch.equal(torch.sort(gather_index(k, n, bits, sm, layout)).values, torch.arange(k * n))
    assert torch.equal(unpreprocess(out.view(torch.float16), bits, sm, k, n, layout), q)


def test_hand_derived_first_bytes_sm80() -> None:
    q = torch.randint(
        -8, 8, (128, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(1)
    )
    o = preprocess(q, 4, 80).view(torch.uint8).reshape(-1).to(torch.int32)
    c = q[:, 0].to(torch.int32) + 8  # column 0, unsigned
    pairs = [(0, 8), (16, 24), (1, 9), (17, 25), (2, 10), (18, 26), (3, 11), (19, 27)]
    assert o[:8].tolist() == [int(c[a] | c[b] << 4) for a, b in pairs]
    c1 = q[:, 1].to(torch.int32) + 8  # column 1's first 64-row tile follows column 0's (32 bytes)
    assert int(o[32]) == int(c1[0] | c1[8] << 4)
    q8 = torch.randint(
        -128, 128, (128, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(2)
    )
    o8 = preprocess(q8, 8, 80).view(torch.uint8).reshape(-1).to(torch.int32)
    d = q8[:, 0].to(torch.int32) + 128
    assert o8[:8].tolist() == [int(d[i]) for i in (0, 8, 1, 9, 2, 10, 3, 11)]


def test_layouts_differ_by_architecture() -> None:
    q = torch.randint(
        -8, 8, (128, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(3)
    )
    a, b, c = preprocess(q, 4, 80), preprocess(q, 4, 90), preprocess(q, 4, 90, "transpose_only")
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert torch.equal(a, preprocess(q, 4, 90, "ampere"))
    assert torch.equal(c.reshape(-1).view(torch.uint8), _bytes_of(q.t(), 4))  # a plain transpose


RECIPE = """\
name: g
model: {{source: {model}}}
steps:
  - calibrator: rtn
    args: {{format: {fmt}}}
export: {{output_dir: {out}, dtype: float16, tp_size: {tp}{sm}}}
evaluation: {{enabled: false}}
"""


@pytest.mark.parametrize(
    ("fmt", "bits", "sm", "tp"), [("int4_g32_asym", 4, 80, 1), ("int8_g32_asym", 8, 90, 2)]
)
def test_gptq_checkpoint_in_trtllm_layout(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    bits: int,
    sm: int,
    tp: int,
) -> None:
    """export.trtllm_sm writes each rank's GPTQ weights preprocessed for that GPU, [K, N*bits/16] in
    the model dtype (TensorRT-LLM's shapes); they decode to the run's codes; quantlab's engine reads
    them; without it check-export says the layout is quantlab's (a note, not a problem)."""
    from quantlab.engine.checkpoint import load_checkpoint
    from quantlab.export.mixed_gemm import from_trtllm_gptq

    model = tiny_model("llama")
    for name, extra in (("rows", ""), ("trt", f", trtllm_sm: {sm}")):
        text = RECIPE.format(model=model, fmt=fmt, out=tmp_path / name, tp=tp, sm=extra)
        (tmp_path / f"{name}.yaml").write_text(text)
        assert main(["--quiet", "run", str(tmp_path / f"{name}.yaml")]) == 0
    capsys.readouterr()
    assert main(["check-export", str(tmp_path / "rows")]) == 0
    assert "note: " in capsys.readouterr().out
    assert main(["check-export", str(tmp_path / "trt")]) == 0
    assert "note: " not in capsys.readouterr().out
    for rank in range(tp):
        rows = load_file(str(tmp_path / "rows" / f"rank{rank}.safetensors"))
        trt = load_file(str(tmp_path / "trt" / f"rank{rank}.safetensors"))
        for key, w in rows.items():
            if key.endswith(".weight") and w.dtype == torch.int8:
                n = w.shape[0] * (2 if bits == 4 else 1)
                assert trt[key].dtype == torch.float16 and trt[key].shape == (
                    w.shape[1],
                    n * bits // 16,
                )
                assert torch.equal(from_trtllm_gptq(trt[key], bits, sm), w), key
            else:
                assert torch.equal(trt[key], w), key
    if tp == 1:  # quantlab's engine reads the TensorRT-LLM layout back to the same tensors
        a, b = load_checkpoint(tmp_path / "rows"), load_checkpoint(tmp_path / "trt")
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_trtllm_sm_refuses_shards_the_layout_cannot_hold() -> None:
    # TensorRT-LLM's padding rule (multiples of 64 * tp, refused first by plan_export) implies
    # these shapes today; the layout keeps its own check for a model that pads.
    from quantlab.adapters import ADAPTERS
    from quantlab.errors import InputError
    from quantlab.export.trtllm import _check_gptq_layout

    d = {"hidden": 96, "intermediate": 256, "heads": 3, "kv_heads": 1, "head_dim": 32, "layers": 2}
    with pytest.raises(InputError, match=r"export.trtllm_sm 80: layers.\*.self_attn.q_proj shards"):
        _check_gptq_layout(d, 1, 4, 80, ADAPTERS["LlamaForCausalLM"])
    d["hidden"], d["heads"], d["kv_heads"] = 128, 4, 2
    _check_gptq_layout(d, 1, 4, 80, ADAPTERS["LlamaForCausalLM"])

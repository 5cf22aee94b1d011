"""TensorRT-LLM's weight preprocessing for its mixed-input (W4A16 / W8A16) GEMM, in pure torch.

TensorRT-LLM's GPTQ converter stores W4A16_GPTQ / W8A16_GPTQ weights already preprocessed for the
GPU it ran on (`preprocess_weights_for_mixed_gemm`, a C++ op, called by the converter; trtllm-build
does not preprocess GPTQ weights). This module reproduces that byte layout as a permutation of the
signed codes, from a reading of TensorRT-LLM's `cutlass_preprocessors.cpp` and
`quantization/functional.py` (2025 main line; docs/export.md names the steps and what is
unconfirmed). Input: signed codes q int8 [K, N] (the GEMM's B operand, i.e. the HF weight
transposed; int4 in [-8, 7]). Output: int8 [K, N * bits / 8], which the checkpoint stores viewed as
the model dtype ([K, N/4] for int4, [K, N/2] for int8).

Steps per architecture: (1) within blocks of 128/bits rows, reorder rows for the tensor-core load;
(2) transpose to column-major; (3) on SM75-89 (and SM120), interleave 64-row tiles of 16/bits
neighbouring columns; (4) add 2^(bits-1) (unsigned codes) and shuffle the elements inside each
32-bit register. SM90 in TensorRT-LLM's 2025 main line does (1), (2), (4); older releases used the
SM80 layout (0.7) or a plain transpose (0.10): `sm90_layout` picks one.
"""

from __future__ import annotations

import torch

from quantlab.errors import InputError

TILE_K = 64  # k rows per interleave tile for 16-bit activations
SUPPORTED_SM = (75, 80, 86, 89, 90, 120)
SM90_LAYOUTS = ("main", "ampere", "transpose_only")


def _steps(sm: int, sm90_layout: str) -> tuple[bool, bool, bool]:
    """(row reorder, column interleave, bias + register shuffle) for an architecture."""
    if sm not in SUPPORTED_SM:
        raise InputError(f"TensorRT-LLM weight layout: SM {sm} is not one of {SUPPORTED_SM}.")
    if sm != 90:
        return True, True, True
    if sm90_layout not in SM90_LAYOUTS:
        raise InputError(f"sm90_layout {sm90_layout!r} is not one of {SM90_LAYOUTS}.")
    return {"main": (True, False, True), "ampere": (True, True, True)}.get(
        sm90_layout, (False, False, False)
    )


def row_order(bits: int) -> torch.Tensor:
    """Source row of each row in one block of 128/bits rows: pairs of rows, strided by 8."""
    rows = 128 // bits
    per = rows // 4  # 8 for int4, 4 for int8
    t = torch.arange(rows)
    return 2 * (t // per) + 8 * ((t % per) // 2) + (t % 2)


def register_order(bits: int) -> torch.Tensor:
    """Element taken by each slot of a 32-bit register: evens first, then odds."""
    n = 32 // bits
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def gather_index(k: int, n: int, bits: int, sm: int, sm90_layout: str = "main") -> torch.Tensor:
    """Flat index into q [K, N] (row-major) of each element of the output stream (a permutation)."""
    reorder, interleave, shuffle = _steps(sm, sm90_layout)
    rows = 128 // bits
    if (reorder and k % rows) or n % 8 or (interleave and k % TILE_K):
        raise InputError(
            f"TensorRT-LLM's mixed GEMM layout needs K a multiple of {TILE_K if interleave else rows} "
            f"and N of 8 (got K={k}, N={n})."
        )
    idx = torch.arange(k * n).reshape(k, n)
    if reorder:
        src = (torch.arange(k) // rows) * rows + row_order(bits).repeat(k // rows)
        idx = idx[src]
    idx = idx.t()  # column-major: each column's K codes contiguous
    if interleave:
        cols = 16 // bits
        idx = idx.reshape(n // cols, cols, k // TILE_K, TILE_K).permute(0, 2, 1, 3)
    flat = idx.reshape(-1)
    if shuffle:
        flat = flat.reshape(-1, 32 // bits)[:, register_order(bits)].reshape(-1)
    return flat


def _pack(stream: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int16, already in [0, 2^bits) or signed) -> bytes int8; int4: element 2i low nibble."""
    if bits == 8:
        return (stream & 0xFF).to(torch.uint8).view(torch.int8)
    return ((stream[0::2] & 0xF) | ((stream[1::2] & 0xF) << 4)).to(torch.uint8).view(torch.int8)


def _unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes -> unsigned codes int16 (inverse of _pack)."""
    u = b.reshape(-1).view(torch.uint8).to(torch.int16)
    return u if bits == 8 else torch.stack([u & 0xF, u >> 4], dim=-1).reshape(-1)


def preprocess(q: torch.Tensor, bits: int, sm: int, sm90_layout: str = "main") -> torch.Tensor:
    """Signed codes int8 [K, N] -> TensorRT-LLM's preprocessed bytes int8 [K, N * bits / 8]."""
    if q.dtype != torch.int8 or q.dim() != 2 or bits not in (4, 8):
        raise ValueError(f"preprocess expects int8 [K, N] codes and bits 4 or 8, got {q.dtype}")
    k, n = q.shape
    _, _, shuffle = _steps(sm, sm90_layout)
    stream = q.reshape(-1).to(torch.int16)[gather_index(k, n, bits, sm, sm90_layout)]
    if shuffle:
        stream = stream + (1 << (bits - 1))
    return _pack(stream, bits).reshape(k, n * bits // 8)


def unpreprocess(
    w: torch.Tensor, bits: int, sm: int, k: int, n: int, sm90_layout: str = "main"
) -> torch.Tensor:
    """Inverse of preprocess: preprocessed bytes (or their fp16/bf16 view) -> signed codes [K, N]."""
    _, _, shuffle = _steps(sm, sm90_layout)
    stream = _unpack(w.contiguous().view(torch.int8), bits)
    half = 1 << (bits - 1)
    # Without the bias step the codes were stored signed: sign-extend instead of subtracting.
    stream = stream - half if shuffle else stream - 2 * half * (stream >= half).to(torch.int16)
    out = torch.empty(k * n, dtype=torch.int16)
    out[gather_index(k, n, bits, sm, sm90_layout)] = stream
    return out.to(torch.int8).reshape(k, n)


GPTQ_ALGOS = {"W4A16_GPTQ": 4, "W8A16_GPTQ": 8}


def to_trtllm_gptq(w: torch.Tensor, bits: int, sm: int, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint GPTQ weight in quantlab's layout (int4: int8 [N/2, K] row-packed; int8: [N, K])
    -> TensorRT-LLM's preprocessed layout for SM `sm`, viewed as dtype ([K, N/4] or [K, N/2])."""
    from quantlab.kernels.packing import unpack_int4_rows

    codes = unpack_int4_rows(w) if bits == 4 else w
    return preprocess(codes.t().contiguous(), bits, sm).view(dtype)


def from_trtllm_gptq(w: torch.Tensor, bits: int, sm: int) -> torch.Tensor:
    """Inverse of to_trtllm_gptq: TensorRT-LLM's preprocessed weight -> quantlab's layout."""
    from quantlab.kernels.packing import pack_int4_rows

    k = w.shape[0]
    n = w.shape[1] * (16 // bits)
    codes = unpreprocess(w, bits, sm, k, n).t().contiguous()
    return pack_int4_rows(codes) if bits == 4 else codes

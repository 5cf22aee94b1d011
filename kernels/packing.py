"""Packed int4 layouts.

The checkpoint layout is the one TensorRT-LLM's W4A16_AWQ/W4A16_GPTQ checkpoints use for
`weight`: a signed int4 matrix [N, K] stored as int8 [N // 2, K], two output rows per byte,
the even row in the low nibble and the odd row in the high nibble.
"""

from __future__ import annotations

import torch

INT4_MIN = -8
INT4_MAX = 7


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values int8 [N, K] in [-8, 7] into int8 [N // 2, K] (even row = low nibble)."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4_rows expects int8 values, got {q.dtype}")
    if q.dim() != 2 or q.shape[0] % 2 != 0:
        raise ValueError(f"pack_int4_rows expects a 2-D tensor with an even row count, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("pack_int4_rows: values outside the int4 range [-8, 7]")
    low = q[0::2].to(torch.int16) & 0x0F
    high = (q[1::2].to(torch.int16) & 0x0F) << 4
    packed = (low | high).to(torch.uint8)
    return packed.view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int8 [N // 2, K] into signed int4 values int8 [N, K]; inverse of pack_int4_rows."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise TypeError(f"unpack_int4_rows expects a 2-D int8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    low = (packed << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = packed >> 4
    out = torch.empty((packed.shape[0] * 2, packed.shape[1]), dtype=torch.int8, device=packed.device)
    out[0::2] = low
    out[1::2] = high
    return out

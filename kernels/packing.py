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
        raise ValueError(
            f"pack_int4_rows expects a 2-D tensor with an even row count, got {tuple(q.shape)}"
        )
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("pack_int4_rows: values outside the int4 range [-8, 7]")
    low = q[0::2].to(torch.int16) & 0x0F
    high = (q[1::2].to(torch.int16) & 0x0F) << 4
    packed = (low | high).to(torch.uint8)
    return packed.view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int8 [N // 2, K] into signed int4 values int8 [N, K]; inverse of pack_int4_rows."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise TypeError(
            f"unpack_int4_rows expects a 2-D int8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    low = (packed << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = packed >> 4
    out = torch.empty(
        (packed.shape[0] * 2, packed.shape[1]), dtype=torch.int8, device=packed.device
    )
    out[0::2] = low
    out[1::2] = high
    return out


# Asymmetric int4 codes u in [0, 15] are stored with an offset of 8 (u - 8 in [-8, 7]) so that
# both flavours share one signed nibble layout; the zero point stays the integer z in [0, 15]
# and kernels compute w = ((u - 8) - (z - 8)) * s = (u - z) * s exactly in int8.
ASYM_OFFSET = 8


def pack_int4_asym(codes: torch.Tensor) -> torch.Tensor:
    """Pack asymmetric int4 codes uint8 [N, K] in [0, 15] into int8 [N // 2, K] (stored as u - 8)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_int4_asym expects uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4_asym: codes outside [0, 15]")
    return pack_int4_rows((codes.to(torch.int16) - ASYM_OFFSET).to(torch.int8))


def unpack_int4_asym(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int8 [N // 2, K] written by pack_int4_asym into uint8 codes [N, K] in [0, 15]."""
    return (unpack_int4_rows(packed).to(torch.int16) + ASYM_OFFSET).to(torch.uint8)


def act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """Permutation int64 [K] that makes act-order groups (g_idx int [K]) contiguous and ordered.

    GPTQ with act-order assigns input column k to group g_idx[k] out of order. Kernels only read
    contiguous groups, so the exporter stores W[:, perm] (once, offline) and the runtime gathers
    x[..., perm]; scales/zeros [N, K // G] keep their group indexing unchanged.
    """
    if g_idx.dim() != 1 or g_idx.numel() % group_size:
        raise ValueError(f"g_idx must be 1-D with a length divisible by {group_size}")
    counts = torch.bincount(g_idx.long(), minlength=g_idx.numel() // group_size)
    if counts.numel() != g_idx.numel() // group_size or bool((counts != group_size).any()):
        raise ValueError(
            f"act_order_perm: every group must hold exactly {group_size} columns; got counts "
            f"{counts.tolist()[:8]}... (a g_idx from GPTQ with static groups always does)"
        )
    return torch.argsort(g_idx.long(), stable=True)


def w4_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel W4 tensors (qweight int8 [N/2, K], scales [N, K/G], zeros uint8 [N, K/G] or None).

    codes: int8 [N, K] in [-8, 7] (symmetric, zero None) or uint8 [N, K] in [0, 15] with integer
    zero [N, K/G] in [0, 15]; scale [N, K/G] (any float dtype, cast to scale_dtype if given).
    The zeros stay integers so that (u - z) * s is exact in the kernel, as in the reference.
    """
    scales = scale if scale_dtype is None else scale.to(scale_dtype)
    if zero is None:
        return pack_int4_rows(codes), scales.contiguous(), None
    if zero.shape != scale.shape:
        raise ValueError(f"zero {tuple(zero.shape)} and scale {tuple(scale.shape)} must match")
    if zero.numel() and int(zero.max()) > 15:
        raise ValueError("w4_from_codes: integer zero points must lie in [0, 15]")
    return pack_int4_asym(codes), scales.contiguous(), zero.to(torch.uint8).contiguous()


def w4_to_codes(qweight: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Inverse of w4_from_codes for the codes: int8 [N, K] (symmetric) or uint8 [N, K] (asym)."""
    return unpack_int4_rows(qweight) if zeros is None else unpack_int4_asym(qweight)

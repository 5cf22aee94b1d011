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


# ---- kernel-native "mma" layout (cuda_mma backend) -------------------------------------------
# int32 [ceil(N/16), K/64, 128]: for each tile of 16 output rows (8 packed rows p = 8*tile + g)
# and each 64-k unit, the 512 bytes one warp of the cuda_mma kernel reads, lane-major
# (lane = 4*g + t, 16 bytes each). Lane (g, t) holds packed row p's bytes at unit offsets
# 8t..8t+7 and 32+8t..32+8t+7 as four words (j = 0..3 <-> offsets 8t, 8t+4, 32+8t, 32+8t+4);
# inside a word the 4 bytes k0 k1 k2 k3 are stored in the order k0 k2 k1 k3, which puts the
# nibbles in mma fragment order (e k0, o k0, e k2, o k2, e k1, o k1, e k3, o k3). Nibble values are
# the checkpoint's (two's complement q, or u - 8), so the conversion is a pure permutation of
# bytes (plus zero padding of the last tile), lossless both ways.
MMA_TILE_ROWS = 16
MMA_UNIT_K = 64
_BYTE_ORDER = (0, 2, 1, 3)


def is_mma_layout(qweight: torch.Tensor) -> bool:
    """True for the kernel-native layout (int32 [ceil(N/16), K/64, 128]), False for int8 [N/2, K]."""
    return qweight.dtype == torch.int32 and qweight.dim() == 3 and qweight.shape[-1] == 128


def to_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Checkpoint int8 [N/2, K] -> kernel-native int32 [ceil(N/16), K/64, 128] (K % 64 == 0)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(
            f"to_mma_layout expects int8 [N/2, K], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    p, k = qweight.shape
    if k % MMA_UNIT_K:
        raise ValueError(f"to_mma_layout needs K % {MMA_UNIT_K} == 0, got K={k}")
    tiles = -(-p // 8)
    b = qweight.view(torch.uint8)
    if tiles * 8 != p:
        b = torch.cat([b, b.new_zeros(tiles * 8 - p, k)])
    # [T, g, U, h, t, jj, i] with k_in_unit = 32h + 8t + 4jj + i
    b = b.reshape(tiles, 8, k // 64, 2, 4, 2, 4)
    b = b[..., list(_BYTE_ORDER)]
    b = b.permute(0, 2, 1, 4, 3, 5, 6)  # [T, U, g, t, h, jj, i]
    return b.contiguous().view(torch.int32).reshape(tiles, k // 64, 128)


def from_mma_layout(w: torch.Tensor, n: int) -> torch.Tensor:
    """Kernel-native int32 [ceil(N/16), K/64, 128] -> checkpoint int8 [N/2, K] for N output rows."""
    if not is_mma_layout(w):
        raise TypeError(
            f"from_mma_layout expects int32 [T, K/64, 128], got {w.dtype} {tuple(w.shape)}"
        )
    tiles, units = w.shape[0], w.shape[1]
    if n % 2 or -(-n // 16) != tiles:
        raise ValueError(f"from_mma_layout: N={n} does not match {tiles} tiles of 16 rows")
    b = w.contiguous().view(torch.uint8).reshape(tiles, units, 8, 4, 2, 2, 4)  # [T,U,g,t,h,jj,i]
    b = b[..., list(_BYTE_ORDER)]  # the order is its own inverse
    b = b.permute(0, 2, 1, 4, 3, 5, 6)  # [T, g, U, h, t, jj, i]
    b = b.reshape(tiles * 8, units * 64)[: n // 2]
    return b.contiguous().view(torch.int8)


# ---- Hopper "wgmma" layout (cutlass_w4 backend) ------------------------------------------------
# uint8 [N, K/2]: the nibbles of the int4 matrix [N, K] in the order the sm_90 mixed-input GEMM's
# warps hold them as wgmma A fragments. Atoms of 16 rows x 16 k (256 nibbles, 128 bytes) are
# stored with the row direction fastest (atom (i, j) at nibble 256 (i + j N/16)); inside an atom,
# element (r, c) sits at 32 (r % 8) + 8 ((c % 8) // 2) + 4 (c % 2) + 2 (c // 8) + r // 8: lane
# 4 (r % 8) + (c % 8) // 2 owns 8 consecutive nibbles (one 32-bit load), ordered 0,2,4,6,1,3,5,7
# by fragment value. Even nibble offsets are low nibbles. Values are the checkpoint's (two's
# complement q, or u - 8), so the conversion is a pure permutation, lossless both ways.
WGMMA_ATOM = 16


def is_wgmma_layout(qweight: torch.Tensor) -> bool:
    """True for the Hopper layout (uint8 [N, K/2], to_wgmma_layout)."""
    return qweight.dtype == torch.uint8 and qweight.dim() == 2


def _wgmma_view(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    # [N, K] -> (i, r1, r0, j, c2, c1, c0) with r = 8 r1 + r0, c = 8 c2 + 2 c1 + c0
    return t.reshape(n // 16, 2, 8, k // 16, 2, 4, 2)


_WGMMA_ORDER = (3, 0, 2, 5, 6, 4, 1)  # storage order, slowest first: j, i, r0, c1, c0, c2, r1


def to_wgmma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Checkpoint int8 [N/2, K] -> Hopper layout uint8 [N, K/2] (N % 16 == 0, K % 16 == 0)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(
            f"to_wgmma_layout expects int8 [N/2, K], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, k = qweight.shape[0] * 2, qweight.shape[1]
    if n % WGMMA_ATOM or k % WGMMA_ATOM:
        raise ValueError(f"to_wgmma_layout needs N and K multiples of 16, got N={n} K={k}")
    q = unpack_int4_rows(qweight)
    flat = _wgmma_view(q, n, k).permute(*_WGMMA_ORDER).reshape(-1, 2).to(torch.int16) & 0x0F
    return (flat[:, 0] | (flat[:, 1] << 4)).to(torch.uint8).reshape(n, k // 2)


def from_wgmma_layout(w: torch.Tensor) -> torch.Tensor:
    """Hopper layout uint8 [N, K/2] -> checkpoint int8 [N/2, K]; inverse of to_wgmma_layout."""
    if not is_wgmma_layout(w):
        raise TypeError(f"from_wgmma_layout expects uint8 [N, K/2], got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape[0], w.shape[1] * 2
    if n % WGMMA_ATOM or k % WGMMA_ATOM:
        raise ValueError(f"from_wgmma_layout needs N and K multiples of 16, got N={n} K={k}")
    b = w.contiguous().view(torch.int8).reshape(-1)
    nib = torch.stack([(b << 4) >> 4, b >> 4], dim=1).reshape(-1)  # sign-extended, storage order
    shape = [(n // 16, 2, 8, k // 16, 2, 4, 2)[d] for d in _WGMMA_ORDER]
    inv = [_WGMMA_ORDER.index(d) for d in range(7)]
    q = nib.reshape(shape).permute(*inv).reshape(n, k)
    return pack_int4_rows(q.contiguous())


def mma_layout_n(qweight: torch.Tensor, scales: torch.Tensor) -> int:
    """Output rows N of a W4 weight in any layout (the native ones need scales' row count)."""
    if is_mma_layout(qweight) or is_wgmma_layout(qweight):
        return scales.shape[0]
    return qweight.shape[0] * 2


def w4_to_checkpoint(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """qweight in any layout -> checkpoint int8 [N/2, K] (identity for the checkpoint layout)."""
    if is_mma_layout(qweight):
        return from_mma_layout(qweight, n)
    if is_wgmma_layout(qweight):
        return from_wgmma_layout(qweight)
    return qweight

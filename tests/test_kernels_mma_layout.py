"""CPU tests of the kernel-native W4 layout (packing.to_mma_layout) and of the cuda_mma kernel's
math, emulated in torch from the same lane/word/nibble mapping the CUDA source uses.

The emulation reads each lane's 32-bit words exactly as the kernel does (word j of lane (g, t)
covers k = 32*(j//2) + 8t + 4*(j%2) + 0..3 of its 64-k unit; nibble pairs taken with the masks
and shifts of Mma<T>::cvt, values RAW = base + (n ^ 8), fp16 odd rows at 16x), forms each group's
sum d = RAW . x and sum(x), applies d - (base + z) * sum(x) and the scale (1/16 folded in for the
fp16 odd rows), and must reproduce the fp64 reference: a wrong mask, shift, byte order or
correction constant fails it.
"""

from __future__ import annotations

import pytest
import torch
from quantlab.kernels import KernelArgumentError, linear_w4a16, packing, reference


def _w4(n: int, k: int, g: int, asym: bool, dtype: torch.dtype = torch.float16):
    scale = (torch.rand(n, k // g) * 0.02 + 0.005).to(dtype)
    if asym:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        zero = torch.randint(0, 16, (n, k // g), dtype=torch.uint8)
        return packing.w4_from_codes(codes, scale, zero)
    return packing.w4_from_codes(torch.randint(-8, 8, (n, k), dtype=torch.int8), scale)


# (N, K): odd tile counts, a partial last tile (N = 362: 181 packed rows), the smallest shapes.
SHAPES = [(362, 1152), (16, 64), (2, 128), (30, 192), (1216, 2304)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_lossless(shape) -> None:
    n, k = shape
    q = torch.randint(-128, 128, (n // 2, k), dtype=torch.int8)  # every byte value
    w = packing.to_mma_layout(q)
    assert w.dtype == torch.int32 and w.shape == (-(-n // 16), k // 64, 128)
    assert packing.is_mma_layout(w) and not packing.is_mma_layout(q)
    assert torch.equal(packing.from_mma_layout(w, n), q)
    assert torch.equal(packing.w4_to_checkpoint(w, n), q)
    assert packing.w4_to_checkpoint(q, n) is q


def test_converter_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="K % 64"):
        packing.to_mma_layout(torch.zeros(4, 96, dtype=torch.int8))
    with pytest.raises(TypeError):
        packing.to_mma_layout(torch.zeros(4, 64, dtype=torch.uint8))
    w = packing.to_mma_layout(torch.zeros(9, 64, dtype=torch.int8))  # N = 18: 2 tiles
    with pytest.raises(ValueError, match="tiles"):
        packing.from_mma_layout(w, 40)


def _lane_words(w: torch.Tensor) -> torch.Tensor:
    """int64 [T, U, 32 lanes, 4 words] of the native layout (little-endian 32-bit words)."""
    return w.reshape(w.shape[0], w.shape[1], 32, 4).to(torch.int64) & 0xFFFFFFFF


def test_lane_words_hold_the_fragment_nibbles() -> None:
    """Word j of lane (g, t) holds rows 2p, 2p+1 at k = 32(j//2) + 8t + 4(j%2) + i with the even
    row's k0..k3 at nibbles 0, 4, 2, 6 and the odd row's at 1, 5, 3, 7 (what the kernel's masks
    and shifts assume)."""
    n, k = 48, 192
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    words = _lane_words(packing.to_mma_layout(packing.pack_int4_rows(codes)))
    pos_e = (0, 4, 2, 6)
    for tile in range(words.shape[0]):
        for u in range(words.shape[1]):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                p = tile * 8 + g
                for j in range(4):
                    word = int(words[tile, u, lane, j])
                    kb = 64 * u + 32 * (j // 2) + 8 * t + 4 * (j % 2)
                    for i in range(4):
                        ne = (word >> (4 * pos_e[i])) & 15
                        no = (word >> (4 * pos_e[i] + 4)) & 15
                        assert ne - 16 * (ne >= 8) == int(codes[2 * p, kb + i])
                        assert no - 16 * (no >= 8) == int(codes[2 * p + 1, kb + i])


def _fragment_raw(words: torch.Tensor, fp16: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """RAW = base + (n ^ 8) (fp16 odd row: base + 16 (n ^ 8)) of fragment registers a0..a3, (low,
    high) half each, from 32-bit words (any shape) with Mma<T>::cvt's masks and shifts."""
    base, odd_mul = (1024.0, 16.0) if fp16 else (128.0, 1.0)
    if fp16:
        w2 = words >> 8
        regs = [
            words & 0x000F000F,  # a0: e k0 k1 at bits 0-3 / 16-19
            (words & 0x00F000F0) >> 4,  # a1: o k0 k1 (kernel keeps them at bits 4-7: x16)
            w2 & 0x000F000F,  # a2: e k2 k3
            (w2 & 0x00F000F0) >> 4,  # a3: o k2 k3
        ]
    else:
        regs = [(words >> s) & 0x000F000F for s in (0, 4, 8, 12)]
    raw = []
    for i, r in enumerate(regs):
        mul = odd_mul if i % 2 else 1.0
        lo = ((r & 0xF) ^ 8).double() * mul + base
        hi = (((r >> 16) & 0xF) ^ 8).double() * mul + base
        raw.append((lo, hi))
    return raw


def _group_math(
    x: torch.Tensor,
    dense: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
    odd_rows: torch.Tensor,
) -> torch.Tensor:
    """Per group: d = RAW . x and sum(x) (the all-ones mma), (d - (base + z) sum(x)) * scale, with
    the fp16 odd rows (bool [N]) at 16x and their scale divided by 16."""
    fp16 = x.dtype == torch.float16
    base, odd_mul = (1024.0, 16.0) if fp16 else (128.0, 1.0)
    n = dense.shape[0]
    xd = x.double()
    kk = xd.shape[1]
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    z = zeros.double() if zeros is not None else torch.full((n, kk // g), 8.0, dtype=torch.float64)
    mul = 1.0 + (odd_mul - 1.0) * odd_rows.double()  # 16 for fp16 odd rows
    for grp in range(kk // g):
        sl = slice(grp * g, (grp + 1) * g)
        d = xd[:, sl] @ dense[:, sl].t()  # [M, N]: the kernel's per-group mma sum
        sx = xd[:, sl].sum(1, keepdim=True)  # the all-ones mma
        corr = base + mul * z[:, grp]  # CE = base + z (even), base + 16 z (fp16 odd)
        s = scales[:, grp].double() / mul
        out += (d - sx * corr) * s
    return out


def emulate_cuda_mma(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
) -> torch.Tensor:
    """The cuda_mma kernel's arithmetic on the native layout, in float64 (x [M, K] fp16/bf16)."""
    n = scales.shape[0]
    words = _lane_words(w)  # [T, U, 32, 4]
    tiles, units = words.shape[:2]
    # RAW values per (tile, unit, lane, word j, fragment register a0..a3, half 0/1)
    raw = _fragment_raw(words, x.dtype == torch.float16)
    # dense RAW [N_pad, K]: a0 (e, k0 k1), a1 (o, k0 k1), a2 (e, k2 k3), a3 (o, k2 k3)
    dense = torch.zeros(tiles * 16, units * 64, dtype=torch.float64)
    for tile in range(tiles):
        for u in range(units):
            for lane in range(32):
                gg, t = lane // 4, lane % 4
                e, o = tile * 16 + 2 * gg, tile * 16 + 2 * gg + 1
                for j in range(4):
                    kb = 64 * u + 32 * (j // 2) + 8 * t + 4 * (j % 2)
                    for reg, row, k0 in ((0, e, kb), (1, o, kb), (2, e, kb + 2), (3, o, kb + 2)):
                        dense[row, k0] = raw[reg][0][tile, u, lane, j]
                        dense[row, k0 + 1] = raw[reg][1][tile, u, lane, j]
    return _group_math(x, dense[:n], scales, zeros, g, torch.arange(n) % 2 == 1)


def emulate_cuda_mma_hopper(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g: int,
) -> torch.Tensor:
    """The cuda_mma kernel's arithmetic on the Hopper layout (MODE 2), in float64: lane (gg, t)
    of atom (tile i, k16 step j) reads the little-endian word at byte 128 (i + j N/16) + 4 lane;
    its registers a0..a3 are rows 16i + gg (a0, a2) and 16i + gg + 8 (a1, a3) at k = 16j + 2t,
    + 1 (a0, a1) and 16j + 2t + 8, + 9 (a2, a3): the standard m16n8k16 A fragment."""
    n, k = w.shape[0], w.shape[1] * 2
    words = w.contiguous().view(torch.int32).reshape(k // 16, n // 16, 8, 4)  # [j, i, gg, t]
    raw = _fragment_raw(words.to(torch.int64) & 0xFFFFFFFF, x.dtype == torch.float16)
    dense = torch.zeros(n // 16, 16, k // 16, 16, dtype=torch.float64)  # [i, row, j, col]
    for gg in range(8):
        for t in range(4):
            for reg, row, col in ((0, gg, 2 * t), (1, gg + 8, 2 * t), (2, gg, 2 * t + 8),
                                  (3, gg + 8, 2 * t + 8)):  # fmt: skip
                dense[:, row, :, col] = raw[reg][0][:, :, gg, t].t()
                dense[:, row, :, col + 1] = raw[reg][1][:, :, gg, t].t()
    odd = torch.arange(n) % 16 >= 8  # the lane's second row: 8 rows down
    return _group_math(x, dense.reshape(n, k), scales, zeros, g, odd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_kernel_math_emulation_matches_fp64(dtype: torch.dtype, g: int, asym: bool) -> None:
    n, k = 34, 256  # 3 tiles, the last one partial
    qw, s, z = _w4(n, k, g, asym, dtype)
    x = torch.randn(3, k).to(dtype)
    y = emulate_cuda_mma(x, packing.to_mma_layout(qw), s, z, g)
    ref = reference.ref_linear_w4a16(x, qw, s, z, g, None, torch.float64)
    assert float((y - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_hopper_kernel_math_emulation_matches_fp64(dtype: torch.dtype, g: int, asym: bool) -> None:
    """cuda_mma's MODE 2 reads the Hopper layout's lane words with the native layout's masks and
    shifts: the emulation of that reading reproduces the fp64 reference."""
    n, k = 48, 256  # 3 row tiles, 16 k16 steps
    qw, s, z = _w4(n, k, g, asym, dtype)
    x = torch.randn(3, k).to(dtype)
    y = emulate_cuda_mma_hopper(x, packing.to_wgmma_layout(qw), s, z, g)
    ref = reference.ref_linear_w4a16(x, qw, s, z, g, None, torch.float64)
    assert float((y - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sz_offset_subtraction_is_exact(dtype: torch.dtype) -> None:
    """The symmetric-only SZ kernels subtract base + 8 (fp16 odd rows: base + 16 * 8) from each
    converted register in x's dtype: for every nibble the difference is exactly q (16 q), so the
    group sums need no sum(x) correction. The constants are the ones in the source."""
    from quantlab.kernels.cuda_mma import SOURCE

    assert "Mma<T>::pack(Mma<T>::kBase + 8.f, Mma<T>::kBase + 8.f)" in SOURCE
    assert "Mma<T>::kBase + 8.f * Mma<T>::kOddMul" in SOURCE
    fp16 = dtype == torch.float16
    base, odd_mul = (1024.0, 16.0) if fp16 else (128.0, 1.0)
    nib = torch.arange(16)
    q = (nib - 16 * (nib >= 8)).double()  # the stored two's complement code
    for mul in (1.0, odd_mul):
        raw = (base + mul * (nib ^ 8).double()).to(dtype)  # what cvt builds (exact: checked)
        assert torch.equal(raw.double(), base + mul * (nib ^ 8).double())
        diff = raw - torch.tensor(base + 8.0 * mul, dtype=dtype)  # the packed subtract
        assert torch.equal(diff.double(), mul * q), (dtype, mul)


def test_native_layout_through_dispatch_on_cpu() -> None:
    """linear_w4a16 takes the native layout (N from scales) on every CPU path: same results as the
    checkpoint layout, batch dims, bias, opcheck of the custom op, torch.compile."""
    n, k, g = 362, 1152, 64
    qw, s, z = _w4(n, k, g, True)
    qn = packing.to_mma_layout(qw)
    x = torch.randn(2, 3, k).half()
    bias = torch.randn(n).half()
    for backend in ("auto", "reference"):
        y = linear_w4a16(x, qn, s, z, g, bias, backend=backend)
        assert y.shape == (2, 3, n)
        assert torch.equal(y, linear_w4a16(x, qw, s, z, g, bias, backend=backend))
    from quantlab.kernels.ops import _linear_w4a16_op

    torch.library.opcheck(_linear_w4a16_op, (x[0], qn, s, z, g, None, "reference"))
    f = torch.compile(lambda t: linear_w4a16(t, qn, s, z, g), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), linear_w4a16(x, qw, s, z, g))


def test_native_layout_argument_errors() -> None:
    n, k, g = 48, 128, 64
    qw, s, _ = _w4(n, k, g, False)
    qn = packing.to_mma_layout(qw)
    x = torch.randn(1, k).half()
    with pytest.raises(KernelArgumentError, match="does not hold"):
        linear_w4a16(x, qn, torch.ones(80, 2).half(), None, g)
    with pytest.raises(KernelArgumentError, match="cuda_gemv"):
        linear_w4a16(x, qn, s, None, g, backend="cuda_gemv")
    with pytest.raises(KernelArgumentError, match="cuda_mma"):
        linear_w4a16(x, qn, s, None, g, backend="cuda_mma")  # CPU tensors
    with pytest.raises(KernelArgumentError, match="K="):
        linear_w4a16(torch.randn(1, 64).half(), qn, s, None, g)


# ---- Hopper layout (packing.to_wgmma_layout, read by the cutlass_w4 kernel) ----------------------


def _wgmma_offset(r: int, c: int, n: int) -> int:
    """Nibble offset of element (r, c) as docs/kernels.md and the CUDA ShuffleAtom state it."""
    atom = 32 * (r % 8) + 8 * ((c % 8) // 2) + 4 * (c % 2) + 2 * ((c % 16) // 8) + (r % 16) // 8
    return atom + 256 * (r // 16 + (n // 16) * (c // 16))


@pytest.mark.parametrize("shape", [(16, 16), (48, 96), (1216, 1152)])
def test_wgmma_layout_round_trip_and_offsets(shape) -> None:
    n, k = shape
    q = torch.randint(-128, 128, (n // 2, k), dtype=torch.int8)  # every byte value
    w = packing.to_wgmma_layout(q)
    assert w.dtype == torch.uint8 and w.shape == (n, k // 2)
    assert packing.is_wgmma_layout(w) and not packing.is_wgmma_layout(q)
    assert not packing.is_mma_layout(w)
    assert torch.equal(packing.from_wgmma_layout(w), q)
    assert torch.equal(packing.w4_to_checkpoint(w, n), q)
    codes = packing.unpack_int4_rows(q)
    b = w.view(torch.int8).reshape(-1)
    nib = torch.stack([(b << 4) >> 4, b >> 4], dim=1).reshape(-1)  # low nibble = even offset
    g = torch.Generator().manual_seed(n)
    rows, cols = (
        torch.randint(0, n, (4000,), generator=g),
        torch.randint(0, k, (4000,), generator=g),
    )
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        assert int(nib[_wgmma_offset(r, c, n)]) == int(codes[r, c]), (r, c)


def test_wgmma_layout_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        packing.to_wgmma_layout(torch.zeros(9, 64, dtype=torch.int8))  # N = 18
    with pytest.raises(ValueError, match="multiples of 16"):
        packing.to_wgmma_layout(torch.zeros(8, 40, dtype=torch.int8))  # K = 40
    with pytest.raises(TypeError):
        packing.to_wgmma_layout(torch.zeros(8, 64, dtype=torch.uint8))
    with pytest.raises(TypeError):
        packing.from_wgmma_layout(torch.zeros(8, 64, dtype=torch.int8))


def test_wgmma_layout_through_dispatch_on_cpu() -> None:
    """On CPU every path converts the Hopper layout back: same results as the checkpoint layout;
    the forced CUDA kernels refuse CPU tensors with a reason."""
    n, k, g = 48, 256, 64
    qw, s, z = _w4(n, k, g, True)
    qh = packing.to_wgmma_layout(qw)
    x = torch.randn(2, 3, k).half()
    for backend in ("auto", "reference"):
        y = linear_w4a16(x, qh, s, z, g, backend=backend)
        assert y.shape == (2, 3, n)
        assert torch.equal(y, linear_w4a16(x, qw, s, z, g, backend=backend))
    with pytest.raises(KernelArgumentError, match="'cutlass' needs CUDA"):
        linear_w4a16(x, qh, s, z, g, backend="cutlass")
    with pytest.raises(KernelArgumentError, match="'cuda_mma' needs CUDA"):
        linear_w4a16(x, qh, s, z, g, backend="cuda_mma")
    with pytest.raises(KernelArgumentError, match="Hopper-layout qweight"):
        linear_w4a16(x, qh, torch.ones(32, k // g).half(), None, g)


def test_hopper_plans_fit_shared_memory() -> None:
    """On the Hopper layout cuda_mma offers MT <= 4 plans whose ring (weights + x) fits in shared
    memory; the other layouts keep every plan (MT 8 past M = 32)."""
    from quantlab.kernels import cuda_mma

    for m in (1, 8, 16, 32, 64, 300):
        plans = cuda_mma.candidates(m, hopper=True)
        assert plans, m
        for p in plans:
            ring = p.get("KS") * p.get("ST") * (p.get("RT") * 512 + p.get("MT") * 1024)
            assert p.get("MT") <= 4 and ring <= cuda_mma.SMEM_LIMIT, (m, str(p))
    assert cuda_mma.candidates(1, hopper=True) == cuda_mma.candidates(1)
    assert {p.get("MT") for p in cuda_mma.candidates(64)} == {4, 8}
    assert len(cuda_mma.candidates(32, hopper=True)) < len(cuda_mma.candidates(32))
    # built once per M bucket: equal for M in one bucket, and each call gets its own list
    a, b = cuda_mma.candidates(5, sym=True), cuda_mma.candidates(7, sym=True)
    assert a == b and a is not b
    a.clear()
    assert cuda_mma.candidates(5, sym=True) == b


def test_w4_plans_match_the_compiled_tiles() -> None:
    """Every W4 plan cuda_mma offers is compiled (QL_MMA_TILES in the source), WN divides KS, and
    tiles of >= 8 (m-tile, row-tile) pairs (the 256-thread launch bound) use at most 8 warps."""
    import re

    from quantlab.kernels import cuda_mma
    from quantlab.kernels.cuda_mma import SOURCE

    start = SOURCE.index("#define QL_MMA_TILES")
    table = SOURCE[start : SOURCE.index("#endif", start)]
    compiled = {tuple(int(v) for v in t) for t in re.findall(r"QL_T\((\d+), (\d+), (\d+)\)", table)}
    assert compiled == set(cuda_mma.TILES)
    assert "big_tile(MT, RT) ? 256 : 512" in SOURCE and "mt * rt >= 8" in SOURCE
    for m in (1, 16, 32, 64):
        for hopper in (False, True):
            for p in cuda_mma.candidates(m, hopper):
                mt, rt, ks, wn = (p.get(k) for k in ("MT", "RT", "KS", "WN"))
                assert ks % wn == 0, str(p)
                if mt >= 8 or mt * rt >= 8:
                    assert ks <= 8, str(p)
    assert any(p.get("RT") == 4 for p in cuda_mma.candidates(16, hopper=True))
    # sym adds one SZ=1 twin per MT < 8 plan; never with zero points
    for m, hopper in ((1, True), (16, True), (64, False)):
        plain = cuda_mma.candidates(m, hopper)
        both = cuda_mma.candidates(m, hopper, sym=True)
        assert all("SZ" not in dict(p.cfg) for p in plain)
        twins = [p for p in both if dict(p.cfg).get("SZ") == 1]
        assert len(twins) == sum(p.get("MT") < 8 for p in plain) and both[: len(plain)] == plain


def _byte_perm(x: int, y: int, sel: int) -> int:
    """CUDA __byte_perm for selectors without the sign-replicate bit: byte i of the result is byte
    (sel >> 4i) & 7 of the 8 bytes {y, x} (x = bytes 0-3)."""
    src = x.to_bytes(4, "little") + y.to_bytes(4, "little")
    return int.from_bytes(bytes(src[(sel >> (4 * i)) & 7] for i in range(4)), "little")


def _w8_cvt_source(dtype: str) -> str:
    from quantlab.kernels.cuda_mma import SOURCE

    start = SOURCE.index(f"struct W8Cvt<{dtype}> {{")
    return SOURCE[start : SOURCE.index("\n};", start)]


def test_w8_int8_conversion_in_the_source_is_exact() -> None:
    """The W8 kernel's int8 -> fp16/bf16 steps, with the constants read from the CUDA source and
    emulated bit by bit, give the exact integer q for all 256 byte values, in the byte order the
    mma fragment expects (lo = bytes 0, 1; hi = bytes 2, 3)."""
    import re

    import numpy as np

    hx = r"0x([0-9A-Fa-f]+)u?"
    src16, src_bf = _w8_cvt_source("__half"), _w8_cvt_source("__nv_bfloat16")
    flip = int(re.search(r"w \^ " + hx, src16).group(1), 16)
    assert flip == int(re.search(r"w \^ " + hx, src_bf).group(1), 16)
    perms16 = [
        (int(a, 16), int(b, 16)) for a, b in re.findall(rf"__byte_perm\(u, {hx}, {hx}\)", src16)
    ]
    sub16 = {int(v, 16) for v in re.findall(rf"sub2\(__byte_perm\([^)]*\), {hx}\)", src16)}
    magic_bf, sel_bf = (
        int(v, 16) for v in re.search(rf"__byte_perm\(u, {hx}, {hx} \+ i\)", src_bf).groups()
    )
    bias_bf = float(re.search(r"\) -\s*([0-9.]+)f\)", src_bf).group(1))
    pack_bf = int(re.search(rf"__byte_perm\(f\[0\], f\[1\], {hx}\)", src_bf).group(1), 16)
    assert len(perms16) == 2 and len(sub16) == 1
    sub = np.array([sub16.pop()], dtype=np.uint32).view(np.float16)

    rng = np.random.default_rng(0)
    words = [b | (b << 8) | (b << 16) | (b << 24) for b in range(256)]  # every byte, all positions
    words += [int(v) for v in rng.integers(0, 2**32, size=2000, dtype=np.uint64)]
    for w in words:
        q = np.frombuffer(w.to_bytes(4, "little"), dtype=np.int8).astype(np.float64)
        u = w ^ flip
        # fp16: two PRMTs to (1024 + u) pairs, then one packed subtract
        lo, hi = (_byte_perm(u, magic, sel) for magic, sel in perms16)
        got16 = [np.array([v], dtype=np.uint32).view(np.float16) - sub for v in (lo, hi)]
        assert np.array_equal(np.concatenate(got16).astype(np.float64), q), hex(w)
        # bf16: four fp32 values 2^23 + u - (2^23 + 128), then the high halves of each pair
        f = [
            np.float32(
                np.array([_byte_perm(u, magic_bf, sel_bf + i)], np.uint32).view(np.float32)[0]
            )
            - np.float32(bias_bf)
            for i in range(4)
        ]
        fb = [int(np.array([v], np.float32).view(np.uint32)[0]) for v in f]
        pairs = [_byte_perm(fb[0], fb[1], pack_bf), _byte_perm(fb[2], fb[3], pack_bf)]
        halves = np.array(pairs, dtype=np.uint32).view(np.uint16).astype(np.uint32) << 16
        assert np.array_equal(halves.view(np.float32).astype(np.float64), q), hex(w)


def test_w8_plans_match_the_compiled_tiles() -> None:
    """Every W8 plan cuda_mma offers is compiled (QL_W8_TILES in the source), launchable (WN divides
    KS) and fits shared memory; MT covers M; cutlass_w8 offers its three tilings per dtype."""
    import re

    from quantlab.kernels import cuda_mma, cutlass_w8
    from quantlab.kernels.cuda_mma import SOURCE

    table = SOURCE[
        SOURCE.index("#define QL_W8_TILES") : SOURCE.index(
            "#endif", SOURCE.index("#define QL_W8_TILES")
        )
    ]
    compiled = {tuple(int(v) for v in t) for t in re.findall(r"QL_T\((\d+), (\d+), (\d+)\)", table)}
    assert compiled == set(cuda_mma.W8_TILES)
    for m in (1, 8, 9, 16, 17, 32, 40):
        plans = cuda_mma.w8_candidates(m)
        assert plans, m
        for p in plans:
            mt, rt, st, ks, wn = (p.get(k) for k in ("MT", "RT", "ST", "KS", "WN"))
            assert (mt, rt, st) in compiled and ks % wn == 0, str(p)
            assert ks * st * (rt + mt) * 1024 <= cuda_mma.SMEM_LIMIT, str(p)
            assert 8 * mt >= min(m, 32), (m, str(p))
    assert {p.get("MT") for p in cuda_mma.w8_candidates(40)} == {4}
    for dt in (torch.float16, torch.bfloat16):
        assert [p.get("TM") for p in cutlass_w8.candidates(dt, 4096)] == [64, 128, 256]
        assert [p.get("TM") for p in cutlass_w8.candidates(dt, 64)] == [64]
    assert (
        len(
            {
                p.get("ID")
                for dt in (torch.float16, torch.bfloat16)
                for p in cutlass_w8.candidates(dt, 4096)
            }
        )
        == 6
    )


def test_cutlass_w4_plans_follow_the_config_table() -> None:
    """cutlass_w4 offers, per dtype and zero mode, exactly the compiled configurations whose k step
    divides the group size and whose activation tile fits the M bucket (at least one at every M
    and G 64/128); the C++ switch lists every configuration once with its tiling."""
    import re

    from quantlab.kernels import cutlass_w4
    from quantlab.kernels._cutlass_w4_src import CONFIGS, SOURCE

    cases = re.findall(r"X\((\d+), (\w+), (\w+), (\d+), (\d+), (\w+), (\w+), (\w+), (\d+), (\d+)\)",
                       SOURCE)  # fmt: skip
    assert [int(c[0]) for c in cases] == list(range(len(CONFIGS)))
    for case, cfg in zip(cases, CONFIGS, strict=True):
        assert (case[1], case[2] == "true") == (cfg["dtype"], cfg["zero"])
        assert tuple(int(v) for v in (case[3], case[4], case[8], case[9])) == (
            cfg["tile_n"], cfg["tile_m"], cfg["cluster"], cfg["tile_k"])  # fmt: skip
        assert (case[5] == "Ping") == (cfg["sched"] == "pingpong")
        assert (case[7] == "StreamK") == (cfg["sched"] == "streamk")
    for dt in (torch.float16, torch.bfloat16):
        for asym in (False, True):
            for g in (64, 128):
                for m in (1, 64, 100, 256, 4096):
                    plans = cutlass_w4.candidates(dt, asym, m, g)
                    assert plans, (dt, asym, g, m)
                    for p in plans:
                        c = CONFIGS[p.get("ID")]
                        assert g % c["tile_k"] == 0 and c["zero"] == asym
                        assert c["tile_m"] <= max(64, cutlass_w4.m_bucket(m))
                        cfg = dict(p.cfg)
                        assert cfg.get("TK", 64) == c["tile_k"] and cfg.get("CL", 1) == c["cluster"]
    big_plans = cutlass_w4.candidates(torch.bfloat16, False, 4096, 128)
    big = {p.get("ID") for p in big_plans}
    assert big == {c["id"] for c in CONFIGS if c["dtype"] == "bf16" and not c["zero"]}
    assert len(set(big_plans)) == len(big_plans)
    for p in big_plans:  # decomposition variants only where the scheduler reads them
        cfg = dict(p.cfg)
        if "DM" in cfg:
            assert CONFIGS[cfg["ID"]]["sched"] == "streamk"
            assert cfg["DM"] in (2, 3) and (cfg["DM"] == 3) == ("SP" not in cfg)

"""Formats and reference primitives: exact round trips, edge cases, clear errors."""

from __future__ import annotations

import pytest
import torch

from quantlab.errors import InputError
from quantlab.formats import PRESETS, QuantFormat, preset
from quantlab.primitives import (
    NonFiniteError,
    compute_qparams,
    dequantize,
    fake_quant,
    pack_int4_rows,
    quantize,
    sqnr,
    unpack_int4_rows,
)

WEIGHT_PRESETS = [k for k, f in PRESETS.items() if f.granularity != "token"]


def _w(seed: int = 0, n: int = 24, k: int = 384) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("name", WEIGHT_PRESETS)
def test_codes_round_trip_exactly(name: str) -> None:
    fmt = PRESETS[name]
    w = _w()
    scale, zero = compute_qparams(w, fmt)
    q = quantize(w, scale, zero, fmt)
    d = dequantize(q, scale, zero, fmt)
    q2 = quantize(d, scale, zero, fmt)
    # Re-quantizing the dequantized values gives back the very same codes.
    if fmt.dtype == "fp8_e4m3":
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    else:
        assert torch.equal(q, q2)
        qmin, qmax = fmt.qrange()
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # Error bounded by half a step (integer) / fp8's relative precision.
    if fmt.is_int:
        step = (
            scale
            if fmt.granularity != "group"
            else scale.repeat_interleave(fmt.group_size or 1, dim=1)
        )
        step = step.reshape(-1, 1) if fmt.granularity == "channel" else step
        assert bool(((w - d).abs() <= step * 0.5 + 1e-7).all())
    else:
        # e4m3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 relative (normals)
        # or half the 2^-9 subnormal step.
        sc = scale.reshape(-1, 1) if fmt.granularity == "channel" else scale
        assert bool(((w - d).abs() <= (w.abs() * 2**-4 + sc * 2**-10) * (1 + 1e-6)).all())


def test_precision_orders_as_expected() -> None:
    w = _w(1)
    s = {
        n: sqnr(w, fake_quant(w, preset(n)))
        for n in ("int8_channel", "fp8_tensor", "int4_g32_asym", "int4_g64_sym", "int4_channel")
    }
    assert s["int8_channel"] > s["fp8_tensor"] > s["int4_g32_asym"] > s["int4_channel"]
    assert s["int4_g64_sym"] > s["int4_channel"]
    assert s["int8_channel"] > 38.0  # ~6 dB per bit: 8 bits of a Gaussian
    assert 14.0 < s["int4_g64_sym"] < 25.0


def test_all_zero_groups_quantize_to_zero() -> None:
    w = _w(2, 8, 128)
    w[3] = 0.0
    w[5, 64:] = 0.0
    for name in ("int4_g64_sym", "int4_g64_asym", "int8_channel", "fp8_channel", "fp8_tensor"):
        fmt = preset(name)
        s, z = compute_qparams(w, fmt)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
        d = dequantize(quantize(w, s, z, fmt), s, z, fmt)
        assert bool((d[3] == 0).all()) and bool((d[5, 64:] == 0).all())
    zeros = torch.zeros(4, 64)
    assert torch.equal(fake_quant(zeros, preset("int4_g32_asym")), zeros)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected_with_clear_error(bad: float) -> None:
    w = _w(3)
    w[1, 7] = bad
    with pytest.raises(NonFiniteError, match=r"layer\.weight holds 1 inf/NaN"):
        compute_qparams(w, preset("int4_g64_sym"), "layer.weight")


def test_group_must_divide() -> None:
    with pytest.raises(ValueError, match="group size 64 does not divide"):
        compute_qparams(torch.randn(4, 96), preset("int4_g64_sym"))


def test_asymmetric_keeps_zero_exact_and_uses_uint8() -> None:
    w = torch.rand(6, 64) + 0.5  # all positive: zero point must still make 0 representable
    fmt = preset("int4_g32_asym")
    s, z = compute_qparams(w, fmt)
    assert z is not None and z.dtype == torch.uint8
    q = quantize(w, s, z, fmt)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(dequantize(z.repeat_interleave(32, 1), s, z, fmt), torch.zeros(6, 64))


def test_scale_methods() -> None:
    w = _w(4)
    base = QuantFormat("int4", "group", 64)
    errs = {}
    for m in ("absmax", "half_step", "full_range"):
        f = QuantFormat("int4", "group", 64, True, m)
        s, _ = compute_qparams(w, f)
        q = quantize(w, s, None, f)
        errs[m] = sqnr(w, dequantize(q, s, None, f))
        if m == "full_range":  # never clips: both ends reachable, nothing beyond
            assert int(q.min()) >= -8 and int(q.max()) <= 7
    # Finer grids than amax/7 win on Gaussian weights.
    assert errs["half_step"] > errs["absmax"] and errs["full_range"] > errs["absmax"]
    assert base.scale_method == "absmax"


def test_scale_dtype_rounding_is_exact_in_fp16() -> None:
    w = _w(5)
    fmt = preset("int4_g64_asym")
    s, z = compute_qparams(w, fmt, scale_dtype=torch.float16)
    assert torch.equal(s.half().float(), s)
    assert z is not None
    d = dequantize(quantize(w, s, z, fmt), s, z, fmt)
    assert sqnr(w, d) > 15.0


def test_pack_unpack_int4_round_trip_and_layout() -> None:
    q = torch.randint(-8, 8, (10, 12), dtype=torch.int8)
    p = pack_int4_rows(q)
    assert p.shape == (5, 12) and p.dtype == torch.int8
    assert torch.equal(unpack_int4_rows(p), q)
    # Even row in the low nibble, odd row in the high nibble.
    b = p.view(torch.uint8).to(torch.int16)
    assert torch.equal((b & 0xF).to(torch.int8), (q[0::2].to(torch.int16) & 0xF).to(torch.int8))
    assert torch.equal((b >> 4).to(torch.int8), (q[1::2].to(torch.int16) & 0xF).to(torch.int8))
    with pytest.raises(ValueError, match="outside the int4 range"):
        pack_int4_rows(torch.full((2, 2), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="even row count"):
        pack_int4_rows(torch.zeros(3, 2, dtype=torch.int8))


def test_invalid_formats_and_presets() -> None:
    with pytest.raises(InputError, match="needs a positive group_size"):
        QuantFormat("int4", "group")
    with pytest.raises(InputError, match="always symmetric"):
        QuantFormat("fp8_e4m3", "tensor", symmetric=False)
    with pytest.raises(InputError, match=r"Valid presets: .*int4_g64_sym"):
        preset("int3")


def test_per_token_dynamic() -> None:
    x = torch.randn(3, 5, 64)
    x[1, 2] *= 100  # one outlier token must not hurt the others
    y = fake_quant(x, preset("int8_token"))
    assert y.shape == x.shape
    assert sqnr(x[0], y[0]) > 38.0

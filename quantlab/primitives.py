"""Reference quantization math in pure torch: the ground truth every kernel and exporter is tested against.

Shapes follow the weight convention W [N, K] (out_features, in_features):
  tensor  -> scale [1]
  channel -> scale [N]            (one per output row)
  group   -> scale [N, K // G]    (one per output row and group of G input columns)
  token   -> scale [..., 1]       (one per row of an activation [..., K]; computed on the fly)
Scales are dequantization scales (x ~= (q - zero) * scale), kept in float32.
"""

from __future__ import annotations

import torch

from quantlab.errors import QuantlabError
from quantlab.formats import FP8_E4M3_MAX, QuantFormat
from quantlab.kernels.packing import pack_int4_rows, unpack_int4_rows

__all__ = [
    "NonFiniteError",
    "amax",
    "compute_qparams",
    "dequantize",
    "fake_quant",
    "pack_int4_rows",
    "qparams_from_range",
    "quantize",
    "sqnr",
    "unpack_int4_rows",
]


class NonFiniteError(QuantlabError):
    """A tensor to be quantized holds inf or NaN."""


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise NonFiniteError if x [any shape] holds inf or NaN."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"{name} holds {n_bad} inf/NaN value(s) out of {x.numel()}; quantization scales would be "
            "meaningless. Check the model weights or the calibration data that produced it (an fp16 "
            "overflow is the usual cause: load the model in float32 or bfloat16)."
        )


def _grouped(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """View x as the reduction layout of fmt: channel/token -> [R, C], group -> [N, K/G, G], tensor -> [1, numel]."""
    if fmt.granularity == "tensor":
        return x.reshape(1, -1)
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        if x.dim() != 2 or x.shape[-1] % fmt.group_size:
            raise ValueError(
                f"group size {fmt.group_size} does not divide the input dimension of a tensor of shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], x.shape[1] // fmt.group_size, fmt.group_size)
    return x.reshape(-1, x.shape[-1])


def _scale_shape(x: torch.Tensor, fmt: QuantFormat) -> tuple[int, ...]:
    if fmt.granularity == "tensor":
        return (1,)
    if fmt.granularity == "channel":
        return (x.shape[0],)
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        return (x.shape[0], x.shape[1] // fmt.group_size)
    return (*x.shape[:-1], 1)


def amax(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Absolute maximum of x reduced at fmt's granularity (float32, scale-shaped)."""
    g = _grouped(x.detach(), fmt).float()
    return g.abs().amax(dim=-1).reshape(_scale_shape(x, fmt))


def _expand(t: torch.Tensor, x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Broadcast a scale-shaped tensor against x's reduction layout (see _grouped)."""
    if fmt.granularity == "tensor":
        return t.reshape(1, 1)
    if fmt.granularity == "group":
        return t.reshape(x.shape[0], -1, 1)
    return t.reshape(-1, 1)


def compute_qparams(
    x: torch.Tensor,
    fmt: QuantFormat,
    name: str = "tensor",
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32, scale-shaped) and zero point (uint8 or None) that cover x [N, K] at fmt.

    scale_dtype: the dtype a checkpoint will store the scale in; the scale is rounded to it first
    so that codes, checkpoint and reload agree bit for bit.
    """
    g = _grouped(x.detach(), fmt).float()
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    # amin/amax propagate NaN and inf, so checking the reduced values finds any bad element
    # at a fraction of a full isfinite pass over the tensor.
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        check_finite(x, name)
    shape = _scale_shape(x, fmt)
    return qparams_from_range(lo.reshape(shape), hi.reshape(shape), fmt, scale_dtype)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero (uint8 or None) covering [lo, hi] (scale-shaped float32; e.g. clipped ranges)."""
    lo, hi = lo.float(), hi.float()
    if fmt.dtype == "fp8_e4m3":
        scale = torch.maximum(-lo, hi) / FP8_E4M3_MAX
    elif fmt.symmetric:
        qmin, qmax = fmt.qrange()
        if fmt.scale_method == "absmax":
            scale = torch.maximum(-lo, hi) / qmax
        elif fmt.scale_method == "half_step":
            scale = torch.maximum(-lo, hi) / (qmax + 0.5)
        else:  # full_range: the negative end may use qmin = -(qmax + 1)
            scale = torch.maximum(-lo / -qmin, hi / qmax)
    else:
        # Asymmetric: the range always contains 0 so that 0 is exactly representable.
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        qmin, qmax = fmt.qrange()
        scale = (hi - lo) / (qmax - qmin)
    if scale_dtype != torch.float32:
        scale = scale.to(scale_dtype).float()
    # An all-zero row/group: any positive scale quantizes it exactly to 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt.dtype == "fp8_e4m3" or fmt.symmetric:
        return scale, None
    zero = torch.round(-lo / scale).clamp(qmin, qmax).to(torch.uint8)
    return scale, zero


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QuantFormat
) -> torch.Tensor:
    """Codes of x [N, K]: int8 (symmetric int4/int8), uint8 (asymmetric) or float8_e4m3fn, same shape as x."""
    g = _grouped(x, fmt).float()
    s = _expand(scale.float(), x, fmt)
    if fmt.dtype == "fp8_e4m3":
        q = (g / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return q.reshape(x.shape)
    qmin, qmax = fmt.qrange()
    q = torch.round(g / s)
    if zero is not None:
        q = q + _expand(zero.float(), x, fmt)
    q = q.clamp(qmin, qmax)
    dtype = torch.int8 if fmt.symmetric else torch.uint8
    return q.to(dtype).reshape(x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: QuantFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float values of codes q [N, K] as (q - zero) * scale, computed in float32 and cast to dtype."""
    g = _grouped(q, fmt).float()
    if zero is not None:
        g = g - _expand(zero.float(), q, fmt)
    return (g * _expand(scale.float(), q, fmt)).reshape(q.shape).to(dtype)


def fake_quant(x: torch.Tensor, fmt: QuantFormat, name: str = "tensor") -> torch.Tensor:
    """x [.., K] quantized and dequantized at fmt with scales computed from x itself; same dtype as x."""
    scale, zero = compute_qparams(x, fmt, name)
    return dequantize(quantize(x, scale, zero, fmt), scale, zero, fmt, x.dtype)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """x [..., K] quantized with a given per-tensor scale [1] (static activations); same dtype as x."""
    s = scale.float().reshape(())
    if fmt.dtype == "fp8_e4m3":
        q = (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    else:
        qmin, qmax = fmt.qrange()
        q = torch.round(x.float() / s).clamp(qmin, qmax)
    return (q * s).to(x.dtype)


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB of test against ref (any equal shapes)."""
    r = ref.double()
    noise = (r - test.double()).pow(2).sum()
    signal = r.pow(2).sum()
    if float(noise) == 0.0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))

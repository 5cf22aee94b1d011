"""QuantFormat: what a tensor is quantized to, as a frozen value, plus named presets for recipes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from quantlab.errors import InputError

DType = Literal["int4", "int8", "fp8_e4m3"]
Granularity = Literal["tensor", "channel", "group", "token"]

# Largest finite float8_e4m3fn value.
FP8_E4M3_MAX = 448.0

# How a symmetric integer scale is picked from the data.
#   absmax:     s = amax / qmax (the grid never reaches qmin = -qmax - 1)
#   half_step:  s = amax / (qmax + 0.5); +amax rounds to qmax + 1 and is clamped to qmax
#   full_range: s = max(-min / |qmin|, max / qmax); both ends of the grid used, nothing clipped
ScaleMethod = Literal["absmax", "half_step", "full_range"]


@dataclass(frozen=True)
class QuantFormat:
    """A number format and the granularity its scales are shared at."""

    dtype: DType
    granularity: Granularity
    group_size: int | None = None
    symmetric: bool = True
    scale_method: ScaleMethod = "absmax"

    def __post_init__(self) -> None:
        if self.granularity == "group":
            if self.group_size is None or self.group_size <= 0:
                raise InputError(
                    f"QuantFormat: group granularity needs a positive group_size, got {self.group_size}."
                )
        elif self.group_size is not None:
            raise InputError(
                f"QuantFormat: group_size is only meaningful with granularity 'group' (got {self.granularity})."
            )
        if self.dtype == "fp8_e4m3" and not self.symmetric:
            raise InputError("QuantFormat: fp8_e4m3 is always symmetric; remove symmetric: false.")
        if self.dtype == "fp8_e4m3" and self.granularity == "group":
            raise InputError(
                "QuantFormat: fp8_e4m3 supports tensor, channel and token granularity, not group."
            )

    @property
    def bits(self) -> int:
        """Storage bits per value."""
        return 4 if self.dtype == "int4" else 8

    @property
    def is_int(self) -> bool:
        """True for integer formats."""
        return self.dtype in ("int4", "int8")

    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the integer codes: signed for symmetric, unsigned for asymmetric."""
        if not self.is_int:
            raise ValueError("qrange is defined for integer formats only")
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantFormat:
        """Inverse of to_dict."""
        return cls(**d)

    def describe(self) -> str:
        """Short human label, e.g. 'int4 g64 asym'."""
        gran = f"g{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        sym = "" if self.dtype == "fp8_e4m3" else (" sym" if self.symmetric else " asym")
        return f"{self.dtype} {gran}{sym}"


def _presets() -> dict[str, QuantFormat]:
    p: dict[str, QuantFormat] = {
        "int8_channel": QuantFormat("int8", "channel"),
        "int8_tensor": QuantFormat("int8", "tensor"),
        "int8_token": QuantFormat("int8", "token"),
        "int4_channel": QuantFormat("int4", "channel"),
        "fp8_tensor": QuantFormat("fp8_e4m3", "tensor"),
        "fp8_channel": QuantFormat("fp8_e4m3", "channel"),
        "fp8_token": QuantFormat("fp8_e4m3", "token"),
    }
    for g in (32, 64, 128):
        p[f"int4_g{g}_sym"] = QuantFormat("int4", "group", g, True)
        p[f"int4_g{g}_asym"] = QuantFormat("int4", "group", g, False)
        p[f"int8_g{g}_sym"] = QuantFormat("int8", "group", g, True)
        p[f"int8_g{g}_asym"] = QuantFormat("int8", "group", g, False)
    return p


PRESETS: dict[str, QuantFormat] = _presets()


def preset(name: str) -> QuantFormat:
    """Look up a named preset; unknown names raise InputError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"Unknown quantization format preset '{name}'. Valid presets: {', '.join(sorted(PRESETS))}."
        ) from None

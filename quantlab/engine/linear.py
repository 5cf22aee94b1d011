"""Engine linears: one module per kind, each a thin call into quantlab.kernels (or an int8 GEMM)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.kernels import (
    bind_w4a16,
    linear_fp8,
    linear_w4a16,
    linear_w8a8,
    linear_w8a16,
    linear_w8a16_group,
)
from quantlab.kernels._tune import m_bucket
from quantlab.kernels.ops import W8G_BACKENDS
from quantlab.kernels.reference import ref_fp8_from_codes, ref_w8a8_from_codes

# W4A16 linears bind their kernel launch once per M bucket (kernels.bind_w4a16) instead of paying
# linear_w4a16's checks and plan lookup on every call; QUANTLAB_ENGINE_BIND=0 turns that off.
BIND = os.environ.get("QUANTLAB_ENGINE_BIND", "1") != "0"


class EngineLinear(nn.Module):
    """y [..., N] = x [..., K] @ W^T (+ b) for one engine linear; `kind` picks the kernel op.

    Tensors are buffers (the engine never trains). backend: the kernels' backend ("auto" picks the
    CUDA kernels on a GPU and the torch reference on CPU).
    """

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.kind: str = meta["kind"]
        self.meta = dict(meta)
        self.backend = "auto"
        self.bound: dict[tuple[int, torch.dtype, str], Callable[[torch.Tensor], torch.Tensor]] = {}
        for k, v in tensors.items():
            self.register_buffer(k, v)

    def _apply(self, fn: Any, recurse: bool = True) -> EngineLinear:
        """Module.to / .cuda / .half: bound launches hold the old tensors, so they are dropped."""
        self.bound.clear()
        return super()._apply(fn, recurse)

    def t(self, name: str) -> torch.Tensor | None:
        """A buffer by name, or None."""
        return self._buffers.get(name)

    @property
    def out_features(self) -> int:
        """N."""
        if self.kind == "w4a16":
            s = self.t("scales")
            assert s is not None
            return int(s.shape[0])
        w = self.t("weight") if self.kind in ("float", "fp8") else self.t("qweight")
        assert w is not None
        return int(w.shape[0])

    def static_input(self) -> str | None:
        """'int8' / 'fp8' when this linear quantizes its input with one static scale and nothing
        before it (no smoothing multiply): the norm before it may then write the codes."""
        if self.t("x_scale") is None or self.t("pre_quant_scale") is not None:
            return None
        if self.kind == "w8a8":
            return "int8"
        if self.kind == "fp8" and self.meta["granularity"] == "tensor":
            return "fp8"
        return None

    def forward_codes(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y [T, N] in dtype from the input already quantized at x_scale (static_input's dtype)."""
        b = self._buffers
        xs, bias = b["x_scale"], self.t("bias")
        assert xs is not None
        sx = xs.float().reshape(1, 1)
        gpu = codes.is_cuda and self.backend != "reference"
        if self.kind == "w8a8":
            args = (codes, sx, b["qweight"], b["weight_scale"], bias, dtype)
            if gpu:
                from quantlab.kernels.triton_w8a8 import w8a8_gemm_codes

                return w8a8_gemm_codes(*args)  # type: ignore[arg-type]
            return ref_w8a8_from_codes(*args)  # type: ignore[arg-type]
        args8 = (codes, sx, b["weight"], b["weight_scale"], bias)
        if gpu and torch.cuda.get_device_capability(codes.device) >= (8, 9):
            from quantlab.kernels.fp8 import fp8_mm_codes

            return fp8_mm_codes(*args8, "tensor", dtype)  # type: ignore[arg-type]
        return ref_fp8_from_codes(*args8, dtype)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] in x's dtype."""
        pre, bias = self.t("pre_quant_scale"), self.t("bias")
        b = self._buffers
        if self.kind == "w8a8":  # the smoothing multiply runs inside the quantization kernel
            return linear_w8a8(
                x,
                b["qweight"],  # type: ignore[arg-type]
                b["weight_scale"],  # type: ignore[arg-type]
                bias,
                self.t("x_scale"),
                pre,
                "reference" if self.backend == "reference" else "auto",
            )
        if pre is not None:
            x = x * pre
        if self.kind == "float":
            w = self._buffers["weight"]
            assert w is not None
            if w.dtype != x.dtype:  # CPU engines keep float32 copies of float weights
                return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(
                    x.dtype
                )
            return F.linear(x, w, bias)
        if self.kind == "w8a16":
            return linear_w8a16(x, b["qweight"], b["scales"], bias, self.backend)  # type: ignore[arg-type]
        if self.kind == "w8a16_group":
            return linear_w8a16_group(
                x,
                b["qweight"],  # type: ignore[arg-type]
                b["scales"],  # type: ignore[arg-type]
                self.t("zeros"),
                int(self.meta["group_size"]),
                bias,
                self.backend if self.backend in W8G_BACKENDS else "auto",
            )
        if self.kind == "w4a16":
            if BIND and not torch.compiler.is_compiling():
                return self._w4_bound(x)
            return linear_w4a16(
                x,
                b["qweight"],  # type: ignore[arg-type]
                b["scales"],  # type: ignore[arg-type]
                self.t("zeros"),
                int(self.meta["group_size"]),
                bias,
                self.backend,
            )
        if self.kind == "fp8":
            return linear_fp8(
                x,
                b["weight"],  # type: ignore[arg-type]
                b["weight_scale"],  # type: ignore[arg-type]
                bias,
                self.t("x_scale"),
                self.meta["granularity"],
                "auto" if self.backend not in ("reference", "scaled_mm") else self.backend,
            )
        raise AssertionError(self.kind)

    def _w4_bound(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] through this linear's bound W4A16 launch for x's M bucket (bound on first
        use; while a CUDA graph is captured, an unbound bucket takes the checked path instead)."""
        key = (m_bucket(x.numel() // x.shape[-1]), x.dtype, self.backend)
        fn = self.bound.get(key)
        b = self._buffers
        if fn is None:
            args = (b["qweight"], b["scales"], self.t("zeros"), int(self.meta["group_size"]))
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return linear_w4a16(x, *args, self.t("bias"), self.backend)  # type: ignore[arg-type]
            fn = bind_w4a16(x, *args, self.t("bias"), self.backend)  # type: ignore[arg-type]
            self.bound[key] = fn
        return fn(x)

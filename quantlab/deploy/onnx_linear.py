"""One engine linear (quantlab.engine.convert) -> ONNX nodes with explicit quantization.

Weights are stored transposed, [K, N], so every linear is `MatMul(x [.., K], W [K, N])`, the
pattern TensorRT fuses with the DequantizeLinear (DQ) in front of it:

- float: W in the compute dtype.
- w8a16: INT8 codes, DQ per output channel (axis 1, scale [N]).
- w8a16_group (W8A16_GPTQ): INT8 codes, blocked DQ (axis 0, block_size = group).
- w4a16: INT4 codes, blocked DQ (axis 0, block_size = group, scale [K/G, N]). With
  w4_gemm="plugin" the linear is one `quantlab::W4A16Gemm` node instead (see plugin.py).
- fp8: activations through QuantizeLinear/DQ pairs in FLOAT8E4M3FN with the checkpoint's static
  scale, weights DQ per tensor or per channel. Per-token activation scales have no constant
  Q/DQ form: they are computed in the graph (amax / 448) and applied by a saturating Cast.
- w8a8 (SmoothQuant): INT8 Q/DQ on the activations with the static scale (per-token: amax / 127,
  Round, Clip), INT8 weights with DQ per channel.
Asymmetric groups: TensorRT's DequantizeLinear refuses non-zero zero points, so
y = x @ DQ(q) - GroupSum(x) @ (zp * s), the second GEMM 1/G the size (see _zero_term).
Scales become the compute dtype (DequantizeLinear's output dtype is its scale's).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

from quantlab.deploy.graph import CUSTOM_DOMAIN, ONNX_FLOAT, GraphBuilder
from quantlab.errors import InputError
from quantlab.kernels.packing import ASYM_OFFSET, unpack_int4_rows

FP8_MAX = 448.0
W4_PLUGIN_OP = "W4A16Gemm"


def _np_dtype(dtype: torch.dtype) -> Any:
    return {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.bfloat16: ml_dtypes.bfloat16,
    }[dtype]


def _check_groups(name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    """InputError when the groups of a linear are not blocks a DequantizeLinear can express."""
    k, grp = int(t["qweight"].shape[-1]), int(meta["group_size"])
    if grp < 2 or k % grp or t["scales"].shape[-1] * grp != k:
        raise InputError(
            f"{name}: group size {grp} does not tile K = {k} into whole blocks "
            f"(scales {tuple(t['scales'].shape)}); ONNX/TensorRT blocked DequantizeLinear needs "
            "K divisible by the group size. Re-quantize with a group size that divides K."
        )


class LinearEmitter:
    """Writes engine linears into a GraphBuilder in compute dtype `dtype`."""

    def __init__(self, g: GraphBuilder, dtype: torch.dtype, w4_gemm: str = "native") -> None:
        self.g = g
        self.dtype = dtype
        self.w4_gemm = w4_gemm
        self.kinds: dict[str, int] = {}
        self._zp: torch.Tensor | None = None  # zero points [K/G, N] of the linear being written
        self.w4_configs: set[tuple[int, bool]] = set()  # (group size, zero points) of W4 linears

    def _t(self, name: str, t: torch.Tensor) -> str:
        return self.g.init(name, t.to(self.dtype))

    def __call__(self, x: str, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> str:
        """y = linear(x) for x [.., K] in the compute dtype; returns y's value name ([.., N])."""
        g, kind = self.g, meta["kind"]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if "pre_quant_scale" in t:
            x = g.op("Mul", [x, self._t(f"{name}.pre_quant_scale", t["pre_quant_scale"])])
        if kind == "float":
            w = self._t(f"{name}.weight", t["weight"].t())
        elif kind == "w8a16":
            codes = g.init(f"{name}.qweight", t["qweight"].t())
            s = self._t(f"{name}.scales", t["scales"].reshape(-1))
            w = g.op("DequantizeLinear", [codes, s], f"{name}.w", axis=1)
        elif kind in ("w8a16_group", "w4a16"):
            _check_groups(name, meta, t)
            if kind == "w4a16":
                self.w4_configs.add((int(meta["group_size"]), "zeros" in t))
            if kind == "w4a16" and self.w4_gemm == "plugin":
                return self._bias(self._w4_plugin(x, name, meta, t), name, t)
            w = (self._w8_groups if kind == "w8a16_group" else self._w4_dq)(name, meta, t)
            y = g.op("MatMul", [x, w], name)
            if self._zp is not None:
                y = g.op("Sub", [y, self._zero_term(x, name, meta, t["scales"].t())])
            return self._bias(y, name, t)
        elif kind == "fp8":
            x, w = self._fp8(x, name, meta, t)
        elif kind == "w8a8":
            x, w = self._w8a8(x, name, meta, t)
        else:  # pragma: no cover - convert_linear makes no other kind
            raise AssertionError(kind)
        return self._bias(g.op("MatMul", [x, w], name), name, t)

    def _bias(self, y: str, name: str, t: dict[str, torch.Tensor]) -> str:
        if "bias" not in t:
            return y
        return self.g.op("Add", [y, self._t(f"{name}.bias", t["bias"])])

    def _w4_codes(self, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(signed codes int8 [K, N], INT4 zero points int8 [K/G, N] or None)."""
        q = unpack_int4_rows(t["qweight"]).t()
        z = t.get("zeros")
        zp = None if z is None else (z.to(torch.int16) - ASYM_OFFSET).to(torch.int8).t()
        return q, zp

    def _w4_dq(self, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> str:
        g = self.g
        q, zp = self._w4_codes(t)
        self._zp = zp
        ins = [
            g.init(f"{name}.qweight", q, "int4"),
            self._t(f"{name}.scales", t["scales"].t()),
        ]
        return g.op(
            "DequantizeLinear", ins, f"{name}.w", axis=0, block_size=int(meta["group_size"])
        )

    def _w8_groups(self, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> str:
        """W8A16_GPTQ: INT8 codes [K, N], blocked DQ along K (scales [K/G, N])."""
        g = self.g
        z = t.get("zeros")
        self._zp = None if z is None else z.t()
        ins = [
            g.init(f"{name}.qweight", t["qweight"].t()),
            self._t(f"{name}.scales", t["scales"].t()),
        ]
        return g.op(
            "DequantizeLinear", ins, f"{name}.w", axis=0, block_size=int(meta["group_size"])
        )

    def _zero_term(self, x: str, name: str, meta: dict[str, Any], scales: torch.Tensor) -> str:
        """x @ Z for Z [K, N] = zp * s repeated over each group, as GroupSum(x) [.., K/G] @ (zp * s)
        [K/G, N] in float32: TensorRT's DequantizeLinear takes no zero point, so an asymmetric
        weight is DQ(codes) minus this term (exact: (q - zp) * s = q * s - zp * s)."""
        g, zp = self.g, self._zp
        assert zp is not None
        grp = int(meta["group_size"])
        m = g.init(f"{name}.zero_scale", (zp.float() * scales.float()).contiguous())
        xf = g.op("Cast", [x], f"{name}.xf", to=1)
        xg = g.op("Reshape", [xf, g.const([0, 0, -1, grp])])
        sums = g.op("ReduceSum", [xg, g.const([-1])], f"{name}.gsum", keepdims=0)
        corr = g.op("MatMul", [sums, m], f"{name}.zero_term")
        return g.op("Cast", [corr], to=ONNX_FLOAT[self.dtype])

    def _w4_plugin(
        self, x: str, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]
    ) -> str:
        """One quantlab::W4A16Gemm node over the kernels' own layout (see plugin.py)."""
        g = self.g
        ins = [x, g.init(f"{name}.qweight", t["qweight"]), self._t(f"{name}.scales", t["scales"])]
        if "zeros" in t:
            ins.append(g.init(f"{name}.zeros", t["zeros"].to(torch.uint8)))
        return g.op(
            W4_PLUGIN_OP,
            ins,
            name,
            domain=CUSTOM_DOMAIN,
            group_size=int(meta["group_size"]),
            has_zeros=int("zeros" in t),
            plugin_namespace=CUSTOM_DOMAIN,
            plugin_version="1",
        )

    def _fp8(
        self, x: str, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]
    ) -> tuple[str, str]:
        g = self.g
        w8 = g.init(f"{name}.weight", t["weight"].t())
        ws = t["weight_scale"].reshape(-1)
        if meta["granularity"] == "tensor":
            w = g.op(
                "DequantizeLinear",
                [w8, self._t(f"{name}.weight_scale", ws.reshape(()))],
                f"{name}.w",
            )
        else:
            sn = self._t(f"{name}.weight_scale", ws)
            w = g.op("DequantizeLinear", [w8, sn], f"{name}.w", axis=1)
        if "x_scale" in t:
            xs = self._t(f"{name}.x_scale", t["x_scale"].reshape(()))
            zero = g.scalar(0.0, ml_dtypes.float8_e4m3fn)
            xq = g.op("QuantizeLinear", [x, xs, zero], f"{name}.xq")
            return g.op("DequantizeLinear", [xq, xs], f"{name}.xdq"), w
        return self._dynamic(x, name, FP8_MAX, "fp8"), w

    def _w8a8(
        self, x: str, name: str, meta: dict[str, Any], t: dict[str, torch.Tensor]
    ) -> tuple[str, str]:
        g = self.g
        codes = g.init(f"{name}.qweight", t["qweight"].t())
        w = g.op(
            "DequantizeLinear",
            [codes, self._t(f"{name}.weight_scale", t["weight_scale"].reshape(-1))],
            f"{name}.w",
            axis=1,
        )
        if "x_scale" in t:
            xs = self._t(f"{name}.x_scale", t["x_scale"].reshape(()))
            xq = g.op("QuantizeLinear", [x, xs, g.scalar(0, np.int8)], f"{name}.xq")
            return g.op("DequantizeLinear", [xq, xs], f"{name}.xdq"), w
        return self._dynamic(x, name, 127.0, "int8"), w

    def _dynamic(self, x: str, name: str, qmax: float, fmt: str) -> str:
        """Per-token fake quantization of x [.., K]: s = amax / qmax per row (float32), codes, x'."""
        g = self.g
        xf = g.op("Cast", [x], f"{name}.xf", to=1)
        amax = g.op("ReduceMax", [g.op("Abs", [xf]), g.const([-1])], f"{name}.amax", keepdims=1)
        if fmt == "fp8":  # the reference's rule: amax * fp32(1/448), floor 1e-12, x * (1/s)
            s = g.op(
                "Max",
                [
                    g.op("Mul", [amax, g.scalar(1.0 / qmax, np.float32)]),
                    g.scalar(1e-12, np.float32),
                ],
            )
            r = g.op("Mul", [xf, g.op("Reciprocal", [s])])
            q = g.op("Cast", [r], f"{name}.xq", to=17, saturate=1)  # FLOAT8E4M3FN
            qf = g.op("Cast", [q], to=1)
        else:  # amax / 127 (1 where the row is all zero), round half to even, saturate
            s0 = g.op("Div", [amax, g.scalar(qmax, np.float32)])
            pos = g.op("Greater", [s0, g.scalar(0.0, np.float32)])
            s = g.op("Where", [pos, s0, g.scalar(1.0, np.float32)])
            r = g.op("Round", [g.op("Div", [xf, s])])
            qf = g.op(
                "Clip", [r, g.scalar(-128.0, np.float32), g.scalar(127.0, np.float32)], f"{name}.xq"
            )
        back = g.op("Mul", [qf, s])
        return g.op("Cast", [back], f"{name}.xdq", to=ONNX_FLOAT[self.dtype])

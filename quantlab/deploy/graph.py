"""A small ONNX graph builder: named values, initializers from torch tensors, one call per node.

Everything goes through onnx.helper / onnx.numpy_helper (no protobuf written by hand). Tensors keep
their exact values: int4 codes are stored as ONNX INT4, fp8 as FLOAT8E4M3FN, floats in the dtype
asked for.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

# Compute dtypes of a graph: torch dtype -> ONNX element type.
ONNX_FLOAT = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
}
OPSET = 21  # INT4 and blocked DequantizeLinear (block_size) arrive in opset 21
CUSTOM_DOMAIN = "quantlab"


def to_numpy(t: torch.Tensor, kind: str | None = None) -> np.ndarray:
    """numpy array of t with its exact values; kind "int4" / "uint4" stores int8 codes as 4-bit."""
    t = t.detach().cpu().contiguous()
    if kind in ("int4", "uint4"):
        return (
            t.to(torch.int8).numpy().astype(ml_dtypes.int4 if kind == "int4" else ml_dtypes.uint4)
        )
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs; `model()` returns the checked ModelProto."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict[tuple[Any, ...], str] = {}
        self.custom_ops: set[str] = set()

    def fresh(self, hint: str) -> str:
        """A new unique value name starting with hint."""
        self._count += 1
        return f"{hint}_{self._count}"

    def init(self, name: str, t: torch.Tensor | np.ndarray, kind: str | None = None) -> str:
        """Add an initializer (exact values) and return its name."""
        arr = t if isinstance(t, np.ndarray) else to_numpy(t, kind)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, values: list[int] | list[float], dtype: Any = np.int64) -> str:
        """A shared 1-D constant initializer (shapes, axes, split sizes, scalars)."""
        key = (tuple(values), np.dtype(dtype).name)
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.init(name, np.array(values, dtype=dtype))
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, value: float, dtype: Any) -> str:
        """A shared 0-d constant (np dtype or ml_dtypes)."""
        key = ("scalar", float(value), np.dtype(dtype).name)
        if key not in self._consts:
            name = f"scalar_{len(self._consts)}"
            self.init(name, np.array(value, dtype=dtype))
            self._consts[key] = name
        return self._consts[key]

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        outputs: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> Any:
        """Append a node; its output name (or list of names when outputs > 1)."""
        hint = hint or op_type.lower()
        outs = [self.fresh(hint) for _ in range(outputs)]
        node = helper.make_node(op_type, inputs, outs, name=self.fresh(f"n_{hint}"), **attrs)
        if domain:
            node.domain = domain
            self.custom_ops.add(f"{domain}::{op_type}")
        self.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    def rename(self, value: str, name: str) -> str:
        """Give value a public name (graph outputs) through an Identity node."""
        node = helper.make_node("Identity", [value], [name], name=self.fresh("n_out"))
        self.nodes.append(node)
        return name

    def input(self, name: str, elem: int, shape: list[str | int]) -> str:
        """Declare a graph input with symbolic dims."""
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[str | int]) -> None:
        """Declare a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, doc: str = "") -> onnx.ModelProto:
        """The ModelProto (opset 21 plus the quantlab domain when custom nodes were added)."""
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.inits, doc_string=doc
        )
        opsets = [helper.make_opsetid("", OPSET)]
        if self.custom_ops:
            opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="quantlab")
        m.ir_version = 10
        return m

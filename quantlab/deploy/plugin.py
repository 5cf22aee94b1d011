"""quantlab's W4A16 GEMM as a TensorRT plugin (IPluginV3), and its lowering to DQ + MatMul.

The ONNX node `quantlab::W4A16Gemm(x [.., K], qweight int8 [N/2, K], scales [N, K/G],
zeros uint8 [N, K/G]?)` carries the weight in the kernels' own layout (quantlab.kernels.packing:
two int4 rows per byte, scales N-major), so the plugin's enqueue hands the buffers to
`quantlab.kernels.linear_w4a16` unchanged. The TensorRT ONNX parser resolves the node through the
plugin registry (op type W4A16Gemm, namespace "quantlab", version "1").

What this is and is not: the plugin is a Python IPluginV3 (TensorRT's Python plugin bindings), so
an engine that contains it needs this module imported (register_w4_plugin) in the process that
deserializes it, and a CUDA device to run the Triton kernel. TensorRT-RTX 1.7 ships no
ahead-of-time plugin interface (IPluginV3QuickAOTBuild is absent from its bindings), so a
Python-free engine with the Triton kernel compiled in is not buildable with it; see docs/build.md.

`lower_plugins` rewrites every W4A16Gemm node back into INT4 blocked DequantizeLinear + MatMul,
reading the node's own inputs, so onnxruntime checks the numbers the plugin graph carries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from quantlab.deploy.graph import to_numpy
from quantlab.errors import InputError

PLUGIN_NAME = "W4A16Gemm"
PLUGIN_NAMESPACE = "quantlab"
PLUGIN_VERSION = "1"
_registered: set[str] = set()


class _CudaArray:
    """A raw device pointer seen by torch through __cuda_array_interface__ (no copy)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
        }


def _plugin_classes(trt: Any) -> tuple[type, type]:
    """(plugin class, creator class) bound to this TensorRT module's base classes."""
    typestr = {trt.DataType.HALF: "<f2", trt.DataType.INT8: "|i1", trt.DataType.UINT8: "|u1"}
    if hasattr(trt.DataType, "BF16"):
        typestr[trt.DataType.BF16] = "<V2"  # reinterpreted as bfloat16 below

    class W4A16Plugin(
        trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime
    ):
        def __init__(self, group_size: int = 128, has_zeros: int = 0, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.group_size = int(group_size)
            self.has_zeros = int(has_zeros)
            self.phase = phase
            self.timing_cache_id = f"w4a16_g{self.group_size}_z{self.has_zeros}"

        def get_capability_interface(self, type: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: Any, builder: Any) -> Any:
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = inputs[2][0]  # N: the scales' rows
            return [out]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            x_type = in_out[0].desc.type
            if pos == 0:
                return bool(x_type in (trt.DataType.HALF, getattr(trt.DataType, "BF16", None)))
            if pos == 1:
                return bool(desc.type == trt.DataType.INT8)
            if pos == 3 and self.has_zeros:
                return bool(desc.type == trt.DataType.UINT8)
            return bool(desc.type == x_type)  # scales and the output

        def configure_plugin(self, inp: Any, out: Any) -> None:
            return None

        def on_shape_change(self, inp: Any, out: Any) -> None:
            return None

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection(
                [
                    trt.PluginField(
                        "group_size",
                        np.array([self.group_size], np.int32),
                        trt.PluginFieldType.INT32,
                    ),
                    trt.PluginField(
                        "has_zeros", np.array([self.has_zeros], np.int32), trt.PluginFieldType.INT32
                    ),
                ]
            )

        def enqueue(
            self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, ws: Any, stream: int
        ) -> int:
            from quantlab.kernels import linear_w4a16

            def view(ptr: int, desc: Any) -> torch.Tensor:
                t = torch.as_tensor(
                    _CudaArray(ptr, tuple(desc.dims), typestr[desc.type]), device="cuda"
                )
                return t.view(torch.bfloat16) if typestr[desc.type] == "<V2" else t

            x = view(inputs[0], input_desc[0])
            q, s = view(inputs[1], input_desc[1]), view(inputs[2], input_desc[2])
            z = view(inputs[3], input_desc[3]) if self.has_zeros else None
            y = view(outputs[0], output_desc[0])
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                y.copy_(linear_w4a16(x, q, s, z, self.group_size))
            return 0

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def set_tactic(self, tactic: int) -> None:
            return None

        def clone(self) -> Any:
            return W4A16Plugin(self.group_size, self.has_zeros, self.phase)

    class W4A16Creator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField("group_size", np.array([]), trt.PluginFieldType.INT32),
                    trt.PluginField("has_zeros", np.array([]), trt.PluginFieldType.INT32),
                ]
            )

        def create_plugin(self, name: str, fc: Any, phase: Any) -> Any:
            f = {field.name: int(np.asarray(field.data).reshape(-1)[0]) for field in fc}
            return W4A16Plugin(f.get("group_size", 128), f.get("has_zeros", 0), phase)

    return W4A16Plugin, W4A16Creator


def plugin_blocker(trt: Any) -> str | None:
    """Why this TensorRT cannot host the Python plugin, or None when it can."""
    if not hasattr(trt.INetworkDefinition, "add_plugin_v3"):
        return (
            f"{trt.__name__} {trt.__version__} cannot host custom plugins: its network has no "
            "add_plugin_v3, and its ONNX parser aborts the process when it imports a registered "
            "Python plugin (measured with TensorRT-RTX 1.7.1)"
        )
    return None


def register_w4_plugin(builder: str | None = None) -> str:
    """Register the W4A16Gemm creator with the TensorRT plugin registry (once); its module name."""
    from quantlab.deploy.tensorrt import load_builder

    trt, name = load_builder(builder)
    blocker = plugin_blocker(trt)
    if blocker:
        raise InputError(blocker + "; build with --w4-gemm native.")
    if name in _registered:
        return name
    _, creator = _plugin_classes(trt)
    c = creator()
    if not trt.get_plugin_registry().register_creator(c, PLUGIN_NAMESPACE):
        raise InputError(
            f"{name} refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin creator; "
            "build with --w4-gemm native."
        )
    _registered.add(name)
    _keep.append(c)  # the registry holds a raw pointer: keep the Python object alive
    return name


_keep: list[Any] = []


def lower_plugins(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model with each W4A16Gemm node replaced by INT4 blocked DQ + MatMul (same math)."""
    from quantlab.kernels.packing import ASYM_OFFSET, unpack_int4_rows

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        if node.op_type != PLUGIN_NAME:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        packed = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        q = unpack_int4_rows(packed).t().contiguous()  # [K, N]
        qname, sname = node.input[1] + ".int4", node.input[2] + ".kn"
        scales = numpy_helper.to_array(inits[node.input[2]])
        new_inits = [
            numpy_helper.from_array(to_numpy(q, "int4"), qname),
            numpy_helper.from_array(np.ascontiguousarray(scales.T), sname),
        ]
        dq_in = [qname, sname]
        if int(attrs.get("has_zeros", 0)):
            z = torch.from_numpy(numpy_helper.to_array(inits[node.input[3]]).astype(np.int16))
            zname = node.input[3] + ".int4"
            zp = (z - ASYM_OFFSET).to(torch.int8).t().contiguous()
            new_inits.append(numpy_helper.from_array(to_numpy(zp, "int4"), zname))
            dq_in.append(zname)
        m.graph.initializer.extend(new_inits)
        w = node.output[0] + ".w"
        nodes.append(
            helper.make_node(
                "DequantizeLinear", dq_in, [w], axis=0, block_size=int(attrs["group_size"])
            )
        )
        nodes.append(helper.make_node("MatMul", [node.input[0], w], list(node.output)))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    opsets = [o for o in m.opset_import if o.domain != PLUGIN_NAMESPACE]
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    return m

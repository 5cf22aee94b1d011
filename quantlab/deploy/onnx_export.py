"""The quantized decoder as one ONNX graph, built from the TensorRT-LLM checkpoint quantlab writes.

Graph inputs: input_ids / position_ids int64 [batch, seq], attention_mask int64 [batch, total]
(total = past + seq; 1 = attend), and per layer past_key_values.{i}.key / .value
[batch, kv_heads, past, head_dim] in the KV-cache dtype (int8 / fp8 caches carry codes; the
layer's kv_cache_scaling_factor dequantizes them). Outputs: logits float32 [batch, seq, vocab] and
present.{i}.key / .value [batch, kv_heads, total, head_dim], the cache to feed back next step.

The math is the engine's (quantlab/engine/model.py): RMSNorm statistics in float32, rotary tables
in float32 cast to the compute dtype, softmax in float32, new K/V quantized before attention
reads them. Linears come from the same conversion the torch engine uses (engine/convert.py), so
both consumers read the checkpoint through one set of rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from quantlab.deploy.graph import ONNX_FLOAT, GraphBuilder
from quantlab.deploy.onnx_linear import LinearEmitter
from quantlab.engine.build import convert_layers, kv_scales
from quantlab.engine.checkpoint import Checkpoint
from quantlab.engine.model import rope_inv_freq

KV_ELEM = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}
KV_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MASK_VALUE = -1e9  # added to masked scores (float32), large enough that exp underflows to 0


@dataclass
class OnnxDecoder:
    """The exported graph and what a consumer needs to know about it."""

    model: onnx.ModelProto
    dtype: torch.dtype
    kv_storage: str
    num_layers: int
    linear_kinds: dict[str, int]
    custom_ops: list[str] = field(default_factory=list)
    w4_configs: list[tuple[int, bool]] = field(default_factory=list)  # (group, zero points)

    def kv_elem(self) -> int:
        """ONNX element type of the past/present tensors."""
        if self.kv_storage in KV_ELEM:
            return KV_ELEM[self.kv_storage]
        return ONNX_FLOAT[KV_FLOAT[self.kv_storage]]


def _by_linear(
    metas: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    out: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    for name, meta in metas.items():
        pre = name + "."
        out[name] = (meta, {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)})
    return out


class _Decoder:
    """Writes the decoder into a GraphBuilder; one method per block."""

    def __init__(
        self, ckpt: Checkpoint, dtype: torch.dtype, kv_storage: str, w4_gemm: str, positions: int
    ) -> None:
        self.positions = positions
        self.spec = ckpt.spec
        self.dtype = dtype
        self.elem = ONNX_FLOAT[dtype]
        self.kv = kv_storage
        self.g = GraphBuilder(f"quantlab_{self.spec.architecture}")
        self.lin = LinearEmitter(self.g, dtype, w4_gemm)
        metas, tensors = convert_layers(ckpt, "checkpoint", show_progress=False, int8_groups=True)
        self.linears = _by_linear(metas, tensors)
        self.tensors = tensors
        self.scales = kv_scales(ckpt, kv_storage)

    def cast(self, x: str, elem: int) -> str:
        return self.g.op("Cast", [x], to=elem)

    def rms_norm(self, x: str, weight: str) -> str:
        """HF RMSNorm: float32 statistics, weight applied in the compute dtype."""
        g = self.g
        xf = self.cast(x, onnx.TensorProto.FLOAT)
        ms = g.op("ReduceMean", [g.op("Mul", [xf, xf]), g.const([-1])], keepdims=1)
        eps = g.scalar(self.spec.norm_epsilon, np.float32)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps])])])
        return g.op(
            "Mul",
            [
                g.init(weight, self.tensors[weight].to(self.dtype)),
                self.cast(g.op("Mul", [xf, inv]), self.elem),
            ],
            "norm",
        )

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x [B, S, H, D] -> x * cos + rotate_half(x) * sin."""
        g = self.g
        half = self.spec.head_dim // 2
        a, b = g.op("Split", [x, g.const([half, half])], "half", outputs=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [b]), a], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])], "rope")

    def cache(self, i: int, which: str, new: str) -> tuple[str, str]:
        """(present [B, Hkv, T, D] in the KV dtype, its values in the compute dtype)."""
        g, s = self.g, self.spec
        past = g.input(
            f"past_key_values.{i}.{which}",
            self._kv_elem(),
            ["batch", s.num_kv_heads, "past", s.head_dim],
        )
        if self.scales is not None:
            sc = f"layers.{i}.kv_scale"  # one scale for K and V (kv_cache_scaling_factor)
            if which == "key":
                g.init(sc, torch.tensor(self.scales[i], dtype=self.dtype))
            zero = g.scalar(0, np.int8) if self.kv == "int8" else g.scalar(0.0, _fp8())
            code = g.op("QuantizeLinear", [new, sc, zero], f"{which}_q")
            if self.kv == "fp8":  # Concat has no float8 type: join in fp16 (exact for e4m3)
                f16, f8 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT8E4M3FN
                joined = g.op("Concat", [self.cast(past, f16), self.cast(code, f16)], axis=2)
                present = self.cast(joined, f8)
            else:
                present = g.op("Concat", [past, code], axis=2)
            values = g.op("DequantizeLinear", [present, sc], f"{which}_dq")
        else:
            kv_elem = self._kv_elem()
            present = g.op(
                "Concat", [past, new if kv_elem == self.elem else self.cast(new, kv_elem)], axis=2
            )
            values = present if kv_elem == self.elem else self.cast(present, self.elem)
        name = f"present.{i}.{which}"
        g.rename(present, name)
        g.output(name, self._kv_elem(), ["batch", s.num_kv_heads, "total", s.head_dim])
        return present, values

    def _kv_elem(self) -> int:
        if self.kv in KV_ELEM:
            return KV_ELEM[self.kv]
        return ONNX_FLOAT[KV_FLOAT[self.kv]]

    def attention(self, i: int, h: str, cos: str, sin: str, bias: str) -> str:
        """Self-attention of layer i over past + new tokens; [B, S, H * D]."""
        g, s = self.g, self.spec
        nq, nkv, d = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.head_dim
        qkv = self.lin(h, f"layers.{i}.qkv", *self.linears[f"layers.{i}.qkv"])
        q, k, v = g.op("Split", [qkv, g.const([nq, nkv, nkv])], "qkv", outputs=3, axis=-1)
        q = self.rope(g.op("Reshape", [q, g.const([0, 0, s.num_heads, d])]), cos, sin)
        k = self.rope(g.op("Reshape", [k, g.const([0, 0, s.num_kv_heads, d])]), cos, sin)
        v = g.op("Reshape", [v, g.const([0, 0, s.num_kv_heads, d])])
        q = g.op("Transpose", [q], "q", perm=[0, 2, 1, 3])  # [B, H, S, D]
        _, kd = self.cache(i, "key", g.op("Transpose", [k], "k", perm=[0, 2, 1, 3]))
        _, vd = self.cache(i, "value", g.op("Transpose", [v], "v", perm=[0, 2, 1, 3]))
        # GQA without copying K/V: the query heads of one KV head become extra query rows.
        qg = g.op("Reshape", [q, g.const([0, s.num_kv_heads, -1, d])])
        kt = g.op("Transpose", [kd], "kt", perm=[0, 1, 3, 2])
        scores = self.cast(g.op("MatMul", [qg, kt], "scores"), onnx.TensorProto.FLOAT)
        scores = g.op("Mul", [scores, g.scalar(1.0 / math.sqrt(d), np.float32)])
        scores = g.op("Add", [g.op("Reshape", [scores, g.const([0, s.num_heads, -1, 0])]), bias])
        probs = self.cast(g.op("Softmax", [scores], "probs", axis=-1), self.elem)
        pg = g.op("Reshape", [probs, g.const([0, s.num_kv_heads, -1, 0])])
        o = g.op("Reshape", [g.op("MatMul", [pg, vd]), g.const([0, s.num_heads, -1, d])])
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([0, 0, nq])])
        return self.lin(o, f"layers.{i}.dense", *self.linears[f"layers.{i}.dense"])

    def mlp(self, i: int, h: str) -> str:
        """proj(silu(gate(h)) * up(h))."""
        g = self.g
        if f"layers.{i}.gate_up" in self.linears:
            gu = self.lin(h, f"layers.{i}.gate_up", *self.linears[f"layers.{i}.gate_up"])
            n = self.spec.intermediate_size
            gate, up = g.op("Split", [gu, g.const([n, n])], "gate_up", outputs=2, axis=-1)
        else:
            gate = self.lin(h, f"layers.{i}.gate", *self.linears[f"layers.{i}.gate"])
            up = self.lin(h, f"layers.{i}.up", *self.linears[f"layers.{i}.up"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu"), up])
        return self.lin(act, f"layers.{i}.proj", *self.linears[f"layers.{i}.proj"])

    def mask_bias(self, input_ids: str, mask: str) -> str:
        """float32 [B, 1, S, T]: 0 where query i (at past + i) may see key j, MASK_VALUE elsewhere."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", [mask]), g.const([1])], "total")
        seq = g.op("Gather", [g.op("Shape", [input_ids]), g.const([1])], "seq")
        past = g.op("Sub", [total, seq], "past")
        one = g.const([1])
        kpos = g.op(
            "Range",
            [g.op("Squeeze", [g.const([0])]), g.op("Squeeze", [total]), g.op("Squeeze", [one])],
        )
        qpos = g.op(
            "Range", [g.op("Squeeze", [past]), g.op("Squeeze", [total]), g.op("Squeeze", [one])]
        )
        causal = g.op(
            "LessOrEqual",
            [g.op("Unsqueeze", [kpos, g.const([0])]), g.op("Unsqueeze", [qpos, g.const([1])])],
        )
        keep = g.op("Unsqueeze", [g.op("Cast", [mask], to=onnx.TensorProto.BOOL), g.const([1, 2])])
        allowed = g.op("And", [causal, keep], "allowed")  # [B, 1, S, T]
        return g.op(
            "Where",
            [allowed, g.scalar(0.0, np.float32), g.scalar(MASK_VALUE, np.float32)],
            "mask_bias",
        )

    def build(self) -> OnnxDecoder:
        g, s = self.g, self.spec
        ids = g.input("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])
        pos = g.input("position_ids", onnx.TensorProto.INT64, ["batch", "seq"])
        mask = g.input("attention_mask", onnx.TensorProto.INT64, ["batch", "total"])
        embed = g.init("embed", self.tensors["embed"].to(self.dtype))
        x = g.op("Gather", [embed, ids], "embed")
        freqs = torch.arange(self.positions, dtype=torch.float32).view(-1, 1) * rope_inv_freq(
            s
        ).view(1, -1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos_t, sin_t = g.init("rope_cos", emb.cos()), g.init("rope_sin", emb.sin())
        cos = g.op(
            "Unsqueeze", [self.cast(g.op("Gather", [cos_t, pos]), self.elem), g.const([2])], "cos"
        )
        sin = g.op(
            "Unsqueeze", [self.cast(g.op("Gather", [sin_t, pos]), self.elem), g.const([2])], "sin"
        )
        bias = self.mask_bias(ids, mask)
        for i in range(s.num_layers):
            h = self.rms_norm(x, f"layers.{i}.input_norm")
            x = g.op("Add", [x, self.attention(i, h, cos, sin, bias)], f"resid{i}a")
            h = self.rms_norm(x, f"layers.{i}.post_norm")
            x = g.op("Add", [x, self.mlp(i, h)], f"resid{i}m")
        h = self.rms_norm(x, "final_norm")
        head_meta, head_t = self.linears["lm_head"]
        if head_meta["kind"] == "float" and torch.equal(head_t["weight"], self.tensors["embed"]):
            # tied embeddings: one copy of the table, transposed in the graph
            logits = g.op("MatMul", [h, g.op("Transpose", [embed], perm=[1, 0])], "lm_head")
        else:
            logits = self.lin(h, "lm_head", head_meta, head_t)
        g.rename(self.cast(logits, onnx.TensorProto.FLOAT), "logits")
        g.output("logits", onnx.TensorProto.FLOAT, ["batch", "seq", s.vocab_size])
        doc = f"quantlab decoder, compute dtype {self.dtype}, KV cache {self.kv}"
        return OnnxDecoder(
            model=g.model(doc),
            dtype=self.dtype,
            kv_storage=self.kv,
            num_layers=s.num_layers,
            linear_kinds=dict(self.lin.kinds),
            custom_ops=sorted(g.custom_ops),
            w4_configs=sorted(self.lin.w4_configs),
        )


def _fp8() -> Any:
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def export_decoder(
    ckpt: Checkpoint,
    dtype: torch.dtype,
    kv_storage: str,
    w4_gemm: str = "native",
    max_positions: int | None = None,
) -> OnnxDecoder:
    """The whole decoder of ckpt as an ONNX graph in compute dtype `dtype` (see module docstring).

    max_positions: rows of the rotary tables (default the model's max_position_embeddings)."""
    positions = max_positions or ckpt.spec.max_position_embeddings
    return _Decoder(ckpt, dtype, kv_storage, w4_gemm, positions).build()

"""Run an exported decoder graph in onnxruntime (CPU): the numerics check of the TensorRT stage.

TensorRT-RTX builds engines here but cannot run them on the lent GPUs, so the graph an engine was
built from is executed by onnxruntime instead; plugin nodes are replaced by their DQ + MatMul
equivalent first (the graph is exported again with w4_gemm="native").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantlab.errors import InputError

# onnxruntime type string -> ONNX element type, and the numpy dtype holding its bytes
_ONNX_ELEM = {
    "tensor(float)": 1,
    "tensor(int8)": 3,
    "tensor(float16)": 10,
    "tensor(bfloat16)": 16,
    "tensor(float8e4m3fn)": 17,
}
_STORAGE_NP: dict[int, Any] = {
    1: np.float32,
    3: np.int8,
    10: np.float16,
    16: np.uint16,
    17: np.uint8,
}


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(
            "onnxruntime is not installed; the ONNX numerics check needs it: pip install "
            "'quantlab[tensorrt]' (or pip install onnxruntime)."
        ) from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Basic optimizations only: the extended level rewrites DequantizeLinear + MatMul into a
    # dynamically quantized int8 MatMul (activations rounded to 8 bits), which is not the graph's
    # math (measured: 0.5 % relative error on one W8A16 linear, against 3e-7 with basic).
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtDecoder:
    """An onnxruntime session over a quantlab decoder graph; prefill and decode steps with a cache."""

    def __init__(self, path: Path) -> None:
        self.sess = _session(path)
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.layers = sum(1 for n in ins if n.endswith(".key"))
        past = ins["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.kv_type = past.type

    def empty_cache(self, batch: int) -> dict[str, Any]:
        """Zero-length past K/V (OrtValues, so fp8 caches need no numpy float8) for every layer."""
        import onnxruntime as ort

        shape = (batch, self.kv_heads, 0, self.head_dim)
        elem = _ONNX_ELEM[self.kv_type]
        return {
            f"past_key_values.{i}.{w}": ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.zeros(shape, _STORAGE_NP[elem]), elem
            )
            for i in range(self.layers)
            for w in ("key", "value")
        }

    def step(
        self, ids: np.ndarray, past: dict[str, Any], start: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Run tokens ids int64 [B, S] at positions start.. after past; (logits [B, S, V], cache).

        The cache stays in onnxruntime (OrtValues): present outputs are fed back as the next past."""
        import onnxruntime as ort

        b, s = ids.shape
        arrays = {
            "input_ids": ids.astype(np.int64),
            "position_ids": np.ascontiguousarray(
                np.broadcast_to(np.arange(start, start + s), (b, s)).astype(np.int64)
            ),
            "attention_mask": np.ones((b, start + s), np.int64),
        }
        feed = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        names = [o.name for o in self.sess.get_outputs()]
        outs = self.sess.run_with_ort_values(names, {**feed, **past})
        res = dict(zip(names, outs, strict=True))
        cache = {
            k.replace("present.", "past_key_values."): v
            for k, v in res.items()
            if k.startswith("present.")
        }
        return res["logits"].numpy(), cache

    def score(self, ids: list[int], split: int | None = None) -> np.ndarray:
        """float32 logits [S, V] of one sequence; with split, tokens [split:] run one at a time
        after a prefill of [:split] (exercising the past/present cache path)."""
        arr = np.asarray([ids], np.int64)
        if split is None:
            logits, _ = self.step(arr, self.empty_cache(1), 0)
            return logits[0]
        logits, cache = self.step(arr[:, :split], self.empty_cache(1), 0)
        rows = [logits[0]]
        for t in range(split, len(ids)):
            lg, cache = self.step(arr[:, t : t + 1], cache, t)
            rows.append(lg[0])
        return np.concatenate(rows, axis=0)

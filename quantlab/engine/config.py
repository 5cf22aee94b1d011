"""Engine folder settings: what the model is, how it was built, as JSON-able dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quantlab.errors import InputError

ENGINE_FORMAT = "quantlab-engine"
ENGINE_VERSION = 1
ENGINE_WEIGHTS = "weights.safetensors"
KV_DTYPES = ("auto", "fp16", "bf16", "fp32", "int8", "fp8")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KV_STORAGE = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class ModelSpec:
    """The decoder's shape, read from the checkpoint's config.json."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_epsilon: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """Activation dtype of the engine (the checkpoint dtype)."""
        return TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class BuildSettings:
    """`quantlab build` options: the limits the runtime is sized for."""

    max_batch_size: int = 8
    max_input_len: int | None = None  # None: min(1024, max_seq_len // 2)
    max_seq_len: int | None = None  # None: max_position_embeddings
    max_num_tokens: int = 8192
    kv_cache_dtype: str = "auto"
    block_size: int = 64
    kv_cache_mem_gb: float | None = None  # None: CUDA 90 % of free memory, CPU what max_batch needs
    w4_layout: str = "auto"  # auto | checkpoint | hopper
    backend: str = "torch"

    def check(self) -> None:
        """InputError naming each option out of range."""
        probs = []
        for name in ("max_batch_size", "max_input_len", "max_num_tokens", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                probs.append(f"--{name.replace('_', '-')} must be >= 1")
        if None not in (self.max_seq_len, self.max_input_len) and (
            self.max_seq_len < self.max_input_len + 1  # type: ignore[operator]
        ):
            probs.append(
                f"--max-seq-len {self.max_seq_len} must exceed --max-input-len "
                f"{self.max_input_len} (room for at least one generated token)"
            )
        if self.kv_cache_dtype not in KV_DTYPES:
            probs.append(
                f"--kv-cache-dtype {self.kv_cache_dtype} is not one of {', '.join(KV_DTYPES)}"
            )
        if self.w4_layout not in ("auto", "checkpoint", "hopper"):
            probs.append(f"--w4-layout {self.w4_layout} is not auto, checkpoint or hopper")
        if self.backend not in ("torch", "tensorrt"):
            probs.append(
                f"--backend {self.backend!r} is not 'torch' (quantlab's own engine on its kernels) "
                "or 'tensorrt' (an ONNX graph built into a TensorRT engine)"
            )
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            probs.append("--block-size must be a power of two >= 16 (the attention kernel's tile)")
        if self.kv_cache_mem_gb is not None and self.kv_cache_mem_gb <= 0:
            probs.append("--kv-cache-mem-gb must be positive")
        if probs:
            raise InputError("quantlab build: " + "; ".join(probs) + ".")


@dataclass
class EngineConfig:
    """config.json of an engine folder."""

    model: ModelSpec
    build: BuildSettings
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    kv_storage: str  # fp16 | bf16 | fp32 | int8 | fp8
    linears: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None

    @property
    def max_seq_len(self) -> int:
        """Longest sequence (prompt + output) the runtime serves."""
        return self.build.max_seq_len or self.model.max_position_embeddings

    @property
    def max_input_len(self) -> int:
        """Longest prompt the runtime accepts."""
        return self.build.max_input_len or min(1024, self.max_seq_len // 2)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for config.json."""
        return {
            "format": ENGINE_FORMAT,
            "version": ENGINE_VERSION,
            "model": asdict(self.model),
            "build": asdict(self.build),
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "kv_storage": self.kv_storage,
            "linears": self.linears,
            "source": self.source,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> EngineConfig:
        """Inverse of to_dict; InputError for another format or version."""
        if d.get("format") == "quantlab-tensorrt-engine":
            raise InputError(
                f"{where} is a TensorRT engine (built with --backend tensorrt for SM"
                f"{d.get('target_sm')}): run it with TensorRT on such a GPU. quantlab's own runtime "
                "(generate, bench) runs engines built with --backend torch."
            )
        if d.get("format") != ENGINE_FORMAT or d.get("version") != ENGINE_VERSION:
            raise InputError(
                f"{where} is not a quantlab engine of version {ENGINE_VERSION} (format "
                f"{d.get('format')!r}, version {d.get('version')!r}); rebuild it with `quantlab build`."
            )
        return cls(
            model=ModelSpec(**d["model"]),
            build=BuildSettings(**d["build"]),
            quant_algo=d["quant_algo"],
            kv_cache_quant_algo=d["kv_cache_quant_algo"],
            kv_storage=d["kv_storage"],
            linears=d["linears"],
            source=d.get("source", {}),
            tokenizer=d.get("tokenizer"),
        )

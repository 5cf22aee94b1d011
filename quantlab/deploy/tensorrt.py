"""The TensorRT builder: ONNX decoder graph -> serialized engine, with optimization profiles.

One code path for both builders (their Python APIs match): the standard `tensorrt` when it is
importable and real, else TensorRT-RTX (`tensorrt_rtx`, pip package tensorrt-rtx-cu13), which
builds on machines without a GPU. The builder's log is kept so that a caller can check it for
fallbacks it did not ask for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from quantlab.errors import InputError

BUILDERS = ("tensorrt", "tensorrt_rtx")
PIP_PACKAGE = {"tensorrt": "tensorrt-cu13", "tensorrt_rtx": "tensorrt-rtx-cu13"}
DEFAULT_SM = "89"
# Builder warnings that are expected for quantlab's graphs (not fallbacks): int64 token/position
# inputs, which the caller binds as int64.
EXPECTED_WARNINGS = (
    "has Int64 binding",
)  # on a machine without a GPU (the newest RTX target before Blackwell)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) of batch, new tokens and past tokens."""

    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    past: tuple[int, int, int]

    def shapes(self, name: str, kv_heads: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of the graph input `name` under this profile."""
        b, s, p = self.batch, self.seq, self.past
        if name in ("input_ids", "position_ids"):
            return tuple((b[j], s[j]) for j in range(3))
        if name == "attention_mask":
            return tuple((b[j], p[j] + s[j]) for j in range(3))
        return tuple((b[j], kv_heads, p[j], head_dim) for j in range(3))


def profiles(
    max_batch: int, max_input_len: int, max_seq_len: int, max_num_tokens: int | None
) -> list[Profile]:
    """Prefill (no past, up to max_input_len new tokens) and decode (one token after up to
    max_seq_len - 1): the two phases of generation, each tuned at its own typical shape. The opt
    prefill shape keeps batch x seq within max_num_tokens."""
    opt_b = max(1, (max_batch + 1) // 2)
    budget = max_num_tokens or max_batch * max_input_len
    opt_s = max(1, min(max_input_len, budget // opt_b))
    prefill = Profile("prefill", (1, opt_b, max_batch), (1, opt_s, max_input_len), (0, 0, 0))
    decode = Profile(
        "decode", (1, max_batch, max_batch), (1, 1, 1), (0, max_seq_len // 2, max_seq_len - 1)
    )
    return [prefill, decode]


def load_builder(prefer: str | None = None) -> tuple[ModuleType, str]:
    """(the TensorRT module, its import name): `tensorrt` when real, else `tensorrt_rtx`."""
    names = (prefer,) if prefer else BUILDERS
    tried = []
    for name in names:
        try:
            mod = __import__(name)
            mod.Builder  # noqa: B018 - the PyPI stub of `tensorrt` imports but has no builder
        except Exception as e:  # a stub or broken install raises anything
            tried.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        return mod, name
    raise InputError(
        "No TensorRT builder is importable ("
        + "; ".join(tried)
        + "). Install TensorRT-RTX, which builds engines without a GPU: pip install "
        "'quantlab[tensorrt]' (or pip install tensorrt-rtx-cu13); a real `tensorrt` "
        "(pip install tensorrt-cu13 from NVIDIA's index) is used instead when it is installed."
    )


def local_sm() -> str | None:
    """The local GPU's compute capability as "90", "89", ..., or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}{minor}"
    except Exception:
        return None
    return None


def _logger(trt: ModuleType, lines: list[tuple[str, str]]) -> Any:
    class Capture(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            lines.append((str(severity).rsplit(".", 1)[-1], msg))

    return Capture()


@dataclass
class BuiltEngine:
    """A serialized engine and how it was made."""

    data: bytes
    builder: str
    version: str
    target_sm: str
    seconds: float
    log: list[tuple[str, str]] = field(default_factory=list)
    layers: int = 0

    def warnings(self) -> list[str]:
        """The builder's WARNING and ERROR lines."""
        return [m for sev, m in self.log if sev in ("WARNING", "ERROR", "INTERNAL_ERROR")]

    def unexpected_warnings(self) -> list[str]:
        """warnings() less the EXPECTED_WARNINGS: fallbacks and conversions nobody asked for."""
        return [m for m in self.warnings() if not any(e in m for e in EXPECTED_WARNINGS)]


def _target(trt: ModuleType, config: Any, sm: str) -> None:
    if not hasattr(config, "set_compute_capability"):  # standard TensorRT: the local GPU only
        return
    cc = getattr(trt.ComputeCapability, f"SM{sm}", None)
    if cc is None:
        have = [n[2:] for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        raise InputError(
            f"--target-sm {sm}: this builder ({trt.__name__} {trt.__version__}) targets compute "
            f"capabilities {', '.join(have)} only (TensorRT-RTX has no Hopper SM90 target); pass "
            "one of those."
        )
    config.num_compute_capabilities = 1
    config.set_compute_capability(cc, 0)


def build_serialized(
    onnx_path: Path,
    profs: list[Profile],
    kv_heads: int,
    head_dim: int,
    target_sm: str,
    builder: str | None = None,
    workspace_gb: float = 4.0,
) -> BuiltEngine:
    """Parse onnx_path (external data beside it) and build one engine with the given profiles."""
    trt, name = load_builder(builder)
    lines: list[tuple[str, str]] = []
    logger = _logger(trt, lines)
    t0 = time.perf_counter()
    b = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    net = b.create_network(flags)
    parser = trt.OnnxParser(net, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InputError(
            f"{name} could not parse {onnx_path}: " + " | ".join(errs[:3]) + ". The graph uses "
            "an operator or type this builder does not support; build with --w4-gemm native or "
            "report the message."
        )
    config = b.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _target(trt, config, target_sm)
    for p in profs:
        prof = b.create_optimization_profile()
        for i in range(net.num_inputs):
            inp = net.get_input(i)
            lo, opt, hi = p.shapes(inp.name, kv_heads, head_dim)
            prof.set_shape(inp.name, lo, opt, hi)
        config.add_optimization_profile(prof)
    data = b.build_serialized_network(net, config)
    if data is None:
        errs = [m for sev, m in lines if sev in ("ERROR", "INTERNAL_ERROR")]
        raise InputError(
            f"{name} failed to build an engine from {onnx_path}: "
            + (" | ".join(errs[-3:]) or "no message")
            + ". Try --w4-gemm native, a smaller --max-seq-len, or another --target-sm."
        )
    return BuiltEngine(
        data=bytes(data),
        builder=name,
        version=str(trt.__version__),
        target_sm=target_sm,
        seconds=time.perf_counter() - t0,
        log=lines,
        layers=net.num_layers,
    )

"""`quantlab build --backend tensorrt`: checkpoint -> ONNX decoder graph -> TensorRT engine folder.

The folder follows the seed's layout: config.json (build settings, quant_algo, plugins, builder
name and version, profiles, engine size) + rank0.engine, and with keep_onnx the graph it was
built from (onnx/model.onnx + model.data). Written in a temporary sibling and renamed into place,
like every quantlab output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from quantlab.deploy.onnx_export import export_decoder
from quantlab.deploy.tensorrt import (
    DEFAULT_SM,
    build_serialized,
    load_builder,
    local_sm,
    profiles,
)
from quantlab.engine.build import resolve_kv_storage
from quantlab.engine.checkpoint import load_checkpoint, read_config
from quantlab.engine.config import TORCH_DTYPES, BuildSettings
from quantlab.errors import InputError, environment_failure
from quantlab.outdir import check_writable, output_lock, publish

log = logging.getLogger("quantlab")
TRT_FORMAT = "quantlab-tensorrt-engine"
TRT_VERSION = 1
ENGINE_FILE = "rank0.engine"
W4_GEMMS = ("native", "plugin")
W4_ALGOS = ("W4A16", "W4A16_AWQ", "W4A16_GPTQ")


@dataclass(frozen=True)
class TrtSettings:
    """Options of the TensorRT backend on top of BuildSettings."""

    w4_gemm: str = "native"  # native: INT4 blocked DQ + MatMul; plugin: quantlab::W4A16Gemm
    target_sm: str | None = None  # None: the local GPU's, else DEFAULT_SM
    keep_onnx: bool = False
    builder: str | None = None  # None: tensorrt when real, else tensorrt_rtx

    def check(self) -> None:
        """InputError for an option out of range."""
        if self.w4_gemm not in W4_GEMMS:
            raise InputError(f"--w4-gemm {self.w4_gemm!r} is not one of {', '.join(W4_GEMMS)}.")
        if self.target_sm is not None and not self.target_sm.isdigit():
            raise InputError(
                f"--target-sm {self.target_sm!r}: give the compute capability as digits, e.g. 89 "
                "for SM 8.9 (Ada) or 80 for SM 8.0 (Ampere)."
            )


def _settings(settings: BuildSettings, conf: dict[str, Any]) -> BuildSettings:
    positions = int(conf.get("max_position_embeddings", 2048))
    seq = settings.max_seq_len or positions
    if seq > positions:
        raise InputError(
            f"--max-seq-len {seq} exceeds the model's max_position_embeddings {positions}: the "
            "model was not trained for positions beyond that. Pass --max-seq-len "
            f"{positions} or less."
        )
    inp = settings.max_input_len or min(1024, seq // 2)
    if inp >= seq:
        raise InputError(
            f"--max-input-len {inp} leaves no room to generate within --max-seq-len {seq}."
        )
    return replace(settings, max_seq_len=seq, max_input_len=inp)


def _onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def build_trt_engine(
    checkpoint_dir: Path,
    output_dir: Path,
    settings: BuildSettings,
    trt: TrtSettings,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Check, export the graph, build the engine, write the folder atomically; its config.json."""
    settings.check()
    trt.check()
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    conf = read_config(checkpoint_dir)
    kv = resolve_kv_storage(settings, conf, checkpoint_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(
            f"Engine folder {output_dir} exists and is not empty; choose another --output or pass "
            "--overwrite."
        )
    settings = _settings(settings, conf)
    seq, inp = int(settings.max_seq_len or 0), int(settings.max_input_len or 0)
    sm = trt.target_sm or local_sm() or DEFAULT_SM
    ckpt = load_checkpoint(checkpoint_dir)
    algo = ckpt.quant.get("quant_algo")
    w4_gemm = trt.w4_gemm
    if w4_gemm == "plugin" and algo not in W4_ALGOS:
        log.warning("--w4-gemm plugin: %s has no W4A16 linears; building without the plugin", algo)
        w4_gemm = "native"
    if w4_gemm == "plugin":  # the AOT kernel's limits, before any work
        from quantlab.deploy.aot import check_target

        check_target(None, sm, ckpt.spec.dtype)  # group sizes: when the linears are read
    fallback = None
    if w4_gemm == "plugin":
        from quantlab.deploy.plugin import plugin_blocker, register_w4_plugin

        fallback = plugin_blocker(load_builder(trt.builder)[0])
        if fallback:  # the native INT4 DQ + MatMul path serves instead (same math)
            log.warning("--w4-gemm plugin: %s; building the native INT4 DQ path", fallback)
            w4_gemm = "native"
        else:
            register_w4_plugin(trt.builder)
    spec = ckpt.spec
    profs = profiles(settings.max_batch_size, inp, seq, settings.max_num_tokens)
    problems = check_writable(output_dir, 2 * ckpt_bytes(ckpt.tensors), key="--output")
    if problems:
        raise InputError("Cannot write the engine: " + " ".join(problems))
    with output_lock(output_dir):
        tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "onnx").mkdir(parents=True)
        try:
            log.info("exporting the ONNX graph of %s (%s, KV %s)", checkpoint_dir, algo, kv)
            dec = export_decoder(ckpt, TORCH_DTYPES[spec.dtype], kv, w4_gemm, max_positions=seq)
            aot: list[dict[str, Any]] = []
            if trt.w4_gemm == "plugin" and dec.w4_configs:
                from quantlab.deploy.aot import write_w4a16_kernels

                log.info("compiling the W4A16 plugin kernel ahead of time for SM%s", sm)
                aot = write_w4a16_kernels(tmp, set(dec.w4_configs), spec.dtype, sm)
            graph = tmp / "onnx" / "model.onnx"
            onnx.save(dec.model, str(graph), save_as_external_data=True, location="model.data")
            del dec.model
            log.info("building the %s engine for SM%s (takes a while)", algo or spec.dtype, sm)
            built = build_serialized(
                graph, profs, spec.num_kv_heads, spec.head_dim, sm, trt.builder
            )
            (tmp / ENGINE_FILE).write_bytes(built.data)
            onnx_size = _onnx_bytes(tmp / "onnx")
            if not trt.keep_onnx:
                shutil.rmtree(tmp / "onnx")
            cfg = {
                "format": TRT_FORMAT,
                "version": TRT_VERSION,
                "backend": "tensorrt",
                "builder": {"name": built.builder, "version": built.version},
                "target_sm": sm,
                "model": asdict(spec),
                "build": {
                    **asdict(settings),
                    "backend": "tensorrt",
                    **asdict(trt),
                    "target_sm": sm,
                },
                "quant_algo": algo,
                "kv_cache_quant_algo": ckpt.quant.get("kv_cache_quant_algo"),
                "kv_storage": kv,
                "compute_dtype": spec.dtype,
                "plugins": dec.custom_ops,
                "w4_gemm": {
                    "requested": trt.w4_gemm,
                    "used": w4_gemm,
                    "fallback_reason": fallback,
                    "aot_kernels": [f"plugins/{k['cubin']}" for k in aot],
                },
                "linear_kinds": dec.linear_kinds,
                "profiles": [asdict(p) for p in profs],
                "engine": {
                    "file": ENGINE_FILE,
                    "bytes": len(built.data),
                    "build_seconds": round(built.seconds, 2),
                    "network_layers": built.layers,
                },
                "onnx": {"kept": trt.keep_onnx, "bytes": onnx_size, "opset": 21},
                "builder_warnings": built.unexpected_warnings(),
                "builder_expected_warnings": len(built.warnings())
                - len(built.unexpected_warnings()),
                "source": {"checkpoint": str(checkpoint_dir.resolve())},
            }
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            publish(tmp, output_dir, overwrite)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise environment_failure(exc, f"writing the engine {output_dir}") from None
        except BaseException:
            if not (tmp / "config.json").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return cfg


def ckpt_bytes(tensors: dict[str, Any]) -> int:
    """Bytes of a checkpoint's tensors (the engine is about that size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())

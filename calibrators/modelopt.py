"""modelopt: the vendor's reference. Runs NVIDIA ModelOpt's own algorithm for a format on the same
model and calibration windows (`mtq.quantize` with its preset config), writes ModelOpt's own HF
export and reads it back as a QuantState, so `quantlab report` can put quantlab's AWQ / FP8 /
SmoothQuant next to ModelOpt's.

A whole-model step: ModelOpt calibrates the whole model at once, so the Runner's layer loop is
skipped and the step must be the recipe's only step (its `kv_cache: fp8` replaces quantlab's
kv_cache step). The model is quantized in `dtype` (default: the export dtype, as ModelOpt's
examples run it); the float tensors ModelOpt's export changes (the norms AWQ folds scales into)
replace the run's, and each such fold is recorded (FOLD_IN) so the report compares like with like.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from quantlab.adapters import ModelAdapter
from quantlab.calibrator import CalibratorArgs, LayerContext
from quantlab.errors import InputError
from quantlab.formats import QuantFormat
from quantlab.state import FOLD_IN, ModuleState

log = logging.getLogger(__name__)

Algorithm = Literal[
    "int8_weight_only", "int4_awq", "fp8", "fp8_per_channel_per_token", "int8_smoothquant"
]
# algorithm -> (ModelOpt preset config, weight format, input format)
PRESETS: dict[str, tuple[str, QuantFormat, QuantFormat | None]] = {
    "int8_weight_only": ("INT8_WEIGHT_ONLY_CFG", QuantFormat("int8", "channel"), None),
    "int4_awq": ("INT4_AWQ_CFG", QuantFormat("int4", "group", 128), None),
    "fp8": (
        "FP8_DEFAULT_CFG",
        QuantFormat("fp8_e4m3", "tensor"),
        QuantFormat("fp8_e4m3", "tensor"),
    ),
    "fp8_per_channel_per_token": (
        "FP8_PER_CHANNEL_PER_TOKEN_CFG",
        QuantFormat("fp8_e4m3", "channel"),
        QuantFormat("fp8_e4m3", "token"),
    ),
    "int8_smoothquant": (
        "INT8_SMOOTHQUANT_CFG",
        QuantFormat("int8", "channel"),
        QuantFormat("int8", "tensor"),
    ),
}


class ModelOptArgs(CalibratorArgs):
    """algorithm: the ModelOpt preset; group_size: INT4 AWQ's block; kv_cache: ModelOpt's FP8 KV."""

    algorithm: Algorithm
    group_size: int = Field(128, gt=0)
    kv_cache: Literal["fp8"] | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None  # default: export.dtype


def modelopt_config(args: ModelOptArgs) -> dict[str, Any]:
    """The ModelOpt quantize config of args: its preset, the block size, FP8 KV added."""
    import modelopt.torch.quantization as mtq

    cfg: dict[str, Any] = copy.deepcopy(getattr(mtq, PRESETS[args.algorithm][0]))
    if args.algorithm == "int4_awq":
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"] = {-1: args.group_size, "type": "static"}
    if args.kv_cache == "fp8":
        cfg["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


class ModelOptStep:
    """ModelOpt's mtq.quantize + export_hf_checkpoint on a copy of the model, read back as results."""

    name: ClassVar[str] = "modelopt"
    Args: ClassVar[type[CalibratorArgs]] = ModelOptArgs
    edits_weights: ClassVar[bool] = True
    whole_model: ClassVar[bool] = True  # the pipeline calls quantize_whole instead of the Runner
    needs_data = True

    def __init__(self, args: ModelOptArgs) -> None:
        if importlib.util.find_spec("modelopt") is None:
            raise InputError(
                "The modelopt step needs NVIDIA ModelOpt: pip install 'quantlab[modelopt]' "
                "(nvidia-modelopt 0.47; it runs on the CPU)."
            )
        self.args = args

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(weight, input) formats of the preset (int4 AWQ at args.group_size)."""
        _, wf, af = PRESETS[self.args.algorithm]
        if self.args.algorithm == "int4_awq":
            wf = QuantFormat("int4", "group", self.args.group_size)
        return wf, af

    # The Calibrator interface's per-layer methods: the Runner never calls a whole-model step.
    def targets(self, ctx: LayerContext) -> list[str]:
        """Never called (whole-model step)."""
        raise AssertionError("the modelopt step is whole-model")

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Never called (whole-model step)."""
        raise AssertionError("the modelopt step is whole-model")

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Never called (whole-model step)."""
        raise AssertionError("the modelopt step is whole-model")

    def quantize_whole(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        windows: list[torch.Tensor],
        dtype: torch.dtype,
        show_progress: bool = True,
    ) -> dict[str, ModuleState]:
        """Run ModelOpt on a copy of model (in dtype) over windows; load its exported float tensors
        into model and return the per-module results (full names)."""
        from quantlab.export.modelopt_hf import read_modelopt_hf

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as said:
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint

            device = next(model.parameters()).device
            work = copy.deepcopy(model)
            for p in (
                work.parameters()
            ):  # buffers (rotary inv_freq) keep float32, as from_pretrained does
                p.data = p.data.to(dtype)
            bar = tqdm(desc="modelopt forward passes", unit="window", disable=not show_progress)

            def forward_loop(m: nn.Module) -> None:
                with torch.no_grad():
                    for w in windows:
                        m(input_ids=w.view(1, -1).to(device))
                        bar.update(1)

            work = mtq.quantize(work, modelopt_config(self.args), forward_loop)
            bar.close()
            with tempfile.TemporaryDirectory(prefix="quantlab-modelopt-") as tmp:
                export_hf_checkpoint(work, export_dir=tmp)
                state, floats, _ = read_modelopt_hf(Path(tmp))
        for line in said.getvalue().splitlines():
            log.debug("modelopt: %s", line)
        del work
        return _adopt(model, adapter, state.modules, floats)


def _adopt(
    model: nn.Module,
    adapter: ModelAdapter,
    results: dict[str, ModuleState],
    floats: dict[str, torch.Tensor],
) -> dict[str, ModuleState]:
    """Copy ModelOpt's exported float tensors into model; record each norm fold as FOLD_IN
    (norm_old / norm_new) on the linears that norm feeds."""
    params = dict(model.named_parameters())
    for key, t in floats.items():
        if key in params:
            old = params[key].detach()
            for norm, group in adapter.smoothing_groups:
                if not key.endswith(f".{norm}.weight") or torch.equal(old.to(t.dtype), t):
                    continue
                fold = old.float() / t.float()
                layer = key.removesuffix(f".{norm}.weight")
                for lin in group:
                    ms = results.setdefault(f"{layer}.{lin}", ModuleState())
                    ms.tensors[FOLD_IN] = fold.clone()
            with torch.no_grad():
                params[key].copy_(t.to(old.dtype))
    return results

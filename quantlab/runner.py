"""The Runner: the only orchestration. Layer by layer, step by step: hook -> observe -> solve -> record."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.adapters import ModelAdapter
from quantlab.calibrator import Calibrator, LayerContext
from quantlab.qmodules import apply_module_states
from quantlab.state import ModuleState, QuantState

log = logging.getLogger(__name__)

LayerInput = tuple[torch.Tensor, dict[str, Any]]


@dataclass
class RunnerConfig:
    """How the Runner walks the model."""

    # "quantized": the next layer's inputs come from the already-quantized layer (errors are seen
    # and compensated downstream); "float": from the float layer.
    propagate: Literal["quantized", "float"] = "quantized"
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on full module names
    show_progress: bool = True
    scale_dtype: torch.dtype = torch.float32  # checkpoint dtype of integer weight scales


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def decoder_layers(model: nn.Module, adapter: ModelAdapter) -> nn.ModuleList:
    """The ModuleList of decoder layers of model."""
    layers = model.get_submodule(adapter.layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def quantizable_linears(adapter: ModelAdapter, prefix: str, exclude: Sequence[str]) -> list[str]:
    """Layer-relative names of the adapter's linears not matched by any exclude pattern."""
    return [
        n
        for n in adapter.linears
        if not any(
            fnmatch.fnmatchcase(f"{prefix}.{n}", p) or fnmatch.fnmatchcase(n, p) for p in exclude
        )
    ]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: ModelAdapter, windows: Sequence[torch.Tensor]
) -> list[LayerInput]:
    """Inputs (hidden [1, L, H], kwargs) of the first decoder layer for each window [L] (int64)."""
    first = decoder_layers(model, adapter)[0]
    captured: list[LayerInput] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kw["use_cache"] = False
        captured.append((hidden.detach(), kw))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for w in windows:
            with contextlib.suppress(_StopForward):
                model(input_ids=w.view(1, -1).to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[torch.Tensor]:
    """Outputs [1, L, H] of one decoder layer for each cached input."""
    return [_layer_output(layer(h, **kw)) for h, kw in inputs]


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    windows: Sequence[torch.Tensor],
    steps: Sequence[Calibrator],
    config: RunnerConfig,
    state: QuantState | None = None,
) -> QuantState:
    """Calibrate model in place, layer by layer; returns the QuantState (model's linears become QuantLinear)."""
    state = state if state is not None else QuantState()
    layers = decoder_layers(model, adapter)
    # Data-free steps only (round-to-nearest): no layer is ever run.
    needs_data = any(cal.needs_data for cal in steps)
    inputs: list[LayerInput] = capture_layer_inputs(model, adapter, windows) if needs_data else []
    bar = tqdm(
        range(len(layers)),
        desc="calibrating layers",
        unit="layer",
        disable=not config.show_progress,
    )
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i]
        prefix = f"{adapter.layers}.{i}"
        ctx = LayerContext(
            index=i,
            prefix=prefix,
            layer=layer,
            linears=quantizable_linears(adapter, prefix, config.exclude),
            adapter=adapter,
            run=lambda layer=layer, inputs=inputs: run_layer(layer, inputs),  # type: ignore[misc]
            scale_dtype=config.scale_dtype,
        )
        layer_states: dict[str, ModuleState] = {}
        for cal in steps:
            _observe(cal, ctx, inputs)
            results = cal.solve(ctx)
            for name, ms in results.items():
                layer_states.setdefault(name, ModuleState()).merge(ms)
            state.update(prefix, results)
        if config.propagate == "float" and inputs:
            outputs = run_layer(layer, inputs)
            apply_module_states(layer, layer_states)
        else:
            apply_module_states(layer, layer_states)
            outputs = run_layer(layer, inputs) if inputs else []
        inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs, strict=True)]
        log.debug(
            "layer %d: %d module(s) quantized in %.2f s",
            i,
            len(layer_states),
            time.perf_counter() - t0,
        )
    return state


def _observe(cal: Calibrator, ctx: LayerContext, inputs: Sequence[LayerInput]) -> None:
    names = cal.targets(ctx)
    if not names or not inputs:
        return
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            cal.observe(name, args[0])

        handles.append(ctx.module(name).register_forward_pre_hook(hook))
    try:
        ctx.run()
    finally:
        for h in handles:
            h.remove()

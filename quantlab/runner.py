"""The Runner: the only orchestration. Layer by layer, step by step: hook -> observe -> solve -> record."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlab.adapters import ModelAdapter
from quantlab.calibrator import Calibrator, LayerContext
from quantlab.errors import QuantlabError
from quantlab.memory import device_peak_mb, host_peak_mb, reset_peaks
from quantlab.primitives import check_finite
from quantlab.qmodules import apply_module_states
from quantlab.resume import LayerCheckpoint
from quantlab.state import ModuleState, QuantState

log = logging.getLogger(__name__)

LayerInput = tuple[torch.Tensor, dict[str, Any]]
# Test hook: "N" makes the process SIGKILL itself right after recording layer N in the resume
# folder; "N:TERM" / "N:INT" send SIGTERM / SIGINT instead.
KILL_AFTER_LAYER_ENV = "QUANTLAB_KILL_AFTER_LAYER"


@dataclass
class RunnerConfig:
    """How the Runner walks the model."""

    # "quantized": the next layer's inputs come from the already-quantized layer (errors are seen
    # and compensated downstream); "float": from the float layer.
    propagate: Literal["quantized", "float"] = "quantized"
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on full module names
    show_progress: bool = True
    scale_dtype: torch.dtype = torch.float32  # checkpoint dtype of integer weight scales
    # Where layers are calibrated; None: where the model's parameters are.
    device: str | None = None
    # Keep the model where it is (normally CPU) and move one decoder layer at a time to `device`.
    offload: bool = False
    # Resume folder: each finished layer is recorded there and a restarted run continues after it.
    checkpoint_dir: Path | None = None
    fingerprint: str = ""  # identifies the run a resume folder belongs to (see quantlab.resume)


@dataclass
class LayerProfile:
    """Wall time and peak memory of one decoder layer's calibration."""

    layer: int
    seconds: float
    peak_host_mb: (
        float | None
    )  # process peak RSS while this layer ran (Linux VmHWM, reset per layer)
    peak_device_mb: float | None  # torch's peak CUDA allocation while this layer ran
    resumed: bool = False  # restored from a resume folder, not calibrated in this process


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


# Models whose layers differ in attention (Gemma's sliding and global layers: another mask and
# another rotary table per type) get each type's keyword arguments; run_layer picks by the tag.
BY_LAYER_TYPE = "quantlab_kwargs_by_layer_type"
LAYER_TYPE_ATTR = "quantlab_layer_type"


def tag_layer_types(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Tag each decoder layer with its config.layer_types entry; the distinct types (empty when the
    model has one kind of layer, which needs no tag)."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if callable(get_text) else config
    types = [str(t) for t in (getattr(cfg, "layer_types", None) or [])]
    layers = decoder_layers(model, adapter)
    if len(set(types)) < 2 or len(types) < len(layers):
        return []
    for layer, t in zip(layers, types, strict=False):
        setattr(layer, LAYER_TYPE_ATTR, t)
    return list(dict.fromkeys(types))


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: ModelAdapter, windows: Sequence[torch.Tensor]
) -> list[LayerInput]:
    """Inputs (hidden [1, L, H], kwargs) of the first decoder layer for each window [L] (int64).

    With several layer types the kwargs also hold each type's own (under BY_LAYER_TYPE), taken
    from the first layer of that type.
    """
    layers = decoder_layers(model, adapter)
    kinds = tag_layer_types(model, adapter)
    first = {
        k: next(i for i, la in enumerate(layers) if getattr(la, LAYER_TYPE_ATTR) == k)
        for k in kinds
    }
    last = max(first.values(), default=0)
    captured: list[LayerInput] = []
    by_type: dict[str, dict[str, Any]] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {
            k: v
            for k, v in kwargs.items()
            if k not in ("past_key_values", "past_key_value", "cache")
        }
        kw["use_cache"] = False
        if m is layers[0]:
            captured.append((hidden.detach(), kw))
        if kinds:
            by_type[getattr(m, LAYER_TYPE_ATTR)] = dict(kw)
        if m is layers[last]:
            if kinds:
                captured[-1][1][BY_LAYER_TYPE] = dict(by_type)
                by_type.clear()
            raise _StopForward

    hooked = {id(layers[0]): layers[0], **{id(layers[i]): layers[i] for i in first.values()}}
    handles = [la.register_forward_pre_hook(hook, with_kwargs=True) for la in hooked.values()]
    device = next(model.parameters()).device
    try:
        for w in windows:
            with contextlib.suppress(_StopForward):
                model(input_ids=w.view(1, -1).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def layer_kwargs(layer: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a captured input gives this decoder layer (its type's, if typed)."""
    by_type = kw.get(BY_LAYER_TYPE)
    if by_type is None:
        return kw
    kind = getattr(layer, LAYER_TYPE_ATTR, None)
    if kind not in by_type:
        raise QuantlabError(
            f"decoder layer {type(layer).__name__} has layer type {kind!r}, but inputs were "
            f"captured for {sorted(by_type)}; this is a quantlab bug, please report it."
        )
    return by_type[kind]  # type: ignore[no-any-return]


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[torch.Tensor]:
    """Outputs [1, L, H] of one decoder layer for each cached input."""
    return [_layer_output(layer(h, **layer_kwargs(layer, kw))) for h, kw in inputs]


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    windows: Sequence[torch.Tensor],
    steps: Sequence[Calibrator],
    config: RunnerConfig,
    state: QuantState | None = None,
    profile: list[LayerProfile] | None = None,
) -> QuantState:
    """Calibrate model in place, layer by layer; returns the QuantState (model's linears become QuantLinear).

    With config.offload only the decoder layer being calibrated (plus the embedding for the first
    capture) sits on config.device; everything else stays where it was loaded. Each layer's time
    and peak memory are appended to `profile` and logged. With config.checkpoint_dir every finished
    layer is recorded there and a later call continues after the last one; the caller removes the
    folder once it no longer needs it.
    """
    state = state if state is not None else QuantState()
    profile = profile if profile is not None else []
    layers = decoder_layers(model, adapter)
    home = next(model.parameters()).device
    dev = torch.device(config.device) if config.device else home
    offload = config.offload and dev != home
    # Data-free steps only (round-to-nearest): no layer is ever run.
    needs_data = any(cal.needs_data for cal in steps)
    inputs: list[LayerInput] = []
    if needs_data:
        with _on_device(_prologue(model, adapter), dev, offload):
            inputs = capture_layer_inputs(model, adapter, windows)
        for j, (h, _) in enumerate(inputs):
            check_finite(h, f"the hidden states entering {adapter.layers}.0 for window {j}")
    ckpt = (
        LayerCheckpoint(config.checkpoint_dir, config.fingerprint)
        if config.checkpoint_dir is not None
        else None
    )
    start = 0
    if ckpt is not None:
        resumed = ckpt.restore(layers, adapter.layers, state, dev)
        if resumed is not None:
            start = resumed.done
            inputs = [(h, kw) for h, (_, kw) in zip(resumed.hidden, inputs, strict=True)]
            profile.extend(LayerProfile(i, 0.0, None, None, True) for i in range(start))
    bar = tqdm(
        range(start, len(layers)),
        desc="calibrating layers",
        unit="layer",
        disable=not config.show_progress,
        initial=start,
        total=len(layers),
    )
    for i in bar:
        reset_peaks(dev)
        t0 = time.perf_counter()
        layer = layers[i]
        prefix = f"{adapter.layers}.{i}"
        with _on_device([layer], dev, offload):
            layer_states, outputs, float_tensors = _calibrate_layer(
                i, prefix, layer, adapter, inputs, steps, config, state, ckpt is not None
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs, strict=True)]
        prof = LayerProfile(i, time.perf_counter() - t0, host_peak_mb(), device_peak_mb(dev))
        profile.append(prof)
        if ckpt is not None:
            ckpt.save_layer(i, float_tensors, layer_states, [h for h, _ in inputs])
            _fault_injection(i)
        log.info(
            "layer %d: %d module(s) quantized in %.2f s; peak host RSS %s MiB, peak device %s MiB",
            i,
            len(layer_states),
            prof.seconds,
            _mb(prof.peak_host_mb),
            _mb(prof.peak_device_mb),
        )
    return state


def _fault_injection(index: int) -> None:
    """Signal this process after layer `index` when KILL_AFTER_LAYER_ENV asks for it (tests)."""
    layer, _, sig = os.environ.get(KILL_AFTER_LAYER_ENV, "").partition(":")
    if layer == str(index):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def _calibrate_layer(
    index: int,
    prefix: str,
    layer: nn.Module,
    adapter: ModelAdapter,
    inputs: list[LayerInput],
    steps: Sequence[Calibrator],
    config: RunnerConfig,
    state: QuantState,
    keep_float: bool,
) -> tuple[dict[str, ModuleState], list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run every step on one layer; (merged ModuleStates, next-layer hidden states, float tensors if keep_float)."""
    ctx = LayerContext(
        index=index,
        prefix=prefix,
        layer=layer,
        linears=quantizable_linears(adapter, prefix, config.exclude),
        adapter=adapter,
        run=lambda layer=layer, inputs=inputs: run_layer(layer, inputs),  # type: ignore[misc]
        scale_dtype=config.scale_dtype,
    )
    for n in ctx.linears:
        check_finite(ctx.weight(n), f"the weight of {prefix}.{n} (decoder layer {index})")
    layer_states: dict[str, ModuleState] = {}
    for cal in steps:
        _observe(cal, ctx, inputs)
        # Results are kept in host memory: on an accelerator the QuantState of a large model
        # would otherwise grow by every layer's codes.
        results = {n: ms.to("cpu") for n, ms in cal.solve(ctx).items()}
        for name, ms in results.items():
            layer_states.setdefault(name, ModuleState()).merge(ms)
        state.update(prefix, results)
    if ctx.folds:  # cumulative over the steps, so they replace what an earlier step recorded
        folds = {n: ModuleState(tensors=dict(t)) for n, t in ctx.folds.items()}
        for name, ms in folds.items():
            layer_states.setdefault(name, ModuleState()).merge(ms)
        state.update(prefix, folds)
    # The float tensors after every edit, before QuantLinear replaces the linears: what a resumed
    # run loads before re-applying the same ModuleStates.
    float_tensors = (
        {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
        if keep_float
        else {}
    )
    if config.propagate == "float" and inputs:
        outputs = run_layer(layer, inputs)
        apply_module_states(layer, layer_states)
    else:
        apply_module_states(layer, layer_states)
        outputs = run_layer(layer, inputs) if inputs else []
    for j, out in enumerate(outputs):
        check_finite(out, f"the output of {prefix} (decoder layer {index}) for window {j}")
    return layer_states, outputs, float_tensors


def _prologue(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """Modules the first layer's capture runs through: the embedding and any model-level rotary module."""
    mods = [model.get_submodule(adapter.embed)]
    base = adapter.layers.rpartition(".")[0]
    rotary = getattr(model.get_submodule(base) if base else model, "rotary_emb", None)
    if isinstance(rotary, nn.Module):
        mods.append(rotary)
    return mods


@contextlib.contextmanager
def _on_device(mods: Sequence[nn.Module], dev: torch.device, active: bool) -> Iterator[None]:
    """Move mods to dev for the block and back to where they were afterwards (no-op unless active)."""
    if not active:
        yield
        return
    homes = [
        next(itertools.chain(m.parameters(), m.buffers()), torch.empty(0)).device for m in mods
    ]
    for m in mods:
        m.to(dev)
    try:
        yield
    finally:
        for m, h in zip(mods, homes, strict=True):
            m.to(h)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _observe(cal: Calibrator, ctx: LayerContext, inputs: Sequence[LayerInput]) -> None:
    from quantlab.attention import record_kv  # kept local: only _observe uses it

    names = cal.targets(ctx)
    # Optional: calibrators with observe_attention(name, key, value) see each attention call's
    # keys (after rope) and values.
    attention = getattr(cal, "observe_attention", None)
    if not inputs or (not names and attention is None):
        return
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            check_finite(args[0], f"the input of {ctx.prefix}.{name} (decoder layer {ctx.index})")
            cal.observe(name, args[0])

        handles.append(ctx.module(name).register_forward_pre_hook(hook))
    try:
        with record_kv(ctx.layer, attention) if attention is not None else contextlib.nullcontext():
            ctx.run()
    finally:
        for h in handles:
            h.remove()

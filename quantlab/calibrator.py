"""The Calibrator interface (observe -> solve) and the registry that finds calibrators by name.

The core never imports quantlab.calibrators: built-in and third-party calibrators alike are
declared in the `quantlab.calibrators` entry-point group and loaded by name on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantlab.adapters import ModelAdapter
from quantlab.errors import InputError
from quantlab.formats import QuantFormat
from quantlab.state import FOLD_IN, FOLD_OUT, ModuleState

ENTRY_POINT_GROUP = "quantlab.calibrators"


class CalibratorArgs(BaseModel):
    """Base of every calibrator's hyper-parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LayerContext:
    """What a calibrator sees of one decoder layer while the Runner works on it."""

    index: int
    prefix: str  # full module name of the layer, e.g. "model.layers.3"
    layer: nn.Module
    linears: list[str]  # quantizable linears (layer-relative names), exclusions applied
    adapter: ModelAdapter
    run: Callable[[], list[torch.Tensor]]  # runs the layer on every cached input, returns outputs
    scale_dtype: torch.dtype = torch.float32  # dtype the checkpoint stores integer weight scales in
    # Linear -> {FOLD_IN: [K], FOLD_OUT: [N]} (float32): the scale folds applied to its float
    # weight so far (record_fold); the Runner stores them in the QuantState.
    folds: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def module(self, name: str) -> nn.Module:
        """The submodule `name` (layer-relative) of this layer."""
        return self.layer.get_submodule(name)

    def weight(self, name: str) -> torch.Tensor:
        """The current float weight [N, K] of linear `name` (layer-relative), detached."""
        return param(self.layer.get_submodule(name), "weight")


def record_fold(ctx: LayerContext, name: str, key: str, s: torch.Tensor) -> None:
    """Note that linear `name`'s columns (key FOLD_IN, s [K]) were multiplied or its rows (FOLD_OUT,
    s [N]) divided by s; records of one linear multiply, so several folding steps compose."""
    assert key in (FOLD_IN, FOLD_OUT), key
    rec = ctx.folds.setdefault(name, {})
    prev = rec.get(key)
    s32 = s.detach().float().cpu().clone()  # each linear owns its copy (safetensors refuses shared)
    rec[key] = s32 if prev is None else prev * s32


def param(module: nn.Module, attr: str) -> torch.Tensor:
    """Tensor attribute `attr` of module, detached (typed accessor for nn.Module's dynamic attributes)."""
    t = getattr(module, attr)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{attr} is not a tensor")
    return t.detach()


@runtime_checkable
class Calibrator(Protocol):
    """Observe statistics on hooked modules, then solve for per-module results.

    A calibrator that edits float weights in solve (scale folding, GPTQ updates) says so in its
    docstring and sets `edits_weights = True`.

    Optional: `observe_attention(self, name: str, key: Tensor, value: Tensor) -> None`. When a
    calibrator defines it, the Runner also routes each calibration run of the layer through
    quantlab.attention.record_kv and calls it once per attention call and window: name is the
    attention module (layer-relative, e.g. "self_attn"), key [B, H_kv, L, D] is after the rotary
    embedding and value [B, H_kv, L, D], both before GQA's repeat and any KV quantization. Such a
    calibrator may return an empty targets().
    """

    name: ClassVar[str]
    Args: ClassVar[type[CalibratorArgs]]
    edits_weights: ClassVar[bool]
    # False: solve works on weights alone and the Runner runs no calibration data for it.
    needs_data: bool

    def __init__(self, args: Any) -> None: ...

    def planned_formats(self) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(weight format, input format) this calibrator will produce; None where it sets none."""
        ...

    def targets(self, ctx: LayerContext) -> list[str]:
        """Layer-relative names of modules whose inputs should be observed."""
        ...

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Stream statistics of an input x [..., K] of module `name`; bounded memory."""
        ...

    def solve(self, ctx: LayerContext) -> dict[str, ModuleState]:
        """Per-module results (layer-relative names) from what was observed; resets the stats."""
        ...


def available_calibrators() -> dict[str, Any]:
    """Entry points of the group, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_calibrator(name: str) -> type[Calibrator]:
    """Load the calibrator class registered as `name`; InputError listing the valid names."""
    eps = available_calibrators()
    if name not in eps:
        raise InputError(
            f"Unknown calibrator '{name}'. Registered calibrators: {', '.join(sorted(eps)) or 'none'}. "
            f"Third-party calibrators register in the '{ENTRY_POINT_GROUP}' entry-point group."
        )
    cls = eps[name].load()
    for attr in ("Args", "targets", "observe", "solve", "planned_formats"):
        if not hasattr(cls, attr):
            raise InputError(
                f"Calibrator '{name}' ({eps[name].value}) lacks `{attr}`; it does not implement the Calibrator interface."
            )
    return cls  # type: ignore[no-any-return]


def build_calibrator(name: str, args: dict[str, Any]) -> Calibrator:
    """Instantiate calibrator `name` with validated args."""
    cls = get_calibrator(name)
    return cls(cls.Args.model_validate(args))

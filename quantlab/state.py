"""QuantState: calibration results as data. Saveable, reloadable, diffable, re-appliable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantlab.errors import InputError, corrupt_file
from quantlab.formats import QuantFormat
from quantlab.tensorio import load_tensors

STATE_VERSION = 1
_SEP = "::"
WEIGHT_TENSORS = ("qweight", "weight_scale", "weight_zero")
# Scale folds a calibrator applied to a linear's float weight (SmoothQuant, AWQ), float32:
# W_folded = W * FOLD_IN[None, :] / FOLD_OUT[:, None], so x_folded = x / FOLD_IN and
# y_folded = y / FOLD_OUT. The report uses them to compare a linear with its reference.
FOLD_IN = "fold_in_scale"
FOLD_OUT = "fold_out_scale"


@dataclass
class ModuleState:
    """Results for one module: its weight and input formats and named tensors.

    Tensor names used by the core: `qweight` (codes [N, K], see primitives.quantize), `weight_scale`,
    `weight_zero`, `input_scale` (static activation scale [1]). Calibrators may add more
    (e.g. `pre_quant_scale`); unknown names are carried through save/load untouched.
    """

    weight_format: QuantFormat | None = None
    input_format: QuantFormat | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ModuleState:
        """A copy whose tensors live on device (formats and meta shared)."""
        return ModuleState(
            self.weight_format,
            self.input_format,
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.meta),
        )

    def merge(self, other: ModuleState) -> None:
        """Take other's formats (where set), tensors and meta; other wins per name.

        A step that sets a weight format replaces the whole weight quantization (codes, scale,
        zero), so a symmetric step after an asymmetric one leaves no stale zero point behind.
        """
        if other.weight_format is not None:
            for t in WEIGHT_TENSORS:
                self.tensors.pop(t, None)
        self.weight_format = other.weight_format or self.weight_format
        self.input_format = other.input_format or self.input_format
        self.tensors.update(other.tensors)
        self.meta.update(other.meta)


@dataclass
class QuantState:
    """All module results of a run plus what made them (recipe, model info, quantlab version)."""

    modules: dict[str, ModuleState] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION

    def update(self, prefix: str, results: dict[str, ModuleState]) -> None:
        """Merge results keyed by layer-relative names under `prefix.` (later steps win per tensor)."""
        for name, ms in results.items():
            self.modules.setdefault(f"{prefix}.{name}" if prefix else name, ModuleState()).merge(ms)

    def save(self, directory: Path) -> None:
        """Write quant_state.json + quant_state.safetensors into directory."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{m}{_SEP}{t}": v.detach().cpu().contiguous()
            for m, ms in self.modules.items()
            for t, v in ms.tensors.items()
        }
        save_file(tensors, str(directory / "quant_state.safetensors"))
        doc = {
            "version": self.version,
            "recipe": self.recipe,
            "model": self.model,
            "modules": {
                m: {
                    "weight_format": ms.weight_format.to_dict() if ms.weight_format else None,
                    "input_format": ms.input_format.to_dict() if ms.input_format else None,
                    "tensors": sorted(ms.tensors),
                    "meta": ms.meta,
                }
                for m, ms in self.modules.items()
            },
        }
        (directory / "quant_state.json").write_text(json.dumps(doc, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> QuantState:
        """Read a state written by save (safetensors only, nothing unpickled)."""
        jpath, tpath = directory / "quant_state.json", directory / "quant_state.safetensors"
        if not jpath.is_file() or not tpath.is_file():
            raise InputError(
                f"No QuantState in {directory}: expected quant_state.json and quant_state.safetensors there."
            )
        try:
            doc = json.loads(jpath.read_text())
        except ValueError as exc:
            raise corrupt_file(jpath, exc, "Re-run the recipe that wrote it.") from None
        if doc.get("version") != STATE_VERSION:
            raise InputError(
                f"QuantState in {directory} has version {doc.get('version')}; this quantlab reads version {STATE_VERSION}."
            )
        flat = load_tensors(tpath, "Re-run the recipe that wrote it.")
        state = cls(recipe=doc["recipe"], model=doc["model"], version=doc["version"])
        for m, d in doc["modules"].items():
            state.modules[m] = ModuleState(
                weight_format=QuantFormat.from_dict(d["weight_format"])
                if d["weight_format"]
                else None,
                input_format=QuantFormat.from_dict(d["input_format"])
                if d["input_format"]
                else None,
                tensors={t: flat[f"{m}{_SEP}{t}"] for t in d["tensors"]},
                meta=d.get("meta", {}),
            )
        return state

    def diff(self, other: QuantState) -> list[str]:
        """Human-readable differences between two states (empty list when equal)."""
        out: list[str] = []
        for m in sorted(set(self.modules) | set(other.modules)):
            a, b = self.modules.get(m), other.modules.get(m)
            if a is None or b is None:
                out.append(f"{m}: only in {'second' if a is None else 'first'}")
                continue
            if a.weight_format != b.weight_format or a.input_format != b.input_format:
                out.append(f"{m}: formats differ")
            for t in sorted(set(a.tensors) | set(b.tensors)):
                ta, tb = a.tensors.get(t), b.tensors.get(t)
                if ta is None or tb is None:
                    out.append(f"{m}.{t}: only in {'second' if ta is None else 'first'}")
                elif ta.shape != tb.shape or ta.dtype != tb.dtype:
                    out.append(
                        f"{m}.{t}: {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}"
                    )
                elif not torch.equal(
                    ta.view(torch.uint8) if ta.dtype.itemsize == 1 else ta,
                    tb.view(torch.uint8) if tb.dtype.itemsize == 1 else tb,
                ):
                    out.append(f"{m}.{t}: values differ")
        return out

"""Layer checkpoints so a killed calibration run continues from its last finished layer.

After each decoder layer the Runner writes, into the resume folder:
  layer_NNNN/              the layer's float tensors after the calibrators' edits (float.safetensors)
                           and its merged ModuleStates (quant_state.json + .safetensors)
  inputs_NNNN.safetensors  the hidden states the next layer reads (one [1, L, H] tensor per window)
  progress.json            {"fingerprint": ..., "done": N}, replaced atomically last
Every file is written under a temporary name and renamed, and progress.json is replaced only
after the files it points to exist, so a SIGKILL at any instant leaves a consistent folder.
A folder whose fingerprint (recipe, model, calibration windows, quantlab version) differs from the
run's is discarded with a warning, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import quantlab
from quantlab.state import ModuleState, QuantState
from quantlab.tensorio import load_tensors

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
_RESUME_FIX = "Delete the resume folder (quantlab clean) and run again from the start."


def fingerprint(
    recipe: dict[str, Any], model: dict[str, Any], windows: Sequence[torch.Tensor]
) -> str:
    """sha256 over what determines the calibration result: recipe parts, model summary, window tokens."""
    h = hashlib.sha256()
    h.update(json.dumps([recipe, model, quantlab.__version__], sort_keys=True).encode())
    for w in windows:
        h.update(w.to(torch.int64).contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


@dataclass
class Resumed:
    """What a resume folder restored: the number of finished layers and the next layer's inputs."""

    done: int
    hidden: list[torch.Tensor]


class LayerCheckpoint:
    """Reads and writes one resume folder (see the module docstring for its layout)."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.fp = fingerprint

    def done(self) -> int:
        """Finished layers recorded for this fingerprint (0 when absent or for another run)."""
        p = self.dir / PROGRESS
        if not p.is_file():
            return 0
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            return 0
        if doc.get("fingerprint") != self.fp:
            log.warning(
                "resume folder %s belongs to a different recipe, model or data; starting over",
                self.dir,
            )
            return 0
        return int(doc.get("done", 0))

    def restore(
        self, layers: nn.ModuleList, prefix: str, state: QuantState, device: torch.device
    ) -> Resumed | None:
        """Load finished layers into layers[:done] (float tensors + ModuleStates) and state; None if nothing to resume."""
        from quantlab.qmodules import apply_module_states

        n = self.done()
        if n == 0:
            self.reset()
            return None
        for i in range(n):
            d = self.dir / f"layer_{i:04d}"
            layer = layers[i]
            tensors = load_tensors(d / "float.safetensors", _RESUME_FIX)
            layer.load_state_dict(tensors, strict=True)
            sub = QuantState.load(d)
            apply_module_states(layer, sub.modules)
            state.update(f"{prefix}.{i}", sub.modules)
        flat = load_tensors(self.dir / f"inputs_{n:04d}.safetensors", _RESUME_FIX, str(device))
        hidden = [flat[f"{j}"] for j in range(len(flat))]
        log.info("resuming after layer %d of %d from %s", n - 1, len(layers), self.dir)
        return Resumed(n, hidden)

    def reset(self) -> None:
        """Empty the folder and record this run's fingerprint with nothing done."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_progress(0)

    def save_layer(
        self,
        index: int,
        float_tensors: dict[str, torch.Tensor],
        states: dict[str, ModuleState],
        next_hidden: Sequence[torch.Tensor],
    ) -> None:
        """Record layer `index` as finished: its float tensors, its ModuleStates, the next layer's inputs."""
        d = self.dir / f"layer_{index:04d}"
        tmp = self.dir / f".layer_{index:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        QuantState(modules=states).save(tmp)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in float_tensors.items()},
            str(tmp / "float.safetensors"),
        )
        tmp.rename(d)
        inputs = self.dir / f"inputs_{index + 1:04d}.safetensors"
        tmp_in = inputs.with_suffix(".tmp")
        save_file(
            {f"{j}": h.detach().cpu().contiguous() for j, h in enumerate(next_hidden)},
            str(tmp_in),
        )
        tmp_in.rename(inputs)
        self._write_progress(index + 1)
        old = self.dir / f"inputs_{index:04d}.safetensors"
        old.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the folder (the run finished)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_progress(self, done: int) -> None:
        tmp = self.dir / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "done": done}))
        os.replace(tmp, self.dir / PROGRESS)

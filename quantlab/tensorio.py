"""safetensors reads that turn a truncated or corrupt file into an InputError naming it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from quantlab.errors import corrupt_file, environment_failure


def check_safetensors(path: Path | str, fix: str) -> None:
    """Raise InputError unless path's header parses and covers the whole file (cheap: no data read)."""
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except SafetensorError as exc:
        raise corrupt_file(path, exc, fix) from None
    except OSError as exc:
        raise environment_failure(exc, f"reading {path}") from None


def load_tensors(path: Path | str, fix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on device; InputError (with `fix`) if it is corrupt."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise corrupt_file(path, exc, fix) from None
    except OSError as exc:
        raise environment_failure(exc, f"reading {path}") from None

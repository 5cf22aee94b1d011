"""The HF-layout export formats (modelopt_hf, compressed_tensors) as a registry: each writes a
folder from a run's `quantlab/` folder (QuantState + float tensors), so a run writes them after
its checkpoint and `quantlab export RUN_DIR --format ...` writes them later without recalibrating."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from quantlab.errors import InputError
from quantlab.export.manifest import add_to_manifest
from quantlab.state import QuantState


def _write_compressed(reload_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    from quantlab.export.compressed import float_model_from_run, write_compressed_tensors

    model, tok = float_model_from_run(reload_dir)
    write_compressed_tensors(model, QuantState.load(reload_dir), out, tok)


def _write_modelopt(reload_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    from quantlab.export.modelopt_hf import write_modelopt_hf

    write_modelopt_hf(reload_dir, out, dtype)


def _why_compressed(state: QuantState) -> str | None:
    from quantlab.export.compressed import supported

    return supported(state)


def _why_modelopt(state: QuantState) -> str | None:
    from quantlab.export.modelopt_hf import state_algo

    try:
        state_algo(state)
    except InputError as exc:
        return str(exc)
    return None


Writer = Callable[[Path, Path, "torch.dtype | None"], None]
# format -> (writer, why-not check of a QuantState)
HF_FORMATS: dict[str, tuple[Writer, Callable[[QuantState], str | None]]] = {
    "compressed_tensors": (_write_compressed, _why_compressed),
    "modelopt_hf": (_write_modelopt, _why_modelopt),
}


def write_format(fmt: str, reload_dir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write format fmt of the run whose `quantlab/` folder is reload_dir into out (created)."""
    writer, _ = HF_FORMATS[fmt]
    writer(reload_dir, out, dtype)
    return out


def reexport(run_dir: Path, fmt: str, overwrite: bool = False) -> Path:
    """Write run_dir/<fmt> from a finished run's `quantlab/` folder (temporary folder + rename)."""
    if fmt not in HF_FORMATS:
        raise InputError(f"Unknown export format {fmt!r}; re-exportable: {', '.join(HF_FORMATS)}.")
    run_dir = Path(run_dir)
    reload_dir = run_dir / "quantlab"
    if not (reload_dir / "quant_state.json").is_file():
        raise InputError(
            f"{run_dir} is not a finished `quantlab run` folder (no quantlab/quant_state.json)."
        )
    dest = run_dir / fmt
    if dest.exists() and not overwrite:
        raise InputError(f"{dest} exists; pass --overwrite to write it again.")
    state = QuantState.load(reload_dir)
    why = HF_FORMATS[fmt][1](state)
    if why:
        raise InputError(f"{fmt} cannot express this run: {why}")
    tmp = run_dir / f".{fmt}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_format(fmt, reload_dir, tmp, _export_dtype(state))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    add_to_manifest(run_dir, dest, fmt)
    return dest


def _export_dtype(state: QuantState) -> torch.dtype | None:
    """The recipe's export.dtype recorded in the run's QuantState (None when absent)."""
    from quantlab.export.trtllm import DTYPES

    name = (state.recipe.get("export") or {}).get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None

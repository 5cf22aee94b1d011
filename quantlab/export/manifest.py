"""manifest.json: the provenance of an output folder, and its verification.

Written last into the temporary folder before it is renamed into place: sha256 and size of every
file in the folder, of the model's source files (config, weights, tokenizer) and of the data
files, the resolved recipe, the versions of quantlab / torch / transformers / safetensors, the git
commit of the quantlab checkout when there is one, the device, the calibration time and the
accuracy summary.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from quantlab.embedded import sha256_file

MANIFEST = "manifest.json"
SCHEMA = "quantlab-manifest/1"
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def folder_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every file under folder except the manifest."""
    return {
        str(p.relative_to(folder)): _entry(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def model_files(folder: Path | None) -> dict[str, dict[str, Any]]:
    """Hashes of a model folder's config, tokenizer and safetensors files ({} when not local)."""
    if folder is None or not folder.is_dir():
        return {}
    picked = [folder / n for n in _MODEL_FILES] + sorted(folder.glob("*.safetensors"))
    return {p.name: _entry(p) for p in picked if p.is_file()}


def _git_commit() -> dict[str, Any] | None:
    """The commit (and whether the tree has local changes) of the quantlab checkout, if any."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, Any]:
    """Versions of the packages that determine the result."""
    import safetensors
    import torch
    import transformers

    import quantlab

    return {
        "quantlab": quantlab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "git": _git_commit(),
    }


def device_info(device: str) -> dict[str, Any]:
    """The device the run calibrated on, with the GPU name when it is one."""
    import torch

    info: dict[str, Any] = {"device": device, "host": platform.node(), "cpu": platform.processor()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_manifest(
    folder: Path,
    recipe: dict[str, Any],
    model_folder: Path | None,
    data: dict[str, Path],
    device: str,
    summary: dict[str, Any],
) -> Path:
    """Write folder/manifest.json over everything already in folder; its path."""
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": folder_files(folder),
        "model": {
            "source": recipe.get("model", {}).get("source"),
            "folder": str(model_folder) if model_folder else None,
            "files": model_files(model_folder),
        },
        "data": {k: {"path": str(p), **_entry(p)} for k, p in data.items() if p.is_file()},
        "recipe": recipe,
        "versions": versions(),
        "device": device_info(device),
        "calibration_seconds": summary.get("calibration_seconds"),
        "calibration_windows": summary.get("calibration_windows"),
        "accuracy": summary.get("accuracy"),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(doc, indent=2))
    return path


def add_to_manifest(folder: Path, sub: Path, what: str) -> None:
    """Record the files of sub (written into folder after the run) in folder's manifest, if any."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    doc = json.loads(path.read_text())
    prefix = str(sub.relative_to(folder))
    doc["files"] = {k: v for k, v in doc["files"].items() if not k.startswith(prefix + "/")}
    doc["files"].update({f"{prefix}/{k}": v for k, v in folder_files(sub).items()})
    doc.setdefault("added_later", []).append(
        {"what": what, "folder": prefix, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def verify_manifest(folder: Path) -> list[str]:
    """One line per file that is missing, changed or not listed in folder's manifest."""
    path = folder / MANIFEST
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA:
        return [f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}"]
    want: dict[str, dict[str, Any]] = doc.get("files", {})
    have = {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    }
    problems = []
    for rel, entry in sorted(want.items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: changed since it was written (sha256 differs)")
    for rel in sorted(have - set(want)):
        problems.append(f"{rel}: not listed in the manifest (added later)")
    return problems

"""`quantlab report`: measure each quantized variant against the reference and write report.json + report.html."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantlab import __version__
from quantlab.adapters import adapter_for
from quantlab.data import DataSpec, load_windows
from quantlab.errors import InputError, environment_failure
from quantlab.evaluate import ReferenceCache
from quantlab.models import load_model, model_info
from quantlab.outdir import output_lock, publish
from quantlab.report import metrics
from quantlab.report.html import render
from quantlab.report.layers import analyse_layers, reference_passes
from quantlab.report.summary import markdown_summary
from quantlab.report.tasks import MCTask, load_tasks, score_task, task_diff, task_summary
from quantlab.report.tokens import compare_tokens
from quantlab.state import QuantState

log = logging.getLogger(__name__)
SCHEMA = "quantlab.report/1"
# Fields of model_info that must agree between the reference and a variant's QuantState.
_SAME_MODEL = (
    "architecture",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_heads",
    "num_kv_heads",
)


@dataclass
class ReportOptions:
    """What to measure: data, windows, layer analysis and tasks."""

    data: DataSpec | None = None  # None: the evaluation data of the first variant's recipe
    windows: int | None = None  # override num_samples of the data
    layer_windows: int = 4  # windows of the per-linear / per-layer analysis (0: none)
    sensitivity: bool = True
    tasks: list[Path] = field(default_factory=list)
    device: str = "cpu"
    dtype: str | None = None  # None: the dtype the first variant was calibrated in
    show_progress: bool = True


@dataclass
class Variant:
    """A `quantlab run` output folder and its reloadable model folder."""

    name: str
    path: Path
    reload_dir: Path
    state: QuantState
    accuracy: dict[str, Any]
    manifest: dict[str, Any]


def find_variant(path: Path) -> Variant:
    """The variant in a run output folder (or its quantlab/ subfolder); InputError when it is none."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a folder. Pass the output folder of a `quantlab run`.")
    if (path / "quantlab").is_dir():
        run_dir, reload_dir = path, path / "quantlab"
    else:  # the quantlab/ subfolder itself, or a bare reloadable folder
        run_dir, reload_dir = (path.parent if path.name == "quantlab" else path), path
    if not (reload_dir / "quant_state.json").is_file():
        raise InputError(
            f"{path} holds no QuantState (no quantlab/quant_state.json): it is not the output "
            "folder of a finished `quantlab run`. Run the recipe first, or pass its export.output_dir."
        )
    state = QuantState.load(reload_dir)
    acc = _read_json(run_dir / "accuracy.json")
    man = _read_json(run_dir / "manifest.json")
    name = str(acc.get("recipe") or state.recipe.get("name") or run_dir.name)
    return Variant(name, run_dir, reload_dir, state, acc, man)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        doc = {}
    return doc if isinstance(doc, dict) else {}


def evaluation_data(v: Variant) -> DataSpec:
    """The evaluation data spec the variant's run used, with its file path as the run resolved it."""
    ev = (v.state.recipe.get("evaluation") or {}).get("data")
    if not ev:
        raise InputError(
            f"The recipe of {v.path} has no evaluation data; pass --data FILE to say what to measure on."
        )
    spec = DataSpec.model_validate(ev)
    resolved = (v.manifest.get("data") or {}).get("evaluation.data", {}).get("path")
    if resolved:
        spec = spec.model_copy(update={"path": resolved})
    if spec.source == "file" and spec.path and not Path(spec.path).is_file():
        raise InputError(
            f"The evaluation data of {v.path} ({spec.path}) is not there any more; pass --data FILE."
        )
    return spec


def check_same_model(ref_info: dict[str, Any], v: Variant) -> None:
    """InputError when the variant was quantized from another model than the reference."""
    bad = [k for k in _SAME_MODEL if v.state.model.get(k) != ref_info.get(k)]
    if bad:
        detail = ", ".join(f"{k} {v.state.model.get(k)} vs {ref_info.get(k)}" for k in bad)
        raise InputError(
            f"{v.path} was quantized from another model than the reference ({detail}). Pass the "
            "float model that variant was made from as REF."
        )


def make_report(
    ref_source: str,
    variant_dirs: list[Path],
    output: Path,
    opts: ReportOptions,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Measure every variant, write report.json / report.html / summary.md into output; the document."""
    variants = [find_variant(p) for p in variant_dirs]
    if not variants:
        raise InputError("Pass at least one QUANT folder (a `quantlab run` output).")
    spec = opts.data or evaluation_data(variants[0])
    if opts.windows:
        spec = spec.model_copy(update={"num_samples": opts.windows})
    tasks = load_tasks(opts.tasks)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise InputError(
            f"Report folder {output} exists and is not empty; pass --overwrite or another --output."
        )
    dtype = opts.dtype or str(
        (variants[0].state.recipe.get("model") or {}).get("dtype") or "float32"
    )
    t0 = time.perf_counter()
    ref, tok = load_model(ref_source, dtype, opts.device)
    ref_info = model_info(ref)
    for v in variants:
        check_same_model(ref_info, v)
    adapter = adapter_for(ref)
    windows = load_windows(spec, tok, ref)
    cache = ReferenceCache()
    n_layer = min(opts.layer_windows, len(windows))
    passes = reference_passes(ref, adapter, windows[:n_layer]) if n_layer else None
    ref_tasks = [(t, score_task(ref, tok, t, spec.bos_id, opts.show_progress)) for t in tasks]
    bos = spec.bos_id
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "quantlab_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": {"source": ref_source, "model": ref_info, "dtype": dtype},
        "data": {
            **spec.model_dump(mode="json"),
            "windows": len(windows),
            "tokens": sum(len(w) - 1 for w in windows),
            "layer_windows": n_layer,
            "excluded_positions": [0],
        },
        "bootstrap": {
            "confidence": metrics.CONFIDENCE,
            "resamples": metrics.RESAMPLES,
            "block_tokens": metrics.BLOCK_TOKENS,
            "seed": metrics.SEED,
        },
        "tasks_reference": [task_summary(t, s) for t, s in ref_tasks],
        "variants": [],
    }
    from quantlab.export.reload import load_quantized

    for v in variants:
        log.info("report: measuring %s", v.path)
        quant, _ = load_quantized(v.reload_dir, opts.device)
        doc["variants"].append(
            _measure(v, ref, quant, tok, adapter, windows, cache, passes, ref_tasks, bos, opts)
        )
        del quant
        gc.collect()
    doc["seconds"] = time.perf_counter() - t0
    write_report(doc, output, overwrite)
    return doc


def _measure(
    v: Variant,
    ref: torch.nn.Module,
    quant: torch.nn.Module,
    tok: Any,
    adapter: Any,
    windows: list[torch.Tensor],
    cache: ReferenceCache,
    passes: Any,
    ref_tasks: list[tuple[MCTask, Any]],
    bos: int | None,
    opts: ReportOptions,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    tokens = compare_tokens(ref, quant, windows, cache, "ref", opts.show_progress)
    entry: dict[str, Any] = {
        "name": v.name,
        "path": str(v.path),
        "quant_algo": v.accuracy.get("quant_algo") or v.manifest.get("quant_algo"),
        "steps": [s.get("calibrator") for s in v.state.recipe.get("steps", [])],
        "model": tokens.summary(tok, windows),
        "linears": [],
        "layers": [],
    }
    if passes is not None:
        la = analyse_layers(
            ref, quant, v.state, adapter, passes, opts.sensitivity, opts.show_progress
        )
        entry["linears"], entry["layers"] = la.linears, la.layers
    entry["tasks"] = [
        task_diff(t, s, score_task(quant, tok, t, bos, opts.show_progress)) for t, s in ref_tasks
    ]
    entry["seconds"] = time.perf_counter() - t0
    return entry


def write_report(doc: dict[str, Any], output: Path, overwrite: bool) -> None:
    """report.json, report.html and summary.md into output, through a temp folder and a rename."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(output):
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            (tmp / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
            (tmp / "report.html").write_text(render(doc), encoding="utf-8")
            (tmp / "summary.md").write_text(markdown_summary(doc), encoding="utf-8")
            publish(tmp, output, overwrite)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise environment_failure(exc, f"writing the report {output}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

"""Checks of a validated recipe against the files it names, before any weight is loaded.

`quantlab validate --deep` prints them and `quantlab run` refuses on them: the model folder
(config.json fields, safetensors headers, tokenizer, adapter), every divisibility the export
needs (group sizes per layer, tp/pp against heads, KV heads, layers and padding), data paths and
their token counts, and the output folder (existing, locked, writable, free space). Every problem
is listed at once, each naming the recipe key that set it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.data import DataSpec
from quantlab.embedded import embedded_cached_dir, embedded_model_dir, is_embedded
from quantlab.errors import InputError, QuantlabError
from quantlab.outdir import check_writable, lock_path, read_lock, resume_dir
from quantlab.recipe import Recipe, resolve_path
from quantlab.zoo import is_zoo

# The fields the export and the runtime read from config.json.
REQUIRED_CONFIG = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Findings:
    """Problems (run would refuse) and notes (worth knowing, not fatal) about one recipe."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_if_any(self, recipe: str) -> None:
        """InputError listing every problem."""
        if self.problems:
            raise InputError(f"Recipe '{recipe}' cannot run:\n  " + "\n  ".join(self.problems))


class ConfigView(dict[str, Any]):
    """config.json as a dict whose keys also read as attributes (what the export planner reads)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def model_folder(recipe: Recipe, base: Path, fetch: bool) -> tuple[Path | None, str | None]:
    """(local folder of the recipe's model or None, a problem or note about it)."""
    source = recipe.model.source
    if is_embedded(source):
        if fetch:
            return embedded_model_dir(), None
        cached = embedded_cached_dir()
        return cached, None if cached else "note: the embedded model is fetched on first use"
    if is_zoo(source):
        from quantlab.zoo import zoo_cached_dir, zoo_entry, zoo_model_dir

        try:
            zoo_entry(source)
        except InputError as exc:
            return None, f"model.source: {exc}"
        if fetch:
            return zoo_model_dir(source), None
        cached = zoo_cached_dir(source)
        return cached, None if cached else f"note: {source} is fetched on first use"
    local = resolve_path(base, source)
    if local.exists():
        return local, None
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return (
            None,
            f"note: model.source {source!r} is not a local folder; run treats it as a Hub id",
        )
    return None, (
        f"model.source: {source!r} does not exist (resolved against the recipe's folder "
        f"{base} to {local}). Point it at a Hugging Face folder (config.json + *.safetensors) "
        "or use embedded:smollm2."
    )


def read_model_config(folder: Path, findings: Findings) -> ConfigView | None:
    """config.json of a model folder, with a problem for each missing piece; None if unreadable."""
    from quantlab.tensorio import check_safetensors

    cfg_path = folder / "config.json"
    if not folder.is_dir():
        findings.problems.append(f"model.source: {folder} is a file, not a model folder.")
        return None
    if not cfg_path.is_file():
        findings.problems.append(
            f"model.source: {folder} has no config.json, so it is not a Hugging Face model folder."
        )
        return None
    try:
        cfg = ConfigView(json.loads(cfg_path.read_text()))
    except (OSError, ValueError) as exc:
        findings.problems.append(f"model.source: {cfg_path} is not valid JSON ({exc}).")
        return None
    missing = [k for k in REQUIRED_CONFIG if not isinstance(cfg.get(k), int)]
    if missing:
        findings.problems.append(
            f"model.source: {cfg_path} lacks {', '.join(missing)} (or they are not integers); "
            "quantlab needs them to plan the layers. Re-save the config with transformers."
        )
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        findings.problems.append(
            f"model.source: {folder} has no *.safetensors weights (quantlab never unpickles "
            ".bin files); re-save with model.save_pretrained(folder, safe_serialization=True)."
        )
    for shard in shards:
        try:
            check_safetensors(shard, "Copy or download the model again.")
        except QuantlabError as exc:
            findings.problems.append(f"model.source: {exc}")
    if (
        not (folder / "tokenizer.json").is_file()
        and not (folder / "tokenizer_config.json").is_file()
    ):
        findings.problems.append(
            f"model.source: {folder} has no tokenizer (tokenizer.json); save the tokenizer "
            "into the model folder."
        )
    return None if missing else cfg


def _export_checks(recipe: Recipe, cfg: ConfigView, findings: Findings) -> None:
    from quantlab.adapters import adapter_for_architectures
    from quantlab.calibrator import build_calibrator
    from quantlab.export.trtllm import ExportConfig, plan_export
    from quantlab.pipeline import (
        check_architecture_formats,
        planned_formats,
        trtllm_excludes,
        whole_model_step,
    )

    try:
        archs = list(cfg.get("architectures") or [])
        adapter = adapter_for_architectures(archs).resolve(cfg)
        check_architecture_formats(recipe, adapter, archs[0] if archs else "?")
        steps = [build_calibrator(s.calibrator, s.args) for s in recipe.steps]
        whole = whole_model_step(steps, recipe)
        wf, af = planned_formats(steps)
        ecfg = ExportConfig(
            Path("."),
            recipe.export.dtype,
            recipe.export.tp_size,
            recipe.export.pp_size,
            recipe.export.trtllm_sm,
            "trtllm" in recipe.export.formats,
        )
        plan = plan_export(cfg, adapter, wf, af, ecfg)
        if "trtllm" in recipe.export.formats:
            trtllm_excludes(recipe, adapter, plan.dims["layers"], recipe.export.pp_size)
    except InputError as exc:
        findings.problems.append(f"steps/export: {exc}")
        return
    # The KV-cache format the run will export: a kv_cache step's, or the vendor step's own.
    kv = next(
        (str(s.args.get("format", "int8")) for s in recipe.steps if s.calibrator == "kv_cache"),
        None,
    )
    kv = kv or (getattr(whole.args, "kv_cache", None) if whole is not None else None)
    if "compressed_tensors" in recipe.export.formats:
        from quantlab.export.compressed import planned_problem

        kv_any = kv is not None or any(s.calibrator == "kv_equalize" for s in recipe.steps)
        why = planned_problem(wf, af, kv_any)
        if whole is not None and getattr(whole.args, "algorithm", "") in (
            "int4_awq",
            "int8_smoothquant",
        ):
            why = why or (
                f"ModelOpt's {whole.args.algorithm} keeps smoothing scales it cannot fold "
                "(pre_quant_scale), which compressed-tensors cannot carry; use trtllm or modelopt_hf"
            )
        if why:
            findings.problems.append(f"export.format: compressed_tensors cannot be written: {why}")
    if "modelopt_hf" in recipe.export.formats:
        from quantlab.export import modelopt_hf

        why = modelopt_hf.planned_problem(wf, af, kv)
        if why:
            findings.problems.append(f"export.format: modelopt_hf cannot be written: {why}")


def _data_checks(
    key: str, spec: DataSpec, base: Path, folder: Path | None, findings: Findings, tokenize: bool
) -> None:
    if spec.source != "file" or not spec.path:
        if spec.source == "hf":
            findings.notes.append(f"note: {key}.path {spec.path!r} is a Hub dataset, not checked")
        return
    path = resolve_path(base, spec.path)
    if not path.is_file():
        hint = ""
        if "QUANTLAB_DATA_DIR" not in os.environ:
            hint = (
                " The repository's recipes read ${QUANTLAB_DATA_DIR:-../../shared/data}: for a "
                "recipe copied elsewhere, set QUANTLAB_DATA_DIR to the data folder."
            )
        findings.problems.append(
            f"{key}.path: data file {spec.path!r} does not exist (relative paths are resolved "
            f"against the recipe's folder {base}, giving {path}).{hint}"
        )
        return
    if not tokenize or folder is None or path.suffix.lower() != ".txt" or spec.packing != "concat":
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    n_tokens = len(
        tok(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False).input_ids
    )
    extra = 1 if spec.bos_id is not None else 0
    windows = (n_tokens + extra) // spec.seq_len
    if windows < spec.num_samples:
        findings.notes.append(
            f"note: {key}.num_samples={spec.num_samples} asks for {spec.num_samples} windows of "
            f"{spec.seq_len} tokens; {path} has {n_tokens} tokens, so {windows} windows are used."
        )


def estimate_output_bytes(recipe: Recipe, folder: Path | None, cfg: ConfigView | None) -> int:
    """About how many bytes the run writes: checkpoint + reloadable copy + resume state."""
    if folder is None:
        return 0
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    meta: dict[str, Any] = dict(cfg or {})
    src_bytes = _BYTES.get(str(meta.get("torch_dtype") or meta.get("dtype")), 4)
    elements = stored // src_bytes
    out = 2 * elements * _BYTES[recipe.export.dtype]
    if recipe.runner.resume:
        out += elements * _BYTES[recipe.model.dtype]
    return out


def _output_checks(
    recipe: Recipe, base: Path, need: int, findings: Findings, check_lock: bool
) -> None:
    out_dir = resolve_path(base, recipe.export.output_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not recipe.export.overwrite:
        findings.problems.append(
            f"export.output_dir: {out_dir} exists and is not empty. Remove it, choose another "
            "export.output_dir, or set export.overwrite: true (--set export.overwrite=true)."
        )
    holder = read_lock(lock_path(out_dir))
    if check_lock and holder is not None and holder.live() and holder.pid != os.getpid():
        findings.problems.append(
            f"export.output_dir: {out_dir} is locked by another run ({holder.describe()})."
        )
    findings.problems.extend(check_writable(out_dir, need))
    if (resume_dir(out_dir) / "progress.json").is_file():
        findings.notes.append(
            f"note: {resume_dir(out_dir)} holds finished layers of an earlier run; run continues "
            "from them if the recipe, model and data are unchanged"
        )


def check_recipe(
    recipe: Recipe, base: Path, fetch: bool = False, tokenize: bool = True, check_lock: bool = True
) -> Findings:
    """Every problem the recipe would meet before calibrating, without loading weights.

    fetch: fetch the embedded model if it is not cached; tokenize: count the data's tokens;
    check_lock: report a live lock (run takes the lock itself and exits with EXIT_BUSY).
    """
    findings = Findings()
    folder, msg = model_folder(recipe, base, fetch)
    if msg:
        (findings.notes if msg.startswith("note:") else findings.problems).append(msg)
    cfg = read_model_config(folder, findings) if folder is not None else None
    if cfg is not None:
        _export_checks(recipe, cfg, findings)
    from quantlab.calibrator import build_calibrator

    steps_need_data = any(build_calibrator(s.calibrator, s.args).needs_data for s in recipe.steps)
    if steps_need_data and recipe.calibration is None:
        findings.problems.append(
            f"calibration: step(s) {', '.join(s.calibrator for s in recipe.steps)} need "
            "calibration data; add a `calibration:` section (source: file | hf | model)."
        )
    if recipe.calibration is not None and steps_need_data:
        _data_checks("calibration", recipe.calibration, base, folder, findings, tokenize)
    if recipe.evaluation.enabled:
        if recipe.evaluation.data is None:
            findings.problems.append(
                "evaluation.data: evaluation is enabled but no data is set; add evaluation.data "
                "or set evaluation.enabled: false."
            )
        else:
            _data_checks(
                "evaluation.data", recipe.evaluation.data, base, folder, findings, tokenize
            )
    if recipe.report.enabled:
        _report_checks(recipe, base, findings)
    need = estimate_output_bytes(recipe, folder, cfg)
    _output_checks(recipe, base, need, findings, check_lock)
    return findings


def _report_checks(recipe: Recipe, base: Path, findings: Findings) -> None:
    if recipe.evaluation.data is None:
        findings.problems.append(
            "report: the report measures on evaluation.data; add it (or set report.enabled: false)."
        )
    for i, t in enumerate(recipe.report.tasks):
        path = resolve_path(base, t)
        if not path.exists():
            findings.problems.append(
                f"report.tasks[{i}]: {t!r} does not exist (resolved against the recipe's folder "
                f"{base}, giving {path}). Pass a BIG-bench .json, an MMLU .csv or a folder of them."
            )

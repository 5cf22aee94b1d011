"""`quantlab run`: load -> calibrate -> export -> accuracy summary, for one recipe, atomically."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quantlab.adapters import adapter_for
from quantlab.budget import apply_budget, budget_of
from quantlab.calibrator import Calibrator, build_calibrator
from quantlab.data import DataSpec, load_windows
from quantlab.errors import (
    EXIT_BUG,
    EnvironmentFailure,
    InputError,
    QuantlabError,
    environment_failure,
    first_line,
)
from quantlab.evaluate import AccuracyReport, ReferenceCache, compare_models
from quantlab.export.manifest import write_manifest
from quantlab.export.reload import save_reloadable
from quantlab.export.trtllm import DTYPES, QKV, ExportConfig, plan_export, write_trtllm_checkpoint
from quantlab.formats import QuantFormat
from quantlab.models import check_tokenizer, load_model, model_info
from quantlab.outdir import (
    failure_hint,
    keep_failed_log,
    output_lock,
    process_alive,
    publish,
    resume_dir,
)
from quantlab.qmodules import apply_state
from quantlab.recipe import Recipe, resolve_path
from quantlab.resume import fingerprint
from quantlab.runner import LayerProfile, RunnerConfig, quantizable_linears, quantize_model
from quantlab.state import QuantState

log = logging.getLogger(__name__)


class ExportCheckFailed(QuantlabError):
    """quantlab's own output breaks a consumer rule: a bug, reported as such."""

    exit_code = EXIT_BUG


@dataclass
class RunResult:
    """What a recipe run produced."""

    name: str
    output_dir: Path
    quant_algo: str | None
    calibration_seconds: float
    accuracy: AccuracyReport | None


def planned_formats(steps: list[Calibrator]) -> tuple[QuantFormat | None, QuantFormat | None]:
    """Final (weight, input) formats of an ordered list of steps: later steps override earlier ones."""
    wf: QuantFormat | None = None
    af: QuantFormat | None = None
    for cal in steps:
        w, a = cal.planned_formats()
        wf, af = w or wf, a or af
    return wf, af


def whole_model_step(steps: list[Calibrator], recipe: Recipe) -> Any | None:
    """The recipe's whole-model step (the `modelopt` reference), or None; InputError when it is
    combined with anything the Runner would have to apply (other steps, exclusions, a budget)."""
    whole = [c for c in steps if getattr(c, "whole_model", False)]
    if not whole:
        return None
    if len(steps) > 1:
        raise InputError(
            f"steps: '{whole[0].name}' runs the vendor's whole flow (weights, activations and "
            "its own KV cache via its `kv_cache` argument), so it must be the only step; "
            "remove the others."
        )
    if recipe.runner.exclude or recipe.budget.max_ppl_increase is not None:
        raise InputError(
            f"steps: '{whole[0].name}' applies the vendor's own exclusions; remove runner.exclude "
            "and the budget section from this recipe."
        )
    return whole[0]


def _model_source(source: str, base: Path) -> str:
    if source.startswith(("embedded", "zoo:")):
        return source
    local = resolve_path(base, source)
    if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return str(local)
    return source  # looks like a hub id: "org/name"


def _check_own_export(tmp: Path) -> None:
    """Refuse to publish a folder that quantlab check-export finds problems in (a quantlab bug):
    the manifest, the TensorRT-LLM checkpoint when there is one, every HF-layout subfolder."""
    from quantlab.export.check import NOTE, check_export

    lines = check_export(tmp)
    for note in (x for x in lines if x.startswith(NOTE)):
        log.warning("%s", note.removeprefix(NOTE))
    problems = [x for x in lines if not x.startswith(NOTE)]
    if problems:
        raise ExportCheckFailed(
            f"The checkpoint written in {tmp} breaks {len(problems)} rule(s) of its consumer "
            "(kept there, not published):\n  " + "\n  ".join(problems[:20]) + "\nThis is a "
            "quantlab bug; please report it with this message."
        )


def _model_folder(recipe: Recipe, base: Path) -> Path | None:
    """The local folder the model was loaded from (None for a Hub id)."""
    from quantlab.preflight import model_folder

    folder, _ = model_folder(recipe, base, fetch=True)
    return folder if folder is not None and folder.is_dir() else None


def _data_files(recipe: Recipe, base: Path) -> dict[str, Path]:
    """Local data files of the recipe by key (calibration, evaluation.data)."""
    out: dict[str, Path] = {}
    for key, spec in (
        ("calibration", recipe.calibration),
        ("evaluation.data", recipe.evaluation.data),
    ):
        if spec is not None and spec.source == "file" and spec.path:
            out[key] = resolve_path(base, spec.path)
    return out


def _data(spec: DataSpec, base: Path) -> DataSpec:
    if spec.source == "file" and spec.path:
        return spec.model_copy(update={"path": str(resolve_path(base, spec.path))})
    return spec


# TensorRT-LLM's own exclude list (quantize_layers in tensorrt_llm/quantization/quantize.py, the
# 2025 main line): a config.json list replaces it, so ours starts with it. Without
# *vocab_embedding, W8A16/W4A16 would turn the embedding into a weight-only quantized one.
TRTLLM_DEFAULT_EXCLUDES = (
    "*lm_head",
    "*router",
    "*vocab_embedding",
    "*position_embedding",
    "*block_embedding",
    "*shared_expert_gate",
    "*fused_a",
)


def check_architecture_formats(recipe: Recipe, adapter: Any, arch: str) -> None:
    """InputError, before any work, when an export format has no layout for this architecture."""
    formats = recipe.export.formats
    if "trtllm" in formats and adapter.trtllm_architecture is None:
        others = [f for f in formats if f != "trtllm"]
        raise InputError(
            f"export.format: quantlab writes no TensorRT-LLM checkpoint for {arch} (docs/models.md, "
            "architectures: which families have one). Its deployment path is an HF-layout export: "
            "set export.format to modelopt_hf and/or compressed_tensors"
            + (f" (drop trtllm from {formats})." if others else ".")
        )
    if adapter.experts is not None and "compressed_tensors" in formats:
        raise InputError(
            f"export.format: compressed_tensors of a sparse-MoE model ({arch}) is not written "
            "yet: transformers 5 loads experts fused, and the compressed-tensors library "
            "quantizes linears only. Use modelopt_hf (per-expert names, as ModelOpt writes them) "
            "or the quantlab folder only (export.format: []); docs/models.md lists what each "
            "architecture exports."
        )


def under_calibrated(state: QuantState, adapter: Any) -> dict[str, Any] | None:
    """The linears a calibrator fell back on for lack of calibration tokens (MoE experts the router
    rarely picked): counts, what was done, and the names; None for a dense model."""
    if adapter.experts is None:
        return None
    fell = {n: ms.meta for n, ms in state.modules.items() if "fallback" in ms.meta}
    where = re.compile(
        re.escape(adapter.layers) + r"\.(\d+)\." + re.escape(adapter.experts.fused) + r"\.(\d+)\."
    )
    experts = {tuple(int(g) for g in m.groups()) for n in fell if (m := where.match(n))}
    n_exp = len({n for n in adapter.linears if adapter.is_expert(n)}) // 3
    actions = sorted({str(m["fallback"]) for m in fell.values()})
    names = sorted(fell)
    out: dict[str, Any] = {
        "linears": len(fell),
        "experts": len(experts),
        "experts_per_layer": n_exp,
        "layer_expert": [f"{i}:{e}" for i, e in sorted(experts)],
        "actions": actions,
        "names": names[:50],
    }
    if fell:
        log.warning(
            "%d expert linear(s) saw too few calibration tokens and were quantized by fallback "
            "(%s): %s%s",
            len(fell),
            ", ".join(actions),
            ", ".join(names[:5]),
            " ..." if len(fell) > 5 else "",
        )
    return out


def trtllm_excludes(
    recipe: Recipe, adapter: Any, n_layers: int, pp_size: int = 1, float_layers: Sequence[int] = ()
) -> list[str]:
    """exclude_modules: TensorRT-LLM's defaults plus each layer linear the runner leaves unquantized
    (and every linear of the float_layers an accuracy budget kept in float).

    Each excluded linear is written twice: as a module name (matched when the network is built)
    and as its weight's tensor name (matched by the weight-only preprocessing of the checkpoint).
    """
    layers_of: dict[str, set[int]] = {}
    fused = set(adapter.fused_groups[0])
    for i in range(n_layers):
        kept = set(quantizable_linears(adapter, f"{adapter.layers}.{i}", recipe.runner.exclude))
        if i in float_layers:
            kept = set()
        off = [n for n in adapter.linears if n not in kept]
        if set(off) & fused and not fused <= set(off):
            raise InputError(
                f"runner.exclude leaves part of q/k/v of layer {i} quantized; TensorRT-LLM fuses "
                "them into one qkv GEMM, so exclude all three or none."
            )
        for n in off:
            layers_of.setdefault(adapter.trtllm_layer_names[QKV if n in fused else n], set()).add(i)
    patterns: list[str] = []
    for name, idx in sorted(layers_of.items()):
        if len(idx) == n_layers:
            where = ["*"]
        elif pp_size > 1:
            raise InputError(
                f"runner.exclude leaves {name} unquantized in layers {sorted(idx)} only; with "
                "pp_size > 1 TensorRT-LLM numbers layers per pipeline rank under one config, so "
                "a per-layer exclude cannot be expressed. Exclude it in every layer or use pp 1."
            )
        else:
            where = [str(i) for i in sorted(idx)]
        for w in where:
            patterns += [f"transformer.layers.{w}.{name}", f"transformer.layers.{w}.{name}.weight"]
    return ["lm_head", *TRTLLM_DEFAULT_EXCLUDES, *patterns]


def _remove_stale_tmp(out_dir: Path) -> None:
    """Delete unfinished temporary folders of killed runs for out_dir (a finished one is kept)."""
    for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            if (old / "accuracy.json").is_file():  # complete: only its final rename was missed
                log.warning("%s holds a finished checkpoint of a killed run; keeping it", old)
                continue
            log.warning("removing %s left by a killed run", old)
            shutil.rmtree(old, ignore_errors=True)


def _fingerprint(recipe: Recipe, model: dict[str, Any], windows: list[torch.Tensor]) -> str:
    """Identity of a calibration: the recipe parts that change its result, the model, the tokens."""
    parts = recipe.model_dump(
        mode="json", include={"model", "calibration", "steps", "runner", "export"}
    )
    parts["export"] = {"dtype": parts["export"]["dtype"]}  # scales are stored in this dtype
    parts["model"].pop("device", None)
    parts["runner"].pop("resume", None)
    parts["runner"].pop("offload", None)
    return fingerprint(parts, model, windows)


def _profile_summary(profile: list[LayerProfile], device: str, offload: bool) -> dict[str, Any]:
    """Per-layer seconds and peak memory, plus the maxima, for accuracy.json."""
    host = [p.peak_host_mb for p in profile if p.peak_host_mb is not None]
    dev = [p.peak_device_mb for p in profile if p.peak_device_mb is not None]
    return {
        "device": device,
        "offload": offload,
        "peak_host_mb": max(host, default=None),
        "peak_device_mb": max(dev, default=None),
        "layers": [asdict(p) for p in profile],
    }


def run_recipe(
    recipe: Recipe, base: Path, show_progress: bool = True, ref_cache: ReferenceCache | None = None
) -> RunResult:
    """Run one validated recipe; the output directory appears only when everything succeeded.

    Before any weight is loaded the recipe is checked against its files (quantlab.preflight) and
    the output folder's lock is taken; a failure keeps the resume state and the log and says where.
    """
    from quantlab.preflight import check_recipe

    out_dir = resolve_path(base, recipe.export.output_dir)
    check_recipe(recipe, base, fetch=True, tokenize=False, check_lock=False).raise_if_any(
        recipe.name
    )
    with output_lock(out_dir):
        if out_dir.exists() and any(out_dir.iterdir()) and not recipe.export.overwrite:
            raise InputError(
                f"Output directory {out_dir} exists and is not empty. Remove it, choose another "
                "export.output_dir, or set export.overwrite: true (--set export.overwrite=true)."
            )
        result = _run_locked(recipe, base, out_dir, show_progress, ref_cache)
    if recipe.report.enabled:
        run_report(recipe, base, out_dir, show_progress)
    return result


def run_report(recipe: Recipe, base: Path, out_dir: Path, show_progress: bool) -> Path:
    """The recipe's `report:` section: the float model against the finished run in out_dir."""
    from quantlab.report.make import ReportOptions, make_report

    rep = recipe.report
    target = resolve_path(base, rep.output_dir) if rep.output_dir else None
    target = target or out_dir.parent / f"{out_dir.name}-report"
    opts = ReportOptions(
        layer_windows=rep.layer_windows,
        sensitivity=rep.sensitivity,
        tasks=[resolve_path(base, t) for t in rep.tasks],
        device=recipe.model.device,
        show_progress=show_progress,
    )
    make_report(
        _model_source(recipe.model.source, base), [out_dir], target, opts, recipe.export.overwrite
    )
    log.info("run '%s': report in %s", recipe.name, target / "report.html")
    return target


class _Stage:
    """What the run is doing now, for the message of an environment failure."""

    def __init__(self) -> None:
        self.now = "loading the model"


def _run_locked(
    recipe: Recipe,
    base: Path,
    out_dir: Path,
    show_progress: bool,
    ref_cache: ReferenceCache | None,
) -> RunResult:
    stage = _Stage()
    try:
        return _run_stages(recipe, base, out_dir, show_progress, ref_cache, stage)
    except OSError as exc:
        raise environment_failure(exc, f"run '{recipe.name}' while {stage.now}") from exc
    except torch.OutOfMemoryError as exc:
        raise EnvironmentFailure(
            f"run '{recipe.name}' ran out of GPU memory while {stage.now} ({first_line(exc)}). Set "
            "runner.offload: true, lower calibration.num_samples or seq_len, or use a larger GPU."
        ) from exc


def _run_stages(
    recipe: Recipe,
    base: Path,
    out_dir: Path,
    show_progress: bool,
    ref_cache: ReferenceCache | None,
    stage: _Stage,
) -> RunResult:
    steps = [build_calibrator(s.calibrator, s.args) for s in recipe.steps]
    whole = whole_model_step(steps, recipe)
    budget = budget_of(recipe)
    wf, af = planned_formats(steps)
    # With offload the weights stay in host memory and the Runner moves one layer at a time.
    offload = recipe.runner.offload and recipe.model.device != "cpu"
    model, tok = load_model(
        _model_source(recipe.model.source, base),
        recipe.model.dtype,
        "cpu" if offload else recipe.model.device,
    )
    adapter = adapter_for(model)
    ecfg = ExportConfig(
        out_dir,
        recipe.export.dtype,
        recipe.export.tp_size,
        recipe.export.pp_size,
        recipe.export.trtllm_sm,
        "trtllm" in recipe.export.formats,
    )
    plan = plan_export(
        model.config, adapter, wf, af, ecfg
    )  # refuses bad tp/pp/group before calibrating
    arch = type(model).__name__
    check_architecture_formats(recipe, adapter, arch)
    trt = "trtllm" in recipe.export.formats
    excludes = (
        trtllm_excludes(recipe, adapter, plan.dims["layers"], recipe.export.pp_size) if trt else []
    )
    needs_data = any(c.needs_data for c in steps)
    check_tokenizer(tok, model)
    stage.now = "reading the data"
    windows = (
        load_windows(_data(recipe.calibration, base), tok, model)
        if needs_data and recipe.calibration
        else []
    )
    eval_windows = []
    if recipe.evaluation.enabled and recipe.evaluation.data is not None:
        eval_windows = load_windows(_data(recipe.evaluation.data, base), tok, model)

    stage.now = "creating the temporary output folder"
    _remove_stale_tmp(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    handler = logging.FileHandler(tmp / "quantlab.log")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("quantlab").addHandler(handler)
    try:
        log.info(
            "recipe %s: %s -> %s (quant_algo %s)",
            recipe.name,
            recipe.model.source,
            out_dir,
            plan.quant_algo,
        )
        quant = copy.deepcopy(model)
        state = QuantState(recipe=recipe.model_dump(mode="json"), model=model_info(model))
        rcfg = RunnerConfig(
            propagate=recipe.runner.propagate,
            exclude=recipe.runner.exclude,
            show_progress=show_progress,
            scale_dtype=DTYPES[recipe.export.dtype],
            device=recipe.model.device,
            offload=offload,
            checkpoint_dir=resume_dir(out_dir) if recipe.runner.resume else None,
            fingerprint=_fingerprint(recipe, state.model, windows),
        )
        profile: list[LayerProfile] = []
        stage.now = f"calibrating (resume state in {rcfg.checkpoint_dir})"
        t0 = time.perf_counter()
        if whole is not None:
            dtype = DTYPES[whole.args.dtype or recipe.export.dtype]
            state.update("", whole.quantize_whole(quant, adapter, windows, dtype, show_progress))
            apply_state(quant, state)
        else:
            quantize_model(quant, adapter, windows, steps, rcfg, state, profile)
        seconds = time.perf_counter() - t0
        log.info("calibration took %.1f s", seconds)
        chosen = None
        if budget is not None:
            stage.now = "searching the accuracy budget (sensitivity ranking, then ppl per k)"
            if offload:
                for m in (model, quant):
                    cast(nn.Module, m).to(recipe.model.device)
            chosen = apply_budget(
                model, quant, adapter, state, eval_windows, budget, recipe, show_progress
            )
            excludes = (
                trtllm_excludes(
                    recipe, adapter, plan.dims["layers"], recipe.export.pp_size, chosen.float_layers
                )
                if trt
                else []
            )
        stage.now = f"writing the checkpoint into {tmp}"
        formats = recipe.export.formats
        if "trtllm" in formats:
            write_trtllm_checkpoint(quant, state, adapter, plan, ecfg, tmp, excludes)
        save_reloadable(quant, tok, state, tmp / "quantlab")
        for fmt in (f for f in formats if f != "trtllm"):
            from quantlab.export.hf_formats import write_format

            stage.now = f"writing the {fmt} folder into {tmp}"
            write_format(fmt, tmp / "quantlab", tmp / fmt, DTYPES[recipe.export.dtype])
        key = json.dumps(
            [
                recipe.model.model_dump(),
                recipe.evaluation.data.model_dump() if recipe.evaluation.data else None,
                str(base),
            ],
            sort_keys=True,
        )
        if offload and eval_windows:  # evaluation runs the whole models on the recipe's device
            for m in (model, quant):
                cast(nn.Module, m).to(recipe.model.device)
        stage.now = "evaluating"
        report = (
            compare_models(model, quant, eval_windows, show_progress, ref_cache, key)
            if eval_windows
            else None
        )
        summary = {
            "recipe": recipe.name,
            "model": state.model,
            "quant_algo": plan.quant_algo,
            "calibration_seconds": seconds,
            "calibration_windows": len(windows),
            "calibration_profile": _profile_summary(profile, recipe.model.device, offload),
            "checkpoint_bytes": sum(p.stat().st_size for p in tmp.glob("rank*.safetensors")),
            "budget": chosen.to_dict() if chosen else None,
            "under_calibrated": under_calibrated(state, adapter),
            "accuracy": report.to_dict() if report else None,
            "evaluation_data": recipe.evaluation.data.model_dump(mode="json")
            if recipe.evaluation.data
            else None,
        }
        stage.now = f"writing {tmp / 'accuracy.json'}"
        (tmp / "accuracy.json").write_text(json.dumps(summary, indent=2))
        logging.getLogger("quantlab").removeHandler(handler)
        handler.close()
        stage.now = f"writing {tmp / 'manifest.json'}"
        write_manifest(
            tmp,
            recipe.model_dump(mode="json"),
            _model_folder(recipe, base),
            _data_files(recipe, base),
            recipe.model.device,
            summary,
        )
        stage.now = "checking the checkpoint against its consumers' rules"
        _check_own_export(tmp)
        stage.now = "publishing the checkpoint"
        publish(tmp, out_dir, recipe.export.overwrite)
        shutil.rmtree(resume_dir(out_dir), ignore_errors=True)
    except BaseException:
        logging.getLogger("quantlab").removeHandler(handler)
        handler.close()
        log_copy = keep_failed_log(tmp / "quantlab.log", out_dir)
        if not (tmp / "accuracy.json").is_file():  # a finished checkpoint is never deleted
            shutil.rmtree(tmp, ignore_errors=True)
        hint = failure_hint(out_dir, log_copy)
        if hint:
            log.warning("run '%s' did not finish. %s", recipe.name, hint)
        raise
    return RunResult(recipe.name, out_dir, plan.quant_algo, seconds, report)

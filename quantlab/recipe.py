"""Recipes: one validated schema, YAML with line-numbered errors, `--set` overrides, env expansion."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
)

from quantlab.calibrator import get_calibrator
from quantlab.data import DataSpec
from quantlab.errors import InputError

ExportFormat = Literal["trtllm", "compressed_tensors", "modelopt_hf"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    """source: a local HF folder (relative to the recipe), a hub id (online only) or embedded:smollm2."""

    source: str = "embedded:smollm2"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"


class StepSection(_Strict):
    """One quantization step: a registered calibrator name and its arguments."""

    calibrator: str
    args: dict[str, Any] = Field(default_factory=dict)


class RunnerSection(_Strict):
    """propagate: next layer's inputs from the quantized or float layer; exclude: fnmatch patterns; offload; resume."""

    propagate: Literal["quantized", "float"] = "quantized"
    exclude: list[str] = Field(default_factory=list)
    # Keep the model in host memory and move one decoder layer at a time to model.device.
    offload: bool = True
    # Record each finished layer beside the output folder; a restarted run continues from there.
    resume: bool = True


class ExportSection(_Strict):
    """TensorRT-LLM checkpoint output (output_dir relative to the recipe file)."""

    # One format or a list: the TensorRT-LLM checkpoint and/or the HF-layout folders
    # (written into <output_dir>/compressed_tensors/ and <output_dir>/modelopt_hf/).
    format: ExportFormat | list[ExportFormat] = "trtllm"
    output_dir: str
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    tp_size: PositiveInt = 1
    pp_size: PositiveInt = 1
    # The GPU architecture trtllm-build will run on. TensorRT-LLM expects GPTQ weights already
    # preprocessed for it (its converter does that on the converting GPU); quantlab writes that
    # layout when this is set, its own row-packed layout otherwise (docs/export.md).
    trtllm_sm: Literal[75, 80, 86, 89, 90, 120] | None = None
    overwrite: bool = False

    @property
    def formats(self) -> list[str]:
        """The export formats as a list, without repeats."""
        return list(dict.fromkeys([self.format] if isinstance(self.format, str) else self.format))


class EvaluationSection(_Strict):
    """Reference vs quantized accuracy on data (perplexity, KL, top-1 agreement)."""

    enabled: bool = True
    data: DataSpec | None = None


class ReportSection(_Strict):
    """`quantlab report` at the end of the run: the float model against this run's output."""

    enabled: bool = False
    output_dir: str | None = None  # default: <export.output_dir>-report (relative to the recipe)
    layer_windows: NonNegativeInt = 4  # windows of the per-layer analysis (0: skip it)
    sensitivity: bool = True  # the only-this-layer-quantized passes
    tasks: list[str] = Field(default_factory=list)  # BIG-bench .json, MMLU .csv or folders


class BudgetSection(_Strict):
    """Accuracy-budget mixed precision (quantlab/budget.py): keep the fewest decoder layers in
    float so that the ppl increase on the evaluation data stays within max_ppl_increase."""

    max_ppl_increase: str | float | None = None  # '1%' or 0.01; None: off
    sensitivity_windows: PositiveInt = 4  # evaluation windows of the sensitivity ranking

    @field_validator("max_ppl_increase")
    @classmethod
    def _budget(cls, v: str | float | None) -> str | float | None:
        if v is not None:
            from quantlab.budget import parse_budget

            try:
                parse_budget(v)
            except InputError as e:
                raise ValueError(str(e)) from None
        return v


class Recipe(_Strict):
    """A whole recipe: model, calibration data, ordered steps, runner, export, evaluation."""

    name: str
    description: str = ""
    model: ModelSection = Field(default_factory=ModelSection)
    calibration: DataSpec | None = None
    steps: list[StepSection] = Field(min_length=1)
    runner: RunnerSection = Field(default_factory=RunnerSection)
    export: ExportSection
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    report: ReportSection = Field(default_factory=ReportSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)


class RecipeError(InputError):
    """A recipe that does not validate; the message lists every problem with file and line."""


Loc = tuple[Any, ...]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _line_map(text: str) -> dict[Loc, int]:
    """Map each key path of a YAML document to its 1-based line."""
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, path: Loc) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[(*path, k.value)] = k.start_mark.line + 1
                walk(v, (*path, k.value))
                lines[(*path, k.value)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        # A non-scalar mapping key (unhashable path): the schema check reports it without lines.
        with contextlib.suppress(TypeError):
            walk(root, ())
    return lines


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise InputError(
            f"{where}: environment variable {name} is not set and has no default; set it or write ${{{name}:-default}}."
        )

    return _ENV.sub(sub, value)


def _apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Set path.to.key=value (YAML value) in doc; InputError naming the --set on any mismatch."""
    key, sep, raw = assignment.partition("=")
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise InputError(
            f"--set {assignment!r}: expected path.to.key=value, e.g. --set export.tp_size=2."
        )
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise InputError(f"--set {key}: the value {raw!r} is not valid YAML ({e}).") from None
    cur: Any = doc
    for i, p in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise InputError(
                    f"--set {key}: '{p}' is not an index of a list of {len(cur)} item(s)."
                )
            cur = cur[int(p)]
        elif isinstance(cur, dict):
            if p not in cur or cur[p] is None:
                cur[p] = [] if nxt_is_index else {}
            cur = cur[p]
        else:
            break
    last = parts[-1]
    if isinstance(cur, list):
        if not last.isdigit() or int(last) > len(cur):
            raise InputError(
                f"--set {key}: '{last}' is not an index of a list of {len(cur)} item(s)."
            )
        if int(last) == len(cur):
            cur.append(value)
        else:
            cur[int(last)] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise InputError(f"--set {key}: cannot set a key inside the scalar value {cur!r}.")


def _fields_at(loc: Loc) -> list[str]:
    """Allowed keys of the schema object at loc (best effort; [] when unknown)."""
    cls: Any = Recipe
    for p in loc:
        if isinstance(p, int) or cls is None:
            continue
        f = getattr(cls, "model_fields", {}).get(p)
        if f is None:
            return []
        ann = f.annotation
        args = [
            a
            for a in getattr(ann, "__args__", ())
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        cls = (
            ann
            if isinstance(ann, type) and issubclass(ann, BaseModel)
            else (args[0] if args else None)
        )
    return sorted(getattr(cls, "model_fields", {})) if cls else []


def _describe(err: Any, loc: Loc, allowed: list[str]) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc[-1]}'" + (
            f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        )
    if err["type"] == "missing":
        return "required key is missing"
    return f"{err['msg']} (got {err.get('input')!r})"


def _line_for(lines: dict[Loc, int], loc: Loc, overrides: set[str]) -> str:
    dotted = ".".join(map(str, loc))
    if any(dotted == o or dotted.startswith(o + ".") for o in overrides):
        return "--set"
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"line {lines[loc[:n]]}"
    return "line ?"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Parse, override, expand and validate a recipe file; returns (recipe, recipe directory)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"Recipe file {path} does not exist. Pass the path of a YAML recipe, e.g. recipes/smollm2_int8_wo.yaml."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e}); save the recipe as UTF-8.") from None
    try:
        doc = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping with keys {', '.join(sorted(Recipe.model_fields))}."
        )
    overrides = overrides or []
    problems: list[str] = []
    for o in overrides:  # every bad --set is reported, together with the schema's findings
        try:
            _apply_override(doc, o)
        except InputError as e:
            problems.append(str(e))
    set_keys = {o.partition("=")[0] for o in overrides}
    doc = _expand_env(doc, str(path))
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            where = _line_for(lines, loc, set_keys)
            parent = loc[:-1] if err["type"] == "extra_forbidden" else loc
            problems.append(
                f"{path}:{where}: {'.'.join(map(str, loc))}: {_describe(err, loc, _fields_at(parent))}"
            )
        raise RecipeError("Invalid recipe:\n  " + "\n  ".join(problems)) from None
    if problems:
        raise RecipeError("Invalid recipe:\n  " + "\n  ".join(problems))
    for i, step in enumerate(recipe.steps):
        try:
            cls = get_calibrator(step.calibrator)
        except InputError as e:
            problems.append(
                f"{path}:{_line_for(lines, ('steps', i, 'calibrator'), set_keys)}: steps.{i}.calibrator: {e}"
            )
            continue
        try:
            cls.Args.model_validate(step.args)
        except ValidationError as e:
            for err in e.errors():
                loc = ("steps", i, "args", *err["loc"])
                allowed = sorted(cls.Args.model_fields)
                problems.append(
                    f"{path}:{_line_for(lines, loc, set_keys)}: {'.'.join(map(str, loc))}: "
                    f"{_describe(err, loc, allowed)} [calibrator '{step.calibrator}']"
                )
    if problems:
        raise RecipeError("Invalid recipe:\n  " + "\n  ".join(problems))
    return recipe, path.resolve().parent


def resolve_path(base: Path, p: str) -> Path:
    """p relative to the recipe directory base (absolute paths and ~ kept)."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()

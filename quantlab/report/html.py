"""report.html: one self-contained page drawn from report.json (every number cell names its JSON path)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from quantlab.report import svg
from quantlab.report.metrics import excludes_zero

MODULE_COLORS = {
    "self_attn.q_proj": "#1f77b4",
    "self_attn.k_proj": "#aec7e8",
    "self_attn.v_proj": "#17becf",
    "self_attn.o_proj": "#9467bd",
    "mlp.gate_proj": "#2ca02c",
    "mlp.up_proj": "#98df8a",
    "mlp.down_proj": "#d62728",
}
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.sig{color:#b00;font-weight:600}code{background:#f5f5f5;padding:0 3px}h2{margin-top:32px}
.note{color:#555;font-size:13px}
"""


def get(doc: Any, path: str) -> Any:
    """The value at a dotted path ("variants.0.model.ppl_quant") of a JSON document."""
    cur = doc
    for part in path.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


def fmt_value(v: Any, kind: str) -> str:
    """Display text of a number: kind is one of f3, f4, e, pct, db, ci3, ci4, cipct, int."""
    if v is None:
        return "∞" if kind == "db" else "–"
    if isinstance(v, list):
        inner = {"ci3": "f3", "ci4": "f4", "cipct": "pct", "cie": "e"}[kind]
        return f"[{fmt_value(v[0], inner)}, {fmt_value(v[1], inner)}]"
    if kind == "int":
        return str(int(v))
    if isinstance(v, float) and math.isinf(v):
        return "-∞" if v < 0 else "∞"
    return {
        "f3": f"{v:.3f}",
        "f4": f"{v:.4f}",
        "e": f"{v:.3e}",
        "pct": f"{v:+.2f} %",
        "frac": f"{100 * v:.2f} %",
        "db": f"{v:.1f}",
    }[kind]


class _Cells:
    """Builds table cells bound to paths of the report document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def num(self, path: str, kind: str, extra: str = "") -> str:
        v = get(self.doc, path)
        return (
            f'<td class="n{extra}" data-path="{path}" data-kind="{kind}" '
            f"data-value='{escape(json.dumps(v))}'>{escape(fmt_value(v, kind))}</td>"
        )

    def nums(self, prefix: str, fields: list[tuple[str, str]]) -> str:
        """Cells for (field, kind) pairs under one path prefix."""
        return "".join(self.num(f"{prefix}.{f}", kind) for f, kind in fields)


def _table(head: list[str], rows: list[str]) -> str:
    return (
        "<table><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(f"<tr>{r}</tr>" for r in rows)
        + "</table>"
    )


def _txt(v: Any) -> str:
    return f"<td>{escape(str(v))}</td>"


def render(doc: dict[str, Any]) -> str:
    """The whole page for a report document (see docs/report.md for its schema)."""
    c = _Cells(doc)
    variants = doc["variants"]
    d = doc["data"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>quantlab report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>quantlab accuracy report</h1>",
        f"<p class='note'>Reference <code>{escape(str(doc['reference']['source']))}</code> "
        f"({escape(str(doc['reference']['model'].get('architecture')))}, "
        f"{doc['reference']['model'].get('num_parameters')} parameters). Data "
        f"<code>{escape(str(d['path']))}</code>: {d['windows']} windows x {d['seq_len']} tokens "
        f"({d['tokens']} predicted tokens); layer analysis on the first {d['layer_windows']} "
        f"windows, position 0 (BOS) left out. Intervals: {doc['bootstrap']['confidence']:.0%} "
        f"paired bootstrap, {doc['bootstrap']['resamples']} resamples of "
        f"{doc['bootstrap']['block_tokens']}-token blocks (tasks: of examples; one model's task "
        f"accuracy: Wilson). quantlab {escape(str(doc['quantlab_version']))}, {escape(doc['created'])}.</p>",
        "<h2>Variants</h2>",
        _variants_table(c, variants),
    ]
    parts += _tasks_section(c, doc)
    growth: dict[str, Sequence[float]] = {
        v["name"]: [r["growth_rel_error"] for r in v["layers"]] for v in variants if v["layers"]
    }
    if growth:
        parts += [
            "<h2>Error growth through the residual stream</h2>",
            "<p class='note'>Relative error ||h<sub>quant</sub> - h<sub>ref</sub>|| / ||h<sub>ref</sub>|| "
            "after each decoder layer with the whole model quantized.</p>",
            svg.lines(
                growth, "residual-stream relative error", "decoder layer", "relative error", True
            ),
        ]
    for k, v in enumerate(variants):
        parts += _variant_section(c, k, v)
    parts.append("</body></html>")
    return "\n".join(parts)


def _variants_table(c: _Cells, variants: list[dict[str, Any]]) -> str:
    rows = []
    for k, v in enumerate(variants):
        p = f"variants.{k}.model"
        sig = " sig" if excludes_zero(v["model"]["ppl_delta_ci"]) else ""
        rows.append(
            _txt(v["name"])
            + _txt(v["quant_algo"])
            + c.num(f"{p}.ppl_ref", "f3")
            + c.num(f"{p}.ppl_quant", "f3")
            + c.num(f"{p}.ppl_delta", "f3")
            + c.num(f"{p}.ppl_delta_ci", "ci3", sig)
            + c.num(f"{p}.ppl_delta_pct", "pct")
            + c.num(f"{p}.kl_mean", "f4")
            + c.num(f"{p}.kl_quantiles.p99", "f4")
            + c.num(f"{p}.top1_agreement", "frac")
        )
    head = ["variant", "quant_algo", "ppl ref", "ppl quant", "Δppl", "Δppl 95 % CI", "Δppl %"]
    return _table([*head, "KL mean", "KL p99", "top-1 agree"], rows)


def _tasks_section(c: _Cells, doc: dict[str, Any]) -> list[str]:
    if not doc["tasks_reference"]:
        return []
    rows = []
    for t, ref in enumerate(doc["tasks_reference"]):
        rows.append(
            _txt(ref["task"])
            + _txt("reference")
            + c.num(f"tasks_reference.{t}.n", "int")
            + c.num(f"tasks_reference.{t}.chance", "f3")
            + c.num(f"tasks_reference.{t}.acc", "f3")
            + c.num(f"tasks_reference.{t}.acc_ci", "ci3")
            + c.num(f"tasks_reference.{t}.acc_norm", "f3")
            + c.num(f"tasks_reference.{t}.acc_norm_ci", "ci3")
        )
        for k, v in enumerate(doc["variants"]):
            p = f"variants.{k}.tasks.{t}"
            q = v["tasks"][t]

            def s(key: str, q: dict[str, Any] = q) -> str:
                return " sig" if q[f"{key}_diff_significant"] else ""

            rows.append(
                _txt(ref["task"])
                + _txt(v["name"] + " − ref")
                + c.num(f"{p}.n", "int")
                + "<td></td>"
                + c.num(f"{p}.acc_diff", "f3")
                + c.num(f"{p}.acc_diff_ci", "ci3", s("acc"))
                + c.num(f"{p}.acc_norm_diff", "f3")
                + c.num(f"{p}.acc_norm_diff_ci", "ci3", s("acc_norm"))
            )
    head = ["task", "model", "n", "chance", "acc", "acc 95 % CI", "acc_norm", "acc_norm 95 % CI"]
    return [
        "<h2>Tasks (multiple choice by log-likelihood)</h2>",
        "<p class='note'>Rows after the reference give quantized − reference; an interval in red "
        "excludes 0.</p>",
        _table(head, rows),
    ]


_LINEAR_FIELDS = [
    ("sqnr_db", "db"),
    ("rel_error", "f4"),
    ("cosine", "f4"),
    ("weight_sqnr_db", "db"),
]
_LAYER_FIELDS = [
    ("sensitivity_kl", "e"),
    ("sensitivity_nll_delta", "e"),
    ("local_rel_error", "f4"),
    ("growth_rel_error", "f4"),
]


def _variant_section(c: _Cells, k: int, v: dict[str, Any]) -> list[str]:
    out = [f"<h2>Variant {escape(v['name'])}</h2>", f"<p class='note'>{escape(v['path'])}</p>"]
    m = v["model"]
    h = m["kl_histogram"]
    out.append(svg.histogram(h["edges"], h["counts"], f"{v['name']}: per-token KL", "KL (nats)"))
    if v["linears"]:
        lin = v["linears"]
        colors = [MODULE_COLORS.get(r["module"], "#777") for r in lin]
        ticks = {i: str(r["layer"]) for i, r in enumerate(lin) if r["layer"] % 5 == 0}
        ticks = {i: t for i, t in ticks.items() if i == 0 or lin[i - 1]["layer"] != lin[i]["layer"]}
        legend = {
            mod: col for mod, col in MODULE_COLORS.items() if any(r["module"] == mod for r in lin)
        }
        sq = [r["sqnr_db"] for r in lin]
        out.append(
            svg.bars(
                sq,
                colors,
                f"{v['name']}: output SQNR per linear",
                "decoder layer",
                "dB",
                legend,
                ticks,
            )
        )
        worst = sorted(range(len(lin)), key=lambda i: _key(lin[i]["sqnr_db"]))[:10]
        rows = [
            _txt(lin[i]["name"])
            + _txt(lin[i]["weight_format"] + " / " + lin[i]["input_format"])
            + c.nums(f"variants.{k}.linears.{i}", _LINEAR_FIELDS)
            for i in worst
        ]
        out += [
            "<h3>Lowest output SQNR</h3>",
            _table(
                ["linear", "weight / input", "SQNR dB", "rel. error", "cosine", "weight SQNR dB"],
                rows,
            ),
        ]
    if v["layers"] and "sensitivity_kl" in v["layers"][0]:
        lay = v["layers"]
        sens = [r["sensitivity_kl"] for r in lay]
        out.append(
            svg.bars(
                sens,
                [svg.PALETTE[1]],
                f"{v['name']}: output KL with only this layer quantized",
                "decoder layer",
                "KL (nats)",
                None,
                {i: str(i) for i in range(0, len(lay), 5)},
            )
        )
        rank = sorted(range(len(lay)), key=lambda i: -lay[i]["sensitivity_kl"])[:8]
        rows = [_txt(i) + c.nums(f"variants.{k}.layers.{i}", _LAYER_FIELDS) for i in rank]
        out += [
            "<h3>Most sensitive layers</h3>",
            _table(
                ["layer", "KL alone", "ΔNLL alone", "local rel. error", "stream rel. error"], rows
            ),
        ]
    rows = [
        c.num(f"variants.{k}.model.top_kl_tokens.{j}.kl", "f3")
        + _txt(t["context"])
        + _txt(t["target"])
        + _txt(t["reference_top"])
        + _txt(t["quantized_top"])
        for j, t in enumerate(m["top_kl_tokens"][:10])
    ]
    out += [
        "<h3>Tokens with the largest KL</h3>",
        _table(["KL", "context", "target", "ref top-1", "quant top-1"], rows),
    ]
    return out


def _key(v: float | None) -> float:
    return math.inf if v is None else v


__all__ = ["fmt_value", "get", "render"]

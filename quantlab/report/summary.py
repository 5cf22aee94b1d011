"""The short markdown summary `quantlab report` prints and writes as summary.md."""

from __future__ import annotations

from typing import Any

from quantlab.report.html import fmt_value


def markdown_summary(doc: dict[str, Any]) -> str:
    """Variants table (ppl with its interval, KL, top-1), worst layers, and task differences."""
    d = doc["data"]
    lines = [
        f"quantlab report: {d['windows']} windows x {d['seq_len']} tokens of {d['path']} "
        f"({d['tokens']} predicted tokens), reference {doc['reference']['source']}",
        "",
        "| variant | ppl ref | ppl quant | Δppl % [95 % CI] | KL mean | top-1 | most sensitive layers |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for v in doc["variants"]:
        m = v["model"]
        worst = sorted(v["layers"], key=lambda r: -r.get("sensitivity_kl", 0.0))[:3]
        sens = ", ".join(str(r["layer"]) for r in worst if "sensitivity_kl" in r) or "–"
        lines.append(
            f"| {v['name']} | {m['ppl_ref']:.3f} | {m['ppl_quant']:.3f} | "
            f"{fmt_value(m['ppl_delta_pct'], 'pct')} {fmt_value(m['ppl_delta_pct_ci'], 'cipct')} | "
            f"{m['kl_mean']:.4f} | {100 * m['top1_agreement']:.2f} % | {sens} |"
        )
    if doc["tasks_reference"]:
        lines += ["", "| task | model | acc_norm | Δ vs ref [95 % CI] |", "|---|---|---:|---|"]
        for t, ref in enumerate(doc["tasks_reference"]):
            lines.append(
                f"| {ref['task']} (n={ref['n']}) | reference | {ref['acc_norm']:.3f} "
                f"{fmt_value(ref['acc_norm_ci'], 'ci3')} | |"
            )
            for v in doc["variants"]:
                q = v["tasks"][t]
                mark = " (excludes 0)" if q["acc_norm_diff_significant"] else ""
                lines.append(
                    f"| | {v['name']} | {q['acc_norm']:.3f} | {q['acc_norm_diff']:+.3f} "
                    f"{fmt_value(q['acc_norm_diff_ci'], 'ci3')}{mark} |"
                )
    return "\n".join(lines) + "\n"

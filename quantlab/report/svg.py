"""Small inline-SVG charts for the HTML report (no plotting library, readable offline)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H = 760, 260
ML, MR, MT, MB = 64, 16, 28, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _top(legend: dict[str, str]) -> float:
    """The top of the plotting area below a legend of 4 entries per row."""
    return MT + 14 * math.ceil(len(legend) / 4) + (6 if legend else 0)


def _frame(
    title: str,
    xlabel: str,
    ylabel: str,
    body: list[str],
    yt: list[tuple[float, str]],
    top: float = MT,
) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<line x1="{ML}" y1="{H - MB}" x2="{W - MR}" y2="{H - MB}" stroke="#444"/>',
        f'<line x1="{ML}" y1="{top}" x2="{ML}" y2="{H - MB}" stroke="#444"/>',
        f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle" font-size="11">{escape(xlabel)}</text>',
        f'<text x="12" y="{H / 2}" font-size="11" transform="rotate(-90 12 {H / 2})" '
        f'text-anchor="middle">{escape(ylabel)}</text>',
    ]
    for y, label in yt:
        parts.append(
            f'<line x1="{ML - 4}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{label}</text>'
        )
    return "\n".join(parts + body + ["</svg>"])


def _scale(lo: float, hi: float, a: float, b: float, log: bool = False):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0

    def f(v: float) -> float:
        v = math.log10(v) if log else v
        return a + (v - lo) / span * (b - a)

    return f


def bars(
    values: Sequence[float | None],
    colors: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    legend: dict[str, str] | None = None,
    xticks: dict[int, str] | None = None,
) -> str:
    """Vertical bars, one per value (None: left empty); legend maps label -> colour."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite]) or 1.0
    top = _top(legend or {})
    ys = _scale(lo, hi, H - MB, top)
    n = max(1, len(values))
    bw = (W - ML - MR) / n
    body = []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        y0, y1 = ys(0.0), ys(v)
        body.append(
            f'<rect x="{ML + i * bw:.2f}" y="{min(y0, y1):.2f}" width="{max(bw * 0.85, 0.5):.2f}" '
            f'height="{abs(y1 - y0):.2f}" fill="{colors[i % len(colors)]}"><title>{_fmt(v)}</title></rect>'
        )
    for i, label in (xticks or {}).items():
        body.append(
            f'<text x="{ML + (i + 0.5) * bw:.1f}" y="{H - MB + 14}" text-anchor="middle" '
            f'font-size="10">{escape(label)}</text>'
        )
    body += _legend(legend or {})
    return _frame(title, xlabel, ylabel, body, [(ys(t), _fmt(t)) for t in _ticks(lo, hi)], top)


def lines(
    series: dict[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> str:
    """One polyline per named series over x = 0, 1, 2, ...; log_y plots log10 of positive values."""
    vals = [v for s in series.values() for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    if not vals:
        vals = [1.0]
    lo, hi = min(vals), max(vals)
    if log_y:
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        yt = [10.0**e for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)]
    else:
        lo = min(lo, 0.0)
        yt = _ticks(lo, hi)
    top = _top(dict.fromkeys(series, ""))
    ys = _scale(lo, hi if hi > lo else lo + 1, H - MB, top, log_y)
    n = max((len(s) for s in series.values()), default=1)
    xs = _scale(0, max(n - 1, 1), ML + 6, W - MR - 6)
    body = []
    legend = {}
    for k, (name, s) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        legend[name] = color
        pts = " ".join(
            f"{xs(i):.1f},{ys(v):.1f}"
            for i, v in enumerate(s)
            if math.isfinite(v) and (v > 0 or not log_y)
        )
        body.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
    for t in _ticks(0, n - 1, 10):
        body.append(
            f'<text x="{xs(t):.1f}" y="{H - MB + 14}" text-anchor="middle" font-size="10">{int(t)}</text>'
        )
    body += _legend(legend)
    return _frame(title, xlabel, ylabel, body, [(ys(t), _fmt(t)) for t in yt], top)


def histogram(edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str) -> str:
    """Bars over log-spaced bins [edges[i], edges[i+1]) with their counts."""
    hi = max(counts, default=1) or 1
    ys = _scale(0, hi, H - MB, MT)
    n = max(1, len(counts))
    bw = (W - ML - MR) / n
    body = [
        f'<rect x="{ML + i * bw:.2f}" y="{ys(c):.2f}" width="{bw * 0.9:.2f}" height="{ys(0) - ys(c):.2f}" '
        f'fill="{PALETTE[0]}"><title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {c}</title></rect>'
        for i, c in enumerate(counts)
    ]
    for i in range(0, n + 1, max(1, n // 8)):
        body.append(
            f'<text x="{ML + i * bw:.1f}" y="{H - MB + 14}" text-anchor="middle" '
            f'font-size="10">{_fmt(edges[i])}</text>'
        )
    return _frame(title, xlabel, "tokens", body, [(ys(t), _fmt(t)) for t in _ticks(0, hi)])


def _legend(items: dict[str, str]) -> list[str]:
    out = []
    for k, (label, color) in enumerate(items.items()):
        x = ML + 10 + (k % 4) * 170
        y = MT - 4 + (k // 4) * 14
        out.append(
            f'<rect x="{x}" y="{y}" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="{y + 9}" font-size="10">{escape(label)}</text>'
        )
    return out

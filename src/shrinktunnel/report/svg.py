"""Plots as hand-written inline SVG: grouped bars, a heat map, a scatter with its Pareto frontier, a
histogram with grid lines.

Why not matplotlib: these four plot kinds are ~250 lines of plain SVG; matplotlib would add a ~40 MB
dependency (and its font cache) to every install for them. Hand-written SVG is deterministic (byte-
identical for the same data, so reports diff well), small, needs no fonts or network, and every mark
carries a class and a <title> tooltip, so a browser test can assert on what the page shows.
Every function returns one `<svg>` element as a string; text is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

__all__ = ["bar_chart", "heatmap", "scatter", "histogram", "PALETTE"]

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
           "#ccb974", "#64b5cd"]
FONT = 'font-family="sans-serif" font-size="11"'


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _svg(width: float, height: float, body: list[str], kind: str, title: str) -> str:
    return (f'<svg class="plot {kind}" role="img" aria-label="{escape(title)}" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" {FONT}>'
            f'<text class="plot-title" x="8" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def bar_chart(categories: Sequence[str], series: dict[str, Sequence[float | None]], title: str,
              value_label: str, *, fmt=_fmt, width: int = 760) -> str:
    """Horizontal grouped bars: one group per category (a layer), one bar per series."""
    label_w, bar_h, gap = 170, 9, 8
    names = list(series)
    per_row = max(1, (width - label_w) // 100)  # legend entries per line
    top = 30 + 16 * math.ceil(len(names) / per_row)
    group_h = bar_h * len(names) + gap
    height = top + group_h * len(categories) + 30
    values = [v for s in series.values() for v in s if v is not None]
    vmax = max(values) if values else 1.0
    vmax = vmax if vmax > 0 else 1.0
    plot_w = width - label_w - 70
    body = []
    for j, name in enumerate(names):  # legend
        x, y = label_w + (j % per_row) * 100, 24 + 16 * (j // per_row)
        body.append(f'<rect class="legend" x="{x}" y="{y}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>'
                    f'<text x="{x + 14}" y="{y + 9}">{escape(name)}</text>')
    for i, cat in enumerate(categories):
        y0 = top + i * group_h
        body.append(f'<text class="category" x="{label_w - 6}" y="{y0 + group_h / 2}" text-anchor="end">{escape(cat)}</text>')
        for j, name in enumerate(names):
            v = series[name][i]
            if v is None:
                continue
            w = max(0.5, plot_w * v / vmax)
            y = y0 + j * bar_h
            body.append(f'<rect class="bar" data-series="{escape(name)}" x="{label_w}" y="{y}" width="{w:.1f}" '
                        f'height="{bar_h - 1}" fill="{PALETTE[j % len(PALETTE)]}"><title>{escape(cat)} / '
                        f'{escape(name)}: {escape(fmt(v))}</title></rect>')
    axis_y = top + group_h * len(categories)
    body.append(f'<line x1="{label_w}" y1="{top - 4}" x2="{label_w}" y2="{axis_y}" stroke="#333"/>')
    for t in _ticks(0, vmax, 4):
        x = label_w + plot_w * t / vmax
        body.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{escape(fmt(t))}</text>')
    body.append(f'<text x="{label_w + plot_w / 2}" y="{axis_y + 27}" text-anchor="middle">{escape(value_label)}</text>')
    return _svg(width, height, body, "bars", title)


def _heat_color(v: float | None, vmax: float) -> str:
    if v is None:
        return "#e8e8e8"
    if v <= 0:
        return "#e6f4ea"  # no loss (or a gain): pale green
    t = min(1.0, math.sqrt(v / vmax)) if vmax > 0 else 1.0  # sqrt: small drops stay visible
    stops = [(255, 247, 236), (253, 187, 132), (227, 74, 51), (127, 0, 0)]
    pos = t * (len(stops) - 1)
    k = min(int(pos), len(stops) - 2)
    f = pos - k
    r, g, b = (round(stops[k][c] + f * (stops[k + 1][c] - stops[k][c])) for c in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]],
            texts: Sequence[Sequence[str]], title: str, *, cell_w: int = 66, cell_h: int = 20) -> str:
    """Rows x columns of colored cells (darker: larger value); `texts` is written in each cell and
    in its tooltip. None: no value (grey)."""
    label_w, top = 170, 48
    width = label_w + cell_w * len(cols) + 20
    height = top + cell_h * len(rows) + 34
    finite = [v for r in values for v in r if v is not None and v > 0]
    vmax = max(finite) if finite else 1.0
    body = []
    for j, c in enumerate(cols):
        body.append(f'<text class="col-label" x="{label_w + j * cell_w + cell_w / 2}" y="{top - 6}" '
                    f'text-anchor="middle">{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = top + i * cell_h
        body.append(f'<text class="row-label" x="{label_w - 6}" y="{y + cell_h * 0.7}" text-anchor="end">{escape(r)}</text>')
        for j, c in enumerate(cols):
            v = values[i][j]
            x = label_w + j * cell_w
            fill = _heat_color(v, vmax)
            dark = v is not None and vmax > 0 and v > 0 and math.sqrt(v / vmax) > 0.6
            ink = ' fill="#fff"' if dark else ""
            body.append(f'<rect class="cell" data-row="{escape(r)}" data-col="{escape(c)}" x="{x}" y="{y}" '
                        f'width="{cell_w - 1}" height="{cell_h - 1}" fill="{fill}"><title>{escape(r)} / '
                        f'{escape(c)}: {escape(texts[i][j])}</title></rect>'
                        f'<text x="{x + cell_w / 2}" y="{y + cell_h * 0.7}" text-anchor="middle" font-size="10"'
                        f'{ink}>{escape(texts[i][j])}</text>')
    return _svg(width, height, body, "heatmap", title)


def scatter(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], title: str, x_label: str,
            y_label: str, *, front: Sequence[int] = (), chosen: int | None = None,
            failed: Sequence[int] = (), log_x: bool = False, reference: int | None = None,
            budget: float | None = None, width: int = 560, height: int = 360) -> str:
    """Points (x cost, y metric) with the Pareto frontier as a step line, the chosen point ringed,
    the reference (original model) as a square and failed points as crosses; `budget`: a
    horizontal line at the lowest acceptable metric."""
    left, right, top, bottom = 70, 20, 36, 46
    pw, ph = width - left - right, height - top - bottom
    pts = [(i, x, y) for i, (x, y) in enumerate(zip(xs, ys)) if x is not None and y is not None]
    tx = (lambda v: math.log10(max(v, 1e-12))) if log_x else (lambda v: v)
    if pts:
        xv = [tx(x) for _, x, _ in pts]
        yv = [y for _, _, y in pts] + ([budget] if budget is not None else [])
        x0, x1, y0, y1 = min(xv), max(xv), min(yv), max(yv)
    else:
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    padx, pady = (x1 - x0) * 0.05 or 0.5, (y1 - y0) * 0.08 or 0.01
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    sx = lambda v: left + pw * (tx(v) - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: top + ph * (1 - (v - y0) / (y1 - y0))  # noqa: E731
    body = [f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for t in _ticks(y0, y1, 5):
        body.append(f'<line x1="{left - 3}" y1="{sy(t):.1f}" x2="{left}" y2="{sy(t):.1f}" stroke="#333"/>'
                    f'<text x="{left - 5}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    xticks = [10 ** k for k in range(math.ceil(x0), math.floor(x1) + 1)] if log_x else _ticks(x0, x1, 5)
    for t in xticks:
        body.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    body.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>'
                f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">'
                f'{escape(y_label)}</text>')
    if budget is not None:
        body.append(f'<line class="budget" x1="{left}" y1="{sy(budget):.1f}" x2="{left + pw}" y2="{sy(budget):.1f}" '
                    f'stroke="#c44e52" stroke-dasharray="4 3"><title>budget: {budget:.4g}</title></line>')
    front_pts = [(xs[i], ys[i]) for i in front if xs[i] is not None and ys[i] is not None]
    if len(front_pts) > 1:
        path = [f"M{sx(front_pts[0][0]):.1f},{sy(front_pts[0][1]):.1f}"]
        for (xa, ya), (xb, yb) in zip(front_pts, front_pts[1:]):
            path.append(f"H{sx(xb):.1f}V{sy(yb):.1f}")
        body.append(f'<path class="frontier" d="{"".join(path)}" fill="none" stroke="#55a868" stroke-width="2"/>')
    on_front, bad = set(front), set(failed)
    for i, x, y in pts:
        cx, cy = sx(x), sy(y)
        tip = f"<title>{escape(labels[i])}: {_fmt(x)}, {y:.4g}</title>"
        if i in bad:
            body.append(f'<path class="point failed" d="M{cx - 4:.1f},{cy - 4:.1f}l8,8m0,-8l-8,8" stroke="#999">{tip}</path>')
        elif i == reference:
            body.append(f'<rect class="point reference" x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="#333">{tip}</rect>')
        else:
            cls = "point front" if i in on_front else "point"
            fill = "#55a868" if i in on_front else "#4c72b0"
            body.append(f'<circle class="{cls}" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{fill}" fill-opacity="0.8">{tip}</circle>')
    if chosen is not None and xs[chosen] is not None and ys[chosen] is not None:
        body.append(f'<circle class="chosen" cx="{sx(xs[chosen]):.1f}" cy="{sy(ys[chosen]):.1f}" r="8" fill="none" '
                    f'stroke="#c44e52" stroke-width="2.5"><title>chosen: {escape(labels[chosen])}</title></circle>')
    return _svg(width, height, body, "scatter", title)


def histogram(edges: Sequence[float], counts: Sequence[int], grid: Sequence[float], title: str,
              grid_label: str, *, width: int = 560, height: int = 260) -> str:
    """Bars of a histogram with vertical lines at `grid` (quantization levels or centroids)."""
    left, right, top, bottom = 50, 16, 40, 40
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = edges[0], edges[-1]
    span = (x1 - x0) or 1.0
    cmax = max(counts) if counts and max(counts) > 0 else 1
    sx = lambda v: left + pw * (v - x0) / span  # noqa: E731
    body = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>']
    for k, c in enumerate(counts):
        h = ph * c / cmax
        body.append(f'<rect class="hist-bar" x="{sx(edges[k]):.1f}" y="{top + ph - h:.1f}" '
                    f'width="{max(0.5, sx(edges[k + 1]) - sx(edges[k]) - 0.5):.1f}" height="{h:.1f}" fill="#4c72b0">'
                    f'<title>[{edges[k]:.4g}, {edges[k + 1]:.4g}): {c}</title></rect>')
    for g in grid:
        body.append(f'<line class="grid-line" x1="{sx(g):.1f}" y1="{top}" x2="{sx(g):.1f}" y2="{top + ph}" '
                    f'stroke="#c44e52" stroke-opacity="0.7"><title>{g:.5g}</title></line>')
    for t in _ticks(x0, x1, 6):
        body.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{t:.3g}</text>')
    body.append(f'<text x="{left}" y="{height - 8}">weight value; red lines: {escape(grid_label or "no grid")}</text>')
    return _svg(width, height, body, "histogram", title)

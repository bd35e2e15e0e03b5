"""One self-contained HTML report beside the JSON: inline SVG plots (report/svg.py), inline CSS, no
script, no external URL, so it opens from a mail attachment or an air-gapped machine as it is.

`analysis_html(analysis_dict, table)` renders `st.analyze`'s result; `search_html(result_dict)` renders a
search (`st.auto`): per-layer size before and after, the sensitivity heat map it started from, the
Pareto frontiers with the chosen point, a weight histogram with its grid, the applied actions.
"""

from __future__ import annotations

from html import escape
from typing import Any, Sequence

from ..core.pareto import pareto_front
from . import svg
from .tables import Table, fmt_bytes

__all__ = ["page", "table_html", "analysis_html", "search_html", "sensitivity_heatmap", "size_bars",
           "pareto_plots", "histogram_plot"]

CSS = """
body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:12px}.warn{color:#8a4b00}.verdict{font-size:15px;padding:8px;border-radius:4px}
.fits{background:#e6f4ea}.over{background:#fde8e8}
figure{margin:10px 0}figcaption{font-size:12px;color:#555}
"""


def page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    sub = f'<p class="note">{escape(subtitle)}</p>' if subtitle else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>{sub}\n"
            + "\n".join(sections) + "\n</body></html>\n")


def section(heading: str, body: str, caption: str = "", section_id: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    sid = f' id="{escape(section_id)}"' if section_id else ""
    return f"<section{sid}><h2>{escape(heading)}</h2><figure>{body}{cap}</figure></section>"


def table_html(table: Table, css_class: str = "") -> str:
    cls = f' class="{escape(css_class)}"' if css_class else ""
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in table.rows)
    note = f'<p class="note">{escape(table.note)}</p>' if table.note else ""
    return f"<table{cls}><caption>{escape(table.title)}</caption><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{note}"


def _list(items: Sequence[str], css_class: str) -> str:
    return f'<ul class="{css_class}">' + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>" if items else ""


# -- the plots, from the JSON dicts -----------------------------------------------------------------

def sensitivity_heatmap(analysis: dict[str, Any]) -> str:
    layers = [lp["name"] for lp in analysis["layers"]]
    actions = [a["name"] for a in analysis["actions"]]
    values, texts = [], []
    for layer in layers:
        row_v, row_t = [], []
        for a in actions:
            e = analysis["results"].get(layer, {}).get(a)
            if e is None or e["status"] != "ok":
                row_v.append(None)
                row_t.append("-" if e is None else e["status"])
            else:
                row_v.append(e["drop"])
                row_t.append(f"{e['drop']:+.3g}")
        values.append(row_v)
        texts.append(row_t)
    return svg.heatmap(layers, actions, values, texts,
                       f"sensitivity: drop of {analysis['metric']['name']} when one layer takes one action")


def size_bars(layers: Sequence[str], series: dict[str, Sequence[float | None]], title: str) -> str:
    return svg.bar_chart(layers, series, title, "bytes", fmt=fmt_bytes)


def histogram_plot(hist: dict[str, Any] | None) -> str:
    if not hist:
        return '<p class="note">no layer with a weight to show</p>'
    return svg.histogram(hist["edges"], hist["counts"], hist["grid"],
                         f"weights of {hist['layer']}, output channel {hist['channel']} ({hist['values']} values)",
                         hist.get("grid_label", ""))


def pareto_plots(points: list[dict[str, Any]], metric_name: str, *, chosen: int | None = None,
                 reference: int | None = None, budget: float | None = None,
                 x_keys: Sequence[tuple[str, str]] = (("bytes", "size (bytes)"), ("latency_ms", "latency (ms)"))) -> str:
    """One scatter per cost key: every point, its frontier, the chosen one. A point is a dict with
    `label`, `metric` (None: failed) and the cost keys."""
    out = []
    metrics = [p.get("metric") for p in points]
    failed = [i for i, p in enumerate(points) if p.get("status") == "failed"]
    for key, label in x_keys:
        xs = [p.get(key) for p in points]
        distinct = {x for x in xs if x is not None}
        if len(distinct) < 2:  # every candidate costs the same: nothing to trade off on this axis
            out.append(f'<p class="note">{escape(label)}: the same for every candidate '
                       f'({", ".join(str(x) for x in distinct) or "not measured"}); no plot</p>')
            continue
        front = pareto_front(xs, [m if i not in failed else None for i, m in enumerate(metrics)])
        # A failed point has no metric: draw it at the bottom of the plot.
        ys = [m if m is not None else (min((v for v in metrics if v is not None), default=0.0)) for m in metrics]
        positive = [x for x in xs if x is not None]
        log_x = bool(positive) and min(positive) > 0 and max(positive) / min(positive) > 20
        out.append(svg.scatter(xs, ys, [p["label"] for p in points], f"{metric_name} against {label}", label,
                               metric_name, front=front, chosen=chosen, failed=failed, log_x=log_x,
                               reference=reference, budget=budget))
    return "".join(out)


# -- analysis --------------------------------------------------------------------------------------

def analysis_html(a: dict[str, Any], table: Table, *, title: str = "shrink analyze") -> str:
    """`a`: st.analyze's result as a dict; `table`: its full table (search/analysis.py builds it, so
    report/ needs nothing from search/)."""
    totals = a["totals"]
    layers = [lp["name"] for lp in a["layers"]]
    actions = [x["name"] for x in a["actions"]]
    subtitle = (f"{totals['params']:,} parameters, {fmt_bytes(totals['bytes'])} of weights, {totals['macs']:,} MACs per "
                f"sample, {totals['latency_ms']:.2f} ms per batch of {totals['latency_batch']} "
                f"({totals['threads']} threads); metric: {a['metric']['name']}, baseline {a['metric']['baseline']:.4g}. "
                f"{a['cache'].get('evaluated', 0)} evaluations run, {a['cache'].get('hits', 0)} read from the cache.")
    series: dict[str, list[float | None]] = {"original": [lp["bytes"] for lp in a["layers"]]}
    for name in actions:
        series[name] = [(a["results"].get(layer, {}).get(name) or {}).get("bytes_after") for layer in layers]
    lat = svg.bar_chart(layers + ["other (outside these layers)"],
                        {"share of latency": [lp["latency_share"] * 100 for lp in a["layers"]]
                         + [totals.get("other_latency_share", 0.0) * 100]},
                        "share of the measured latency per layer", "% of one forward", fmt=lambda v: f"{v:.1f} %")
    # Every evaluated candidate is a whole model with one layer changed: its size is the original's
    # plus the layer's change, so the frontier below is over real, measured models.
    points = [{"label": "original", "metric": a["metric"]["baseline"], "bytes": totals["bytes"], "macs": totals["macs"]}]
    for lp in a["layers"]:
        for name in actions:
            e = a["results"].get(lp["name"], {}).get(name)
            if e and e["status"] in ("ok", "failed"):
                points.append({"label": f"{lp['name']} {name}", "metric": e["metric"], "status": e["status"],
                               "bytes": None if e["bytes_after"] is None else totals["bytes"] - lp["bytes"] + e["bytes_after"],
                               "macs": None if e["macs_after"] is None else totals["macs"] - lp["macs"] + e["macs_after"]})
    sections = [
        section("Per-layer size before and after each action", size_bars(layers, series, "bytes of each layer"),
                "original: the layer's weights as stored now; each action: the same layer after that action alone",
                "size"),
        section("Latency", lat, "per-layer time measured with forward hooks, as a share of the whole forward", "latency"),
        section("Sensitivity", sensitivity_heatmap(a), "drop = baseline - metric (positive: worse); grey: skipped "
                "or failed", "sensitivity"),
        section("Pareto frontier of the evaluated candidates",
                pareto_plots(points, a["metric"]["name"], reference=0,
                             x_keys=(("bytes", "model size (bytes)"), ("macs", "MACs per sample"))),
                "each point: the model with one layer changed by one action; green: the frontier. Analysis "
                "chooses no point (st.auto does); latency is measured per layer, not per candidate, so the "
                "second plot uses MACs", "pareto"),
        section("Weight histogram", histogram_plot(a.get("histogram")),
                "the layer with the most parameters, one output channel, with the levels it would take", "histogram"),
        section("Table", table_html(table, "analysis-table")
                + _list(a.get("skipped_actions", []), "skipped") + _list(a.get("warnings", []), "warn"),
                "", "table"),
    ]
    return page(title, sections, subtitle)


# -- search ------------------------------------------------------------------------------------------

def search_html(r: dict[str, Any], *, title: str = "shrink auto") -> str:
    """The report of a search result dict (see search/auto.py: `AutoResult.to_dict`)."""
    analysis = r["analysis"]
    layers = [lp["name"] for lp in analysis["layers"]]
    chosen = r.get("chosen")
    plan = (r["candidates"][chosen]["plan"] if chosen is not None else {}) or {}
    after = r.get("layer_bytes_after") or {}
    verdict_cls = "fits" if r.get("fits") else "over"
    verdict = f'<p class="verdict {verdict_cls}">{escape(r.get("message", ""))}</p>'
    sections = [verdict]
    sections.append(section("Per-layer size before and after", size_bars(
        layers, {"before": [lp["bytes"] for lp in analysis["layers"]], "after": [after.get(n) for n in layers]},
        "bytes of each layer"), "before: the original layer; after: the layer in the chosen model", "size"))
    sections.append(section("Sensitivity", sensitivity_heatmap(analysis),
                            "measured by st.analyze, one layer and one action at a time", "sensitivity"))
    points = [{"label": c["label"], "metric": c.get("metric"), "status": c.get("status"),
               "bytes": c.get("bytes"), "latency_ms": c.get("latency_ms"), "macs": c.get("macs")}
              for c in r["candidates"]]
    sections.append(section("Pareto frontier", pareto_plots(points, r["metric_name"], chosen=chosen, reference=0,
                                                             budget=r.get("min_metric")),
                            "every evaluated candidate; green: the frontier; red ring: the chosen model; dashed: "
                            "the budget", "pareto"))
    sections.append(section("Weight histogram", histogram_plot(r.get("histogram")),
                            "one output channel of a compressed layer with the grid it takes", "histogram"))
    t = Table("applied actions", ["layer", "action", "method", "predicted drop"])
    method_of = {a["name"]: a["method"] for a in analysis["actions"]}
    for layer in layers:
        if layer in plan:
            e = analysis["results"].get(layer, {}).get(plan[layer], {})
            t.add(layer, plan[layer], method_of.get(plan[layer], ""), "-" if e.get("drop") is None else f"{e['drop']:+.4g}")
    if not t.rows:
        t.add("(none)", "the original model is returned", "", "")
    sections.append(section("Applied actions", table_html(t, "applied") + _list(r.get("warnings", []), "warn"), "", "applied"))
    return page(title, sections, r.get("subtitle", ""))

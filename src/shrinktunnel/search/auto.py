"""`st.auto`: one action per layer, chosen jointly under a metric budget, verified on ONNX Runtime.

1. `analyze` measures each layer's drop and cost under each action alone (cached).
2. A Lagrangian relaxation of the multiple-choice knapsack "least cost with the summed drops within
   max_drop": for a price lambda on the drop, each layer independently takes the option minimising
   cost + lambda * drop. Sweeping lambda through every breakpoint gives the lower convex hull of
   plans, from "keep everything" (drop 0) to "cheapest everywhere".
3. Drops do not add up exactly, so the hull is walked with real evaluations: a bisection for the
   cheapest hull plan whose measured drop fits, then single-layer moves to cheaper options, each kept
   only if the measured model still fits.
4. Every evaluated candidate is a point of the Pareto frontiers (metric against size and against
   latency); the objective picks the cheapest fitting one, which is exported and verified in ONNX
   Runtime (metric and latency). A candidate that fails there is passed over for the next.
5. Nothing fits: the candidate with the smallest drop is returned with `fits=False` and a message.

Stages are applied in a sound order whatever the actions: structure first (decompose, prune),
then sharing, then quantization (FAMILY_ORDER); recovery by distillation and encoding come later.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..core import data as D
from ..core.progress import track
from ..core.registry import Context
from ..errors import ConfigError, ShrinkError, one_line
from .actions import Action, resolve_actions
from .analysis import Analysis, _RecordedOutputs, _first_samples, analyze, artifact_size
from .cache import EvalCache, fingerprint
from .histogram import layer_histogram
from .pareto import pareto_front

__all__ = ["auto", "AutoResult", "OBJECTIVES", "FAMILY_ORDER", "lagrangian_plans"]

OBJECTIVES = ("size", "latency", "macs")
FAMILY_ORDER = ("decompose", "prune", "share", "quantize")  # structure first, precision last

Plan = dict[str, str]  # layer -> action name (layers left out keep their float form)


@dataclass
class AutoResult:
    """What `auto` returns. `model` is the chosen candidate (the original when nothing was cheaper);
    `fits` says whether it meets the budget (False: the best candidate, marked, see `message`)."""

    model: nn.Module
    fits: bool
    message: str
    chosen: int
    candidates: list[dict[str, Any]]
    analysis: Analysis
    objective: str
    max_drop: float
    metric_name: str
    baseline: float
    pareto: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    histogram: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        plan = self.candidates[self.chosen]["plan"]
        after = {lp.name: lp.bytes for lp in self.analysis.layers}
        for layer, action in plan.items():
            after[layer] = self.analysis.results[layer][action]["bytes_after"]
        return {"kind": "shrinktunnel.auto", "objective": self.objective, "max_drop": self.max_drop,
                "metric_name": self.metric_name, "baseline": self.baseline, "min_metric": self.baseline - self.max_drop,
                "fits": self.fits, "message": self.message, "chosen": self.chosen, "candidates": self.candidates,
                "pareto": self.pareto, "warnings": self.warnings, "histogram": self.histogram,
                "layer_bytes_after": after, "analysis": self.analysis.to_dict(), "seconds": self.seconds,
                "subtitle": f"objective {self.objective}, max_drop {self.max_drop} of {self.metric_name} "
                            f"(baseline {self.baseline:.4g}); {len(self.candidates)} candidates evaluated"}

    def save(self, directory: str | Path) -> Path:
        """The chosen model's artifact in `directory`, with auto.json and auto.html beside it."""
        from ..core.artifact import save_artifact
        from ..core.jsonio import write_json
        from ..report.html import search_html

        directory = Path(directory)
        save_artifact(self.model, directory, warnings=self.warnings)
        d = self.to_dict()
        write_json(directory / "auto.json", d)
        (directory / "auto.html").write_text(search_html(d))
        return directory


# -- the choice ------------------------------------------------------------------------------------

def _layer_options(analysis: Analysis, objective: str, usable: dict[str, Action]) -> dict[str, list[tuple[str | None, float, float]]]:
    """Per layer: (action or None for "keep", predicted cost, measured drop >= 0) of every usable option.
    Latency of a changed layer is predicted in proportion to its MACs (quantized weights alone do not
    make a CPU layer faster); size breaks ties between options of equal cost."""
    total = analysis.totals
    options = {}
    for lp in analysis.layers:
        def cost(bytes_, macs, speed=1.0):
            primary = {"size": bytes_, "macs": macs,
                       "latency": speed * lp.latency_ms * (macs / lp.macs if lp.macs else 1.0)}[objective]
            scale = {"size": 0.0, "macs": total["macs"], "latency": total["latency_ms"]}[objective]
            return primary + 1e-6 * scale * bytes_ / max(total["bytes"], 1)

        opts = [(None, cost(lp.bytes, lp.macs), 0.0)]
        for action, e in analysis.results.get(lp.name, {}).items():
            if e["status"] == "ok" and action in usable:
                opts.append((action, cost(e["bytes_after"], e["macs_after"], usable[action].speed), max(0.0, e["drop"])))
        options[lp.name] = opts
    return options


def lagrangian_plans(options: dict[str, list[tuple[str | None, float, float]]]) -> list[tuple[Plan, float, float]]:
    """Every plan on the lower convex hull of (summed drop, summed cost): for each price lambda >= 0
    on the drop, each layer takes its option minimising cost + lambda * drop. Returned as
    (plan, predicted cost, predicted drop) from "keep everything" to the cheapest."""
    breaks = {0.0}
    for opts in options.values():
        for _, ca, da in opts:
            for _, cb, db in opts:
                if db > da and cb < ca:  # b is cheaper and loses more: chosen below lambda = dc / dd
                    breaks.add((ca - cb) / (db - da))
    lambdas = sorted(breaks)
    probes = [lam * 1.000001 + 1e-12 for lam in lambdas] + [lambdas[-1] * 2 + 1.0]
    plans: dict[tuple, tuple[Plan, float, float]] = {}
    for lam in probes:
        plan, cost, drop = {}, 0.0, 0.0
        for layer, opts in options.items():
            action, c, d = min(opts, key=lambda o: (o[1] + lam * o[2], o[2]))
            cost, drop = cost + c, drop + d
            if action is not None:
                plan[layer] = action
        plans.setdefault(tuple(sorted(plan.items())), (plan, cost, drop))
    return sorted(plans.values(), key=lambda p: (p[2], -p[1]))


def build_plan(model: nn.Module, plan: Plan, actions: dict[str, Action], data: Any) -> nn.Module:
    """The model with `plan` applied: one stage per action, structure first (FAMILY_ORDER)."""
    from ..api import run_stage

    by_action: dict[str, list[str]] = {}
    for layer, action in plan.items():
        by_action.setdefault(action, []).append(layer)
    order = sorted(by_action, key=lambda a: (FAMILY_ORDER.index(actions[a].family)
                                             if actions[a].family in FAMILY_ORDER else len(FAMILY_ORDER), a))
    current = model
    ctx = Context(data=data, progress=False)
    for name in order:
        for method, config in actions[name].stages(by_action[name]):
            current = run_stage(current, method, config, ctx)
    return current


# -- evaluation ------------------------------------------------------------------------------------

def _latency_onnx(model: nn.Module, example: Any, inputs: D.Inputs, directory: Path, name: str, threads: int,
                  metric: Callable | None = None) -> tuple[float, float | None]:
    """Median ms of ONNX Runtime on the profiling batch and, when asked, the metric of the runtime model."""
    from ..export import OrtModel, export_onnx
    from ..measure.latency import onnx_latency

    path = export_onnx(model, directory / f"{name}.onnx", example)
    runtime = OrtModel(path, threads=threads)
    feed = runtime.feed(*inputs[0], **inputs[1])
    ms = onnx_latency(runtime.session, feed, warmup=3, runs=15).median_ms
    value = None
    if metric is not None:
        with torch.no_grad():
            value = float(metric(runtime))
    return ms, value


def auto(
    model: nn.Module,
    data: Any,
    *,
    max_drop: float,
    objective: str = "size",
    eval_fn: Callable[[nn.Module], float] | None = None,
    actions: Iterable[Action | str] | None = None,
    analysis: Analysis | None = None,
    cache_dir: str | Path | None = None,
    max_evaluations: int = 12,
    verify_runtime: bool = True,
    threads: int = 2,
    layers: Sequence[str] = ("*",),
    skip: Sequence[str] = (),
    progress: bool = True,
) -> AutoResult:
    """Choose an action per layer so that the metric stays within `max_drop` of the original's and
    the `objective` (size | latency | macs) is least; `model` is not changed.

    The metric is `eval_fn(model)` (higher is better) or, without it, the mean cosine of the outputs
    to the original's on `data`. `max_evaluations`: real candidate evaluations after the analysis.
    `verify_runtime`: the chosen model is exported and scored in ONNX Runtime too; latency is always
    measured there. Returns an AutoResult whose `fits` is False when no candidate met the budget.
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; use one of: {', '.join(OBJECTIVES)} "
                          f"(size: bytes on disk, latency: ONNX Runtime time, macs: multiply-accumulates)")
    if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) or not math.isfinite(max_drop) or max_drop < 0:
        raise ConfigError(f"max_drop={max_drop!r} must be a number >= 0: the most the metric may fall below the "
                          f"original's, in its own units (0.005 for half a point of accuracy in [0, 1])")
    chosen_actions, _ = resolve_actions(actions)
    data = D.reiterable(data)
    if analysis is None:
        analysis = analyze(model, data, eval_fn=eval_fn, actions=chosen_actions, cache_dir=cache_dir,
                           progress=progress, layers=layers, skip=skip, threads=threads)
    by_name = {a.name: a for a in chosen_actions}
    baseline = analysis.baseline
    original = copy.deepcopy(model).eval()
    inputs = D.check_model_runs(original, data)
    example = next(D.batches(data))
    metric = eval_fn if eval_fn is not None else _RecordedOutputs(original, data).metric(data)
    cache = EvalCache(cache_dir, fingerprint("auto", analysis.to_dict()["results"], analysis.baseline,
                                             [lp.name for lp in analysis.layers], objective))
    warnings: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="shrink-auto-"))
    one = _first_samples(inputs, 1)
    from ..measure.macs import count_macs

    candidates: list[dict[str, Any]] = []
    models: dict[int, nn.Module] = {}

    def evaluate(plan: Plan, label: str) -> dict[str, Any]:
        key = fingerprint(sorted(plan.items()), objective)
        for i, c in enumerate(candidates):
            if c["key"] == key:
                return c
        cached = cache.get(key)
        if cached is not None:
            entry = dict(cached)
        else:
            entry = {"plan": plan, "status": "ok", "note": ""}
            try:
                candidate = build_plan(original, plan, by_name, data) if plan else original
                entry["bytes"] = artifact_size(candidate)
                entry["macs"] = count_macs(candidate, one)
                with torch.no_grad():
                    value = float(metric(candidate))
                if math.isnan(value):
                    raise ValueError("the metric is NaN")
                entry["metric"] = value
                if objective == "latency":
                    entry["latency_ms"], _ = _latency_onnx(candidate, example, inputs, workdir, f"c{len(candidates)}", threads)
            except ShrinkError as exc:
                entry.update(status="failed", metric=None, note=str(exc))
            except Exception as exc:
                entry.update(status="failed", metric=None, note=one_line(exc))
            cache.put(key, entry)
            entry = dict(cache.get(key))
        entry.update(key=key, label=label, plan=plan)
        entry["drop"] = None if entry.get("metric") is None else baseline - entry["metric"]
        entry["fits"] = entry["status"] == "ok" and entry["drop"] <= max_drop + 1e-12
        if entry["status"] == "failed":
            warnings.append(f"auto: candidate {label} failed: {entry['note']}")
        candidates.append(entry)
        return entry

    options = _layer_options(analysis, objective, by_name)  # an analysis may hold actions not passed here
    hull = lagrangian_plans(options)
    budget = min(max_evaluations, 10_000)
    steps = track(range(budget), f"auto: up to {budget} evaluations", enabled=progress)
    step_iter = iter(steps)

    def spend() -> bool:
        return next(step_iter, None) is not None

    evaluate({}, "original")
    # Bisection over the hull for the cheapest plan that really fits; the start is the cheapest plan
    # predicted to fit.
    lo, hi = 0, len(hull) - 1  # hull[lo] fits (keep everything); above hi nothing is known yet
    guess = max([i for i, (_, _, d) in enumerate(hull) if d <= max_drop] or [0])
    probe = guess
    while lo < hi and spend():
        plan = hull[probe][0]
        c = evaluate(plan, f"hull {probe}/{len(hull) - 1}")
        if c["fits"]:
            lo = probe
        else:
            hi = probe - 1
        probe = (lo + hi + 1) // 2
        if probe == lo:
            break
    # Refinement: single-layer moves to a cheaper option, best predicted saving per drop first.
    fitting = [c for c in candidates if c["fits"]]
    best = min(fitting, key=lambda c: _objective_cost(c, objective, options)) if fitting else None
    if best is not None:
        moves = []
        for layer, opts in options.items():
            current = best["plan"].get(layer)
            cur = next(o for o in opts if o[0] == current)
            for action, cost, drop in opts:
                if cost < cur[1] and action is not None:
                    moves.append(((cur[1] - cost) / (max(drop - cur[2], 0.0) + 1e-9), layer, action))
        for _, layer, action in sorted(moves, reverse=True):
            if not spend():
                break
            plan = {**best["plan"], layer: action}
            c = evaluate(plan, f"{best['label']} + {layer}:{action}")
            if c["fits"] and _objective_cost(c, objective, options) < _objective_cost(best, objective, options):
                best = c
    for _ in step_iter:  # close the progress bar
        pass

    try:
        return _choose(original, candidates, analysis, by_name, data, objective, max_drop, metric, baseline,
                       example, inputs, workdir, threads, verify_runtime, warnings, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _objective_cost(c: dict[str, Any], objective: str, options) -> float:
    if objective == "size":
        return c["bytes"]
    if objective == "macs":
        return c["macs"]
    return c.get("latency_ms", math.inf)


def _choose(original, candidates, analysis, by_name, data, objective, max_drop, metric, baseline, example, inputs,
            workdir, threads, verify_runtime, warnings, t0) -> AutoResult:
    ok = [i for i, c in enumerate(candidates) if c["status"] == "ok"]
    pareto = {"size": pareto_front([candidates[i]["bytes"] if i in ok else None for i in range(len(candidates))],
                                   [c.get("metric") for c in candidates])}
    if objective == "latency":
        pareto["latency"] = pareto_front([c.get("latency_ms") for c in candidates], [c.get("metric") for c in candidates])
    compressed = [i for i in ok if candidates[i]["plan"]]
    fitting = sorted((i for i in compressed if candidates[i]["fits"]),
                     key=lambda i: _objective_cost(candidates[i], objective, None))
    chosen, verified = None, None
    for i in fitting:
        if not verify_runtime:
            chosen = i
            break
        model = build_plan(original, candidates[i]["plan"], by_name, data)
        try:
            ms, value = _latency_onnx(model, example, inputs, workdir, f"verify{i}", threads, metric)
            base_ms, _ = _latency_onnx(original, example, inputs, workdir, "original", threads)
        except Exception as exc:  # the runtime could not run it: say so, keep PyTorch's figures
            warnings.append(f"auto: {candidates[i]['label']} was not verified in ONNX Runtime: {one_line(exc)}")
            chosen = i
            break
        candidates[i].update(runtime_metric=value, runtime_latency_ms=ms, runtime_latency_original_ms=base_ms)
        if baseline - value <= max_drop + 1e-12:
            chosen, verified = i, value
            break
        candidates[i]["fits"] = False
        warnings.append(f"auto: {candidates[i]['label']} fits in PyTorch but not in ONNX Runtime "
                        f"(metric {value:.4g}); the next candidate is tried")
    if chosen is not None:
        c = candidates[chosen]
        fits = True
        message = (f"chosen: {c['label']} ({len(c['plan'])} layers changed), metric {c['metric']:.4g} "
                   f"(drop {c['drop']:.4g} <= max_drop {max_drop})"
                   + (f", ONNX Runtime metric {verified:.4g}" if verified is not None else "")
                   + f", {c['bytes']:,} bytes on disk vs {candidates[0]['bytes']:,}")
    elif compressed:
        chosen = min(compressed, key=lambda i: (candidates[i]["drop"], _objective_cost(candidates[i], objective, None)))
        c = candidates[chosen]
        fits = False
        message = (f"NO CANDIDATE MEETS THE BUDGET max_drop={max_drop}: the best compressed candidate, {c['label']}, "
                   f"drops the metric by {c['drop']:.4g}; it is returned marked fits=False. Raise max_drop, or keep "
                   f"the original model (drop 0)")
        warnings.append("auto: " + message)
    else:
        chosen, fits = 0, True
        message = "no compressed candidate could be evaluated (every one failed); the original model is returned"
        warnings.append("auto: " + message)
    model = original if chosen == 0 else build_plan(original, candidates[chosen]["plan"], by_name, data)
    hist = None
    plan = candidates[chosen]["plan"]
    if plan:
        layer = max(plan, key=lambda n: next(lp.params for lp in analysis.layers if lp.name == n))
        try:
            hist = layer_histogram(model.get_submodule(layer), layer, bits=None)
        except AttributeError:  # the layer was restructured (decomposed): no single weight to show
            hist = None
    for c in candidates:
        c.pop("key", None)
    return AutoResult(model, fits, message, chosen, candidates, analysis, objective, max_drop,
                      analysis.metric_name, baseline, pareto, warnings, hist, time.perf_counter() - t0)

"""Accuracy-driven fallback: return the most sensitive layers to floating point until the metric
is within `max_drop` of the float model.

Sensitivity of a layer is the metric lost when that layer alone is quantized (every other layer in
float), measured with the same calibration statistics as the final model, so the ranking costs one
evaluation per layer and no extra calibration pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..core.progress import track

__all__ = ["choose_fallback"]


def choose_fallback(
    float_model: nn.Module,
    plans: Sequence[Any],
    build: Callable[[Sequence[Any]], nn.Module],
    metric: Callable[[nn.Module], float],
    max_drop: float,
    *,
    progress: bool = True,
    known: tuple[float, float] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """The plans to keep quantized, and a report: baseline, per-layer sensitivity, the layers that
    fell back in order with the metric after each, and the final metric. `build(plans)` makes a model
    with exactly those layers quantized; `metric(model)` is higher-is-better. `known`: (the float model's
    metric, the metric with every plan quantized) when already measured (by the per-token step)."""
    base, everything = known if known is not None else (metric(float_model), metric(build(plans)))
    report: dict[str, Any] = {"metric": "baseline", "baseline": base, "all_quantized": everything,
                              "max_drop": max_drop, "sensitivity": {}, "fallback": [], "final": everything}
    if base - everything <= max_drop:
        return list(plans), report
    sensitivity = {}
    for plan in track(list(plans), "sensitivity per layer", enabled=progress):
        sensitivity[plan.name] = base - metric(build([plan]))
    report["sensitivity"] = sensitivity
    kept = sorted(plans, key=lambda p: sensitivity[p.name], reverse=True)  # most sensitive first
    score = everything
    while kept and base - score > max_drop:
        plan = kept.pop(0)
        before = score
        score = metric(build(kept))
        report["fallback"].append({"layer": plan.name, "sensitivity": sensitivity[plan.name],
                                   "metric_after": score, "recovered": score - before})
    report["final"] = score
    # Keep the original layer order for the build.
    names = {p.name for p in kept}
    return [p for p in plans if p.name in names], report

"""Per-layer choice of the activation format under `max_drop`: the fast int8 form where it is accurate
enough, per-token activations where one scale per tensor is not, float only where neither is.

Dynamic per-tensor activations (with or without SmoothQuant) run as one fused integer kernel per Linear
in ONNX Runtime, the fast form; per-token activations are more accurate but their graph costs about what
the integer GEMM saves (docs/quantization.md). Which layers need per-token scales is decided from two
measurements, not from the architecture:

1. Each Linear's own output error, on a sample of its real calibration inputs, in its configured form and
   per token: the relative error of each token's output, averaged over tokens (`token_error`). Averaged
   per token, not over the whole tensor: a transformer's first token often carries activations ten times
   larger than the rest (all-mpnet-base-v2 from layer 1 on), which dominate a whole-tensor norm and
   hide the error one stretched scale inflicts on every other token. Layers that read the very same
   tensor (q, k and v) are one candidate, since they share its quantization in the exported graph.
2. The model's metric (the `max_drop` metric) with the top-k candidates, ranked by how much error per
   token would remove, switched to per-token: k = 1, 2, 4, ... until the metric is within `max_drop`,
   then the smallest such k between the last two by bisection. About 2 log2(candidates) evaluations,
   where the float fallback's sensitivity analysis costs one per layer.

Only layers whose per-token error is at most `PER_TOKEN_GAIN` times smaller are candidates: a layer that
per-token scales barely help is left to the float fallback, which runs after this with the layers as
chosen here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .smooth import SmoothObserver, _fake_quant_input, _fake_quant_weight, observe_inputs

__all__ = ["token_error", "choose_per_token", "PER_TOKEN_GAIN"]

PER_TOKEN_GAIN = 1.5  # a candidate's per-tensor error must be at least this many times its per-token error


def token_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor | None, wq, aq) -> float:
    """Sum over `weights` of the mean over rows of x of |y_q - y|^2 / |y|^2: the relative output error of
    each token, averaged over tokens, with input and weight quantized as `wq` / `aq` say (smoothed by s)."""
    xq = _fake_quant_input(x if s is None else x / s, aq)
    total = 0.0
    for w in weights:
        w = w.detach().float()
        ref = x @ w.t()
        got = xq @ _fake_quant_weight(w if s is None else w * s, wq).t()
        per_row = (got - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-30)
        total += float(per_row.mean())
    return total


def choose_per_token(
    plans: Sequence[Any],
    groups: list[list[str]],
    samples: dict[str, SmoothObserver],
    build: Callable[[Sequence[Any]], nn.Module],
    metric: Callable[[nn.Module], float],
    base: float,
    max_drop: float,
) -> tuple[list[Any], dict[str, Any]]:
    """The plans with the fewest dynamic per-tensor Linears switched to per-token activations that brings
    `metric(build(plans))` within `max_drop` of `base` (all candidates switched when none does), and a
    report. `groups`: names that read the same input; `samples`: each group's first member's input sample.
    A switched layer keeps its smoothing factors or drops them, whichever gives the lower error."""
    by_name = {p.name: p for p in plans}
    candidates = []
    for names in groups:
        members = [by_name[n] for n in names if n in by_name]
        if not members or not all(_per_tensor(p) for p in members):
            continue
        obs = samples.get(members[0].name)
        if obs is None or obs.absmax is None:
            continue
        x = obs.sample()
        weights = [p.module.weight for p in members]
        fast = token_error(x, weights, members[0].smooth, members[0].weights, members[0].activations)
        aq = members[0].activations.model_copy(update={"per_token": True})
        # Per token, the layer keeps its smoothing factors or drops them, whichever errs less (a new
        # search over the alpha grid would cost as much as the smoothing pass itself on a 110M model).
        options = [(token_error(x, weights, None, members[0].weights, aq), None)]
        if members[0].smooth is not None:
            options.append((token_error(x, weights, members[0].smooth, members[0].weights, aq), members[0].smooth))
        accurate, s = min(options, key=lambda o: o[0])
        candidates.append({"layers": [p.name for p in members], "error": fast, "error_per_token": accurate,
                           "gain": fast - accurate, "smooth": s, "activations": aq})
    candidates.sort(key=lambda c: c["gain"], reverse=True)
    eligible = [c for c in candidates if c["error"] >= PER_TOKEN_GAIN * c["error_per_token"]]
    report: dict[str, Any] = {"baseline": base, "max_drop": max_drop, "per_token_gain": PER_TOKEN_GAIN,
                              "candidates": [{k: v for k, v in c.items() if k not in ("smooth", "activations")}
                                             for c in candidates], "evaluations": [], "per_token": []}

    def switched(k: int) -> list[Any]:
        change = {}
        for c in eligible[:k]:
            for name in c["layers"]:
                change[name] = c
        return [dataclasses.replace(p, activations=change[p.name]["activations"], smooth=change[p.name]["smooth"])
                if p.name in change else p for p in plans]

    scores: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in scores:
            scores[k] = metric(build(switched(k)))
            report["evaluations"].append({"per_token_candidates": k, "metric": scores[k]})
        return scores[k]

    fits = lambda k: base - score(k) <= max_drop  # noqa: E731
    if not eligible or fits(0):
        report["final"] = score(0)
        return list(plans), report
    lo, hi = 0, 1  # fits(lo) is False; look for a hi that fits
    while hi < len(eligible) and not fits(hi):
        lo, hi = hi, min(2 * hi, len(eligible))
    if fits(hi):
        while hi - lo > 1:  # smallest k in (lo, hi] that fits
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    k = hi
    report["per_token"] = [name for c in eligible[:k] for name in c["layers"]]
    report["final"] = score(k)
    return switched(k), report


def _per_tensor(plan: Any) -> bool:
    aq = plan.activations
    return (aq is not None and aq.dynamic and not aq.per_token and isinstance(plan.module, nn.Linear))


def per_token_under_budget(model: nn.Module, plans: Sequence[Any], build: Callable, metric: Callable, cfg: Any,
                           ctx: Any) -> tuple[list[Any], dict[str, Any] | None]:
    """`choose_per_token` for `quantize_model`: one pass over the calibration data samples the inputs of
    the dynamic per-tensor Linears (and finds which read the same tensor); None as the report when no
    layer is a candidate. Warns once, naming the layers switched."""
    from ..core import data as D

    todo = [p for p in plans if _per_tensor(p)]
    if not todo or ctx.data is None:
        return list(plans), None
    samples, groups = observe_inputs(model, todo, D.take(ctx.data, cfg.calibration_batches))
    chosen, report = choose_per_token(plans, groups, samples, build, metric,
                                      metric(model), cfg.max_drop)
    if report["per_token"]:
        ctx.warn(f"quantize: {len(report['per_token'])} Linear(s) take per-token activations to stay within "
                 f"max_drop={cfg.max_drop} (metric {report['final']:.4g}): {', '.join(report['per_token'][:6])}"
                 f"{', ...' if len(report['per_token']) > 6 else ''}")
    return chosen, report

"""The predicted side of `st.auto`: each layer's options (keep, or an analysed action) with a
predicted cost and measured drop, and the plans on the lower convex hull of (summed drop, summed
cost), from a Lagrangian relaxation of the multiple-choice knapsack "least cost with the summed drops
within the budget": for a price lambda on the drop, each layer independently takes the option
minimising cost + lambda * drop; sweeping lambda through every breakpoint gives every hull plan.
"""

from __future__ import annotations

from .actions import Action
from .analysis import Analysis
from .job import Plan

__all__ = ["layer_options", "lagrangian_plans", "Options"]

Options = dict[str, list[tuple[str | None, float, float]]]  # layer -> (action or None, cost, drop)


def layer_options(analysis: Analysis, objective: str, usable: dict[str, Action],
                  min_speedup: float | None = None) -> dict[str, list[tuple[str | None, float, float]]]:
    """Per layer: (action or None for "keep", predicted cost, measured drop >= 0) of every usable option.
    Latency of a changed layer is predicted in proportion to its MACs times the action's `speed`
    (quantized weights alone do not make a CPU layer faster); for size and MACs, size breaks ties.
    `min_speedup` (the joint objective): on a layer that takes at least 1 % of the measured time, only the
    options predicted at least that much faster than the layer (an embedding's lookup, a pooler nobody
    waits on: any option); the candidates' real speed is measured in ONNX Runtime all the same."""
    total = analysis.totals
    # objective size: channel actions only when nothing else is given. Their measured bytes are mostly the
    # inputs they take from the layers they feed, which those layers' own actions (pruned and shared) save
    # better, and their drops compound with them: on the MNIST CNN the hull stacked conv0 chan50 (predicted
    # free) over conv3 prune75+share2 and that plan lost 0.44 pt, 0.22 without conv0 chan50
    drop_channels = objective == "size" and any(a.family != "channels" for a in usable.values())
    options = {}
    for lp in analysis.layers:
        def cost(bytes_, macs, speed=1.0):
            primary = {"size": bytes_, "macs": macs,
                       "latency": speed * lp.latency_ms * (max(macs, 0) / lp.macs if lp.macs else 1.0)}[objective]
            scale = {"size": 0.0, "macs": total["macs"], "latency": 0.0}[objective]  # latency: no size tie-break,
            # a change that does not speed the layer up costs runtime work (QDQ pairs) and is left out
            return primary + 1e-6 * scale * bytes_ / max(total["bytes"], 1)

        def fast_enough(e, speed) -> bool:
            if min_speedup is None or lp.latency_share < 0.01 or not lp.macs:
                return True
            return speed * max(e["macs_after"], 0) / lp.macs <= 1.0 / min_speedup

        opts = [(None, cost(lp.bytes, lp.macs), 0.0)]
        for action, e in analysis.results.get(lp.name, {}).items():
            if e["status"] == "ok" and action in usable and not (drop_channels and usable[action].family == "channels") \
                    and fast_enough(e, usable[action].speed):
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

"""The path of `st.auto` through the plans, in rounds of `probes` candidates: the uniform
single-action plans, a k-ary search over the Lagrangian hull for the cheapest plan whose measured
drop fits, then single-layer moves to cheaper options from the best fitting candidate (the fitting
moves of a round merged into the next round's first candidate). Every decision is taken from
complete rounds, so the path does not depend on the number of workers.
"""

from __future__ import annotations

from typing import Any

from .evaluate import Evaluator, objective_cost
from .hull import Options
from .job import Plan, plan_key

__all__ = ["search", "uniform_plans", "merge_moves"]


def uniform_plans(options: Options, objective: str) -> list[tuple[Plan, str]]:
    """Each action on every layer that takes it, cheapest predicted first: the single-method plans
    the joint search must beat, and a start for the moves when the hull's combinations fail. A layer
    the action does not make cheaper is left as it is (for size too: sharing a 288-weight first conv
    stores a codebook and Huffman tables that outweigh it, and only adds drop to every uniform plan)."""
    totals: dict[str, tuple[float, Plan]] = {}
    for layer, opts in options.items():
        keep = next(o[1] for o in opts if o[0] is None)
        for action, cost, _ in opts:
            if action is None or cost >= keep:
                continue
            saved, plan = totals.get(action, (0.0, {}))
            totals[action] = (saved + keep - cost, {**plan, layer: action})
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [(plan, f"uniform {action}") for action, (_, plan) in ranked]


def search(hull: list[tuple[Plan, float, float]], options: Options, ev: Evaluator, *, uniform: bool = True) -> None:
    """Rounds until the budget (evaluations or time) is spent or nothing is left to try."""
    probes = ev.config.probes
    if uniform and ev.budget > probes:
        ev.round(uniform_plans(options, ev.objective)[: min(probes, ev.left())])
    _hull_rounds(hull, ev, probes)
    _move_rounds(options, ev, probes)


def _hull_rounds(hull: list[tuple[Plan, float, float]], ev: Evaluator, probes: int) -> None:
    """A k-ary search for the cheapest hull plan that fits: the first round around the cheapest plan
    predicted to fit (and below it: the fallbacks when the held-out check refuses it)."""
    lo, hi = 0, len(hull)  # hull[lo] fits (keep everything); hull[hi:] is known (or assumed) not to
    guess = max([i for i, (_, _, d) in enumerate(hull) if d <= ev.limit] or [0])
    first = True
    while hi - lo > 1 and ev.left() > 0:
        room = min(probes, ev.left(), hi - lo - 1)
        if first:  # most of the hull is far off
            near = [guess + o for o in _spread(2 * len(hull) + 2) if lo < guess + o < hi]
            picks = sorted(near[:room])
            first = False
        else:
            picks = sorted({lo + round((j + 1) * (hi - lo) / (room + 1)) for j in range(room)} - {lo, hi})
        if not picks:
            break
        ev.round([(hull[i][0], f"hull {i}/{len(hull) - 1}") for i in picks])
        for i in picks:
            if _fits_plan(hull[i][0], ev.candidates):
                lo = max(lo, i)
        failing = [i for i in picks if i > lo and not _fits_plan(hull[i][0], ev.candidates)]
        hi = min([hi, *failing]) if failing else hi
        if not failing and max(picks) >= hi - 1:
            break


def _move_rounds(options: Options, ev: Evaluator, probes: int) -> None:
    """Single-layer moves from the best fitting candidate, best predicted saving per unit of drop first."""
    tried: set[tuple] = set()
    merged: list[tuple[Plan, str]] = []  # the fitting moves of the last round, all taken together
    while ev.left() > 0:
        fitting = [c for c in ev.candidates if c["fits"]]
        if not fitting:
            return
        best = min(fitting, key=lambda c: objective_cost(c, ev.objective))
        moves = []
        for layer, opts in options.items():
            cur = next(o for o in opts if o[0] == best["plan"].get(layer))
            for action, cost, drop in opts:
                plan = {**best["plan"], layer: action}
                if action is None:
                    plan.pop(layer)
                if cost < cur[1] and tuple(sorted(plan.items())) not in tried:
                    moves.append(((cur[1] - cost) / (max(drop - cur[2], 0.0) + 1e-9), layer, action, plan))
        moves.sort(key=lambda m: (-m[0], m[1], str(m[2])))
        room = min(probes, ev.left())
        batch = [(plan, label) for plan, label in merged if tuple(sorted(plan.items())) not in tried][:room]
        taken = {tuple(sorted(plan.items())) for plan, _ in batch}
        moves = [m for m in moves if tuple(sorted(m[3].items())) not in taken]
        batch += [(plan, f"{best['label']} + {layer}:{action}") for _, layer, action, plan in moves[: room - len(batch)]]
        if not batch:
            return
        for plan, _ in batch:
            tried.add(tuple(sorted(plan.items())))
        merged = merge_moves(best, ev.round(batch), options)


def merge_moves(best: dict[str, Any], results: list[dict[str, Any]], options: Options) -> list[tuple[Plan, str]]:
    """The greedy's next step beyond one move per round: when several single-layer moves from `best`
    fitted, the plan taking all of them (on a layer moved twice, its cheaper option), proposed first
    in the next round. Drops do not add exactly, so it is measured like any other candidate."""
    base = best["plan"]
    moved: dict[str, str | None] = {}
    for c in results:
        if not c["fits"]:
            continue
        diff = {layer for layer in set(base) | set(c["plan"]) if base.get(layer) != c["plan"].get(layer)}
        if len(diff) != 1:
            continue
        layer = diff.pop()
        action = c["plan"].get(layer)
        cost = {o[0]: o[1] for o in options[layer]}
        if layer not in moved or cost[action] < cost[moved[layer]]:
            moved[layer] = action
    if len(moved) < 2:
        return []
    plan = {**base, **moved}
    plan = {layer: action for layer, action in plan.items() if action is not None}
    return [(plan, f"{best['label']} + " + " + ".join(f"{layer}:{moved[layer]}" for layer in sorted(moved)))]


def _spread(n: int) -> list[int]:
    """Offsets around the predicted point: 0, +1, -1, +2, -2, ..."""
    out = [0]
    k = 1
    while len(out) < n:
        out.append(k)
        if len(out) < n:
            out.append(-k)
        k += 1
    return out


def _fits_plan(plan: Plan, candidates: list[dict[str, Any]]) -> bool:
    key = plan_key(plan)
    return any(c["key"] == key and c["fits"] for c in candidates)

"""The choice at the end of `st.auto`: the cheapest fitting candidate that also fits on the held-out
check and in ONNX Runtime (a candidate failing either is passed over, at most `max_verifications`);
when nothing fits, the candidate with the smallest drop, marked `fits=False` with a plain message.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import one_line
from ..export.runtimes import NAMES as RUNTIME_NAMES
from .evaluate import Evaluator, objective_cost
from .job import latency_onnx
from ..core.pareto import pareto_front

__all__ = ["choose", "pareto_fronts"]


def pareto_fronts(candidates: list[dict[str, Any]], timed: bool) -> dict[str, list[int]]:
    ok = {i for i, c in enumerate(candidates) if c["status"] == "ok"}
    metrics = [c.get("metric") for c in candidates]
    fronts = {"size": pareto_front([c["bytes"] if i in ok else None for i, c in enumerate(candidates)], metrics)}
    if timed:
        fronts["latency"] = pareto_front([c.get("latency_ms") for c in candidates], metrics)
    return fronts


def _held_out(ev: Evaluator, c: dict[str, Any], model, held_out, held_base: float) -> bool:
    with torch.no_grad():
        value = float(held_out(model))
    c["verify_metric"], c["verify_drop"] = value, held_base - value
    if held_base - value <= ev.limit + 1e-12:
        return True
    c["fits"] = False
    ev.warnings.append(f"auto: {c['label']} fits on the search data but not on the held-out check (drop "
                       f"{held_base - value:.4g} > {ev.limit:.4g}); the next candidate is tried")
    return False


def _in_runtime(ev: Evaluator, c: dict[str, Any], metric) -> bool | None:
    """True / False: fits in the runtime (AutoConfig.runtime) or not; None: the runtime could not run it
    (PyTorch's figures kept)."""
    threads, runtime = ev.config.threads, ev.config.runtime
    try:
        ms, value = latency_onnx(ev.job.onnx(c["plan"]), ev.inputs, threads, metric, runtime)
        base_ms, _ = latency_onnx(ev.job.onnx({}), ev.inputs, threads, runtime_name=runtime)
    except Exception as exc:  # the runtime could not run it: say so, keep PyTorch's figures
        ev.warnings.append(f"auto: {c['label']} was not verified in {RUNTIME_NAMES[runtime]}: {one_line(exc)}")
        return None
    c.update(runtime=runtime, runtime_metric=value, runtime_latency_ms=ms, runtime_latency_original_ms=base_ms)
    if ev.baseline - value <= ev.limit + 1e-12:
        return True
    c["fits"] = False
    ev.warnings.append(f"auto: {c['label']} fits in PyTorch but not in {RUNTIME_NAMES[runtime]} (metric {value:.4g}); "
                       f"the next candidate is tried")
    return False


def _verified(ev: Evaluator, metric: Callable, held_out: Callable | None) -> int | None:
    """The first fitting candidate, cheapest first, that passes the held-out and runtime checks."""
    cands = ev.candidates
    fitting = sorted((i for i, c in enumerate(cands) if c["fits"] and c["plan"]),
                     key=lambda i: objective_cost(cands[i], ev.objective))
    held_base = None
    if held_out is not None and fitting:
        with torch.no_grad():
            held_base = float(held_out(ev.job.original))
    for n, i in enumerate(fitting):
        if n >= ev.config.max_verifications:
            ev.warnings.append(f"auto: {ev.config.max_verifications} fitting candidates failed their checks; the rest "
                               f"are not verified")
            return None
        c = cands[i]
        if held_base is not None and not _held_out(ev, c, ev.job.model(c["plan"]), held_out, held_base):
            continue
        if ev.config.verify_runtime and _in_runtime(ev, c, metric) is False:
            continue
        return i
    return None


def choose(ev: Evaluator, metric: Callable, held_out: Callable | None) -> tuple[int, bool, str]:
    """(index of the chosen candidate, whether it fits, the message)."""
    cands, limit, max_drop = ev.candidates, ev.limit, ev.config.max_drop
    chosen = _verified(ev, metric, held_out)
    if chosen is not None:
        c = cands[chosen]
        where = RUNTIME_NAMES[ev.config.runtime]
        message = (f"chosen: {c['label']} ({len(c['plan'])} layers changed), metric {c['metric']:.4g} "
                   f"(drop {c['drop']:.4g} <= {limit:.4g}, max_drop {max_drop}"
                   + (f" less margin {max_drop - limit:.4g}" if limit < max_drop else "") + ")"
                   + (f", held-out drop {c['verify_drop']:.4g}" if "verify_drop" in c else "")
                   + (f", {where} metric {c['runtime_metric']:.4g}" if "runtime_metric" in c else "")
                   + (f", {c['speedup']:.2f}x faster in {where}" if "speedup" in c else "")
                   + f", {c['bytes']:,} bytes on disk vs {cands[0]['bytes']:,}")
        return chosen, True, message
    compressed = [i for i, c in enumerate(cands) if c["status"] == "ok" and c["plan"]]
    if compressed:
        chosen = min(compressed, key=lambda i: (cands[i].get("verify_drop", cands[i]["drop"]),
                                                objective_cost(cands[i], ev.objective)))
        c = cands[chosen]
        extra = _constraints(ev)
        message = (f"NO CANDIDATE MEETS THE BUDGET max_drop={max_drop}{extra}: the best compressed candidate, "
                   f"{c['label']}, drops the metric by {c.get('verify_drop', c['drop']):.4g}"
                   + (f" at {c['speedup']:.2f}x the original's speed" if "speedup" in c else "")
                   + "; it is returned marked fits=False. Raise max_drop"
                   + (", lower the speed floor or the size cap" if extra else "")
                   + ", or keep the original model (drop 0)")
        ev.warnings.append("auto: " + message)
        return chosen, False, message
    if any(c["plan"] for c in cands):
        message = "no compressed candidate could be evaluated (every one failed); the original model is returned"
    else:  # the hull held no plan but "keep everything": no action makes a layer cheaper
        message = (f"no action makes any layer cheaper for objective {ev.objective!r} (every action's measured cost is "
                   f"at or above the layer's own), so no candidate was built; the original model is returned. Try "
                   f"other actions (--actions), or another objective")
    ev.warnings.append("auto: " + message)
    return 0, True, message


def _constraints(ev: Evaluator) -> str:
    cfg = ev.config
    return ((f", min_speedup={cfg.min_speedup}" if cfg.min_speedup is not None else "")
            + (f", max_bytes={cfg.max_bytes}" if cfg.max_bytes is not None else ""))

"""`st.auto`: one action per layer, chosen jointly under a metric budget, verified on held-out data
and on ONNX Runtime.

1. `analyze` measures each layer's drop and cost under each action alone (cached; structural
   actions after a short recovery when `recovery` is given).
2. A Lagrangian relaxation of the multiple-choice knapsack "least cost with the summed drops within
   the budget": for a price lambda on the drop, each layer independently takes the option minimising
   cost + lambda * drop. Sweeping lambda through every breakpoint gives the lower convex hull of
   plans, from "keep everything" (drop 0) to "cheapest everywhere".
3. Drops do not add up exactly, so the hull is walked with real evaluations, in rounds of `probes`
   candidates (a k-ary search for the cheapest hull plan whose measured drop fits), then rounds of
   single-layer moves to cheaper options from the best fitting candidate. Each candidate is built in
   the sound order (plan.py: structure, recovery by distillation from the original, sharing,
   quantization), seeded from the plan, and evaluated in `workers` processes or on Ray; the rounds
   do not depend on the workers, so neither does the result.
4. Every evaluated candidate is a point of the Pareto frontiers (metric against size and against
   latency); the objective picks the cheapest fitting one, which must ALSO fit on the held-out check
   (`verify_fn`, or fidelity on `verify_data`) and in ONNX Runtime; a candidate failing either is
   passed over for the next (at most `max_verifications`).
5. Nothing fits: the candidate with the smallest drop is returned with `fits=False` and a message.
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
from ..errors import ConfigError, ShrinkError, one_line
from .actions import Action, resolve_actions
from .analysis import Analysis, _RecordedOutputs, _first_samples, analyze
from .cache import EvalCache, data_hash, fingerprint, fn_hash
from .histogram import layer_histogram
from .parallel import check_backend, run_all
from .pareto import pareto_front
from .plan import FAMILY_ORDER, RecoveryConfig, as_recovery, build_plan

__all__ = ["auto", "AutoResult", "OBJECTIVES", "FAMILY_ORDER", "lagrangian_plans", "RecoveryConfig"]

OBJECTIVES = ("size", "latency", "macs")

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
    Latency of a changed layer is predicted in proportion to its MACs times the action's `speed`
    (quantized weights alone do not make a CPU layer faster); for size and MACs, size breaks ties."""
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

        opts = [(None, cost(lp.bytes, lp.macs), 0.0)]
        for action, e in analysis.results.get(lp.name, {}).items():
            if e["status"] == "ok" and action in usable and not (drop_channels and usable[action].family == "channels"):
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


# -- evaluation ------------------------------------------------------------------------------------

def _latency_onnx(path: Path, inputs: D.Inputs, threads: int, metric: Callable | None = None) -> tuple[float, float | None]:
    """Median ms of ONNX Runtime on the profiling batch and, when asked, the metric of the runtime model."""
    from ..export import OrtModel
    from ..measure.latency import onnx_latency

    runtime = OrtModel(path, threads=threads)
    feed = runtime.feed(*inputs[0], **inputs[1])
    ms = onnx_latency(runtime.session, feed, warmup=3, runs=15).median_ms
    value = None
    if metric is not None:
        with torch.no_grad():
            value = float(metric(runtime))
    return ms, value


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _plan_key(plan: Plan) -> str:
    return fingerprint(sorted(plan.items()))


def _seed_for(seed: int, key: str) -> int:
    return (seed * 1_000_003 + int(key[:8], 16)) % 2**31


class _Job:
    """What an evaluation needs; a plain function of the plan, run in any process."""

    def __init__(self, original, by_name, data, train_data, recovery, metric, objective, example, one, workdir, seed):
        self.original, self.by_name, self.data, self.train_data = original, by_name, data, train_data
        self.recovery, self.metric, self.objective, self.example, self.one = recovery, metric, objective, example, one
        self.workdir, self.seed = workdir, seed

    def build(self, plan: Plan) -> nn.Module:
        return build_plan(self.original, plan, self.by_name, self.data, recovery=self.recovery,
                          train_data=self.train_data, seed=_seed_for(self.seed, _plan_key(plan)))

    def __call__(self, plan: Plan) -> dict[str, Any]:
        from ..core.artifact import save_artifact
        from ..export import export_onnx
        from ..measure.macs import count_macs
        from ..measure.size import artifact_bytes

        import warnings as pywarnings

        t0 = time.perf_counter()
        entry: dict[str, Any] = {"status": "ok", "note": ""}
        where = self.workdir / _plan_key(plan)[:16]
        try:
            with pywarnings.catch_warnings():
                pywarnings.simplefilter("ignore")
                candidate = self.build(plan)
                entry["bytes"] = artifact_bytes(save_artifact(candidate, where / "artifact"))
                entry["macs"] = count_macs(candidate, self.one)
                with torch.no_grad():
                    value = float(self.metric(candidate))
                if math.isnan(value):
                    raise ValueError("the metric is NaN")
                entry["metric"] = value
                if self.objective == "latency":
                    export_onnx(candidate, where / "model.onnx", self.example)
        except ShrinkError as exc:
            entry.update(status="failed", metric=None, note=str(exc))
        except Exception as exc:  # an eval_fn or a method raising on one candidate must not end the search
            entry.update(status="failed", metric=None, note=one_line(exc))
        entry["seconds"] = time.perf_counter() - t0
        return entry

    def model(self, plan: Plan) -> nn.Module:
        """The candidate: read back from its artifact when this run built it, else rebuilt (seeded: the same)."""
        from ..core.artifact import load_artifact

        where = self.workdir / _plan_key(plan)[:16] / "artifact"
        if not plan:
            return self.original
        if where.is_dir():
            try:
                return load_artifact(where, self.original).eval()
            except ShrinkError:
                pass
        return self.build(plan).eval()

    def onnx(self, plan: Plan) -> Path:
        from ..export import export_onnx

        path = self.workdir / _plan_key(plan)[:16] / "model.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(self.model(plan), path, self.example)
        return path


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
    verify_fn: Callable[[nn.Module], float] | None = None,
    verify_data: Any = None,
    margin: float = 0.0,
    recovery: RecoveryConfig | dict | None = None,
    train_data: Any = None,
    seed: int = 0,
    workers: int = 1,
    backend: str = "process",
    probes: int = 4,
    max_verifications: int = 6,
    uniform: bool = True,
) -> AutoResult:
    """Choose an action per layer so that the metric stays within `max_drop` of the original's and
    the `objective` (size | latency | macs) is least; `model` is not changed.

    The metric is `eval_fn(model)` (higher is better) or, without it, the mean cosine of the outputs
    to the original's on `data`. Held-out check: `verify_fn` (the same metric on data the search does
    not see) or, without an eval_fn, fidelity on `verify_data`; the returned model fits there too.
    Without either, the budget is checked on the search data only (said in `warnings`). `margin`: a
    candidate fits when its drop is <= max_drop - margin, on the search data and the held-out check.
    `recovery` (RecoveryConfig or dict): distillation from the original after the structural actions
    and centroid tuning after sharing, on `train_data` (default `data`); None: every action one shot.
    `max_evaluations`: real candidate evaluations after the analysis, in rounds of `probes`, run by
    `workers` local processes (backend "process") or Ray ("ray"); seeded from `seed`, so the result is
    the same for any number of workers. `uniform`: when the budget allows more than one round, the
    first round tries single actions on every layer (the cheapest predicted `probes` of them), so the
    joint result is never worse than a single method at a uniform setting. `verify_runtime`: the chosen model is exported and scored in
    ONNX Runtime too; latency is always measured there. Returns an AutoResult whose `fits` is False
    when no candidate met the budget.
    """
    t0 = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; use one of: {', '.join(OBJECTIVES)} "
                          f"(size: bytes on disk, latency: ONNX Runtime time, macs: multiply-accumulates)")
    for name, value in (("max_drop", max_drop), ("margin", margin)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}={value!r} must be a number >= 0: max_drop is the most the metric may fall below "
                              f"the original's, in its own units (0.005 for half a point of accuracy in [0, 1]); "
                              f"margin is kept below max_drop")
    if margin > max_drop:
        raise ConfigError(f"margin={margin} is above max_drop={max_drop}: a candidate fits when its drop is <= "
                          f"max_drop - margin; use a margin below max_drop")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes={probes!r} must be an integer >= 1 (candidates per round of the search)")
    if verify_data is not None and eval_fn is not None and verify_fn is None:
        raise ConfigError("verify_data is scored by fidelity, which is the metric only without an eval_fn; with an "
                          "eval_fn pass verify_fn= (the same metric on held-out data)")
    check_backend(backend, workers)
    recovery = as_recovery(recovery)
    chosen_actions, _ = resolve_actions(actions)
    data = D.reiterable(data)
    train_data = None if train_data is None else D.reiterable(train_data)
    if analysis is None:
        analysis = analyze(model, data, eval_fn=eval_fn, actions=chosen_actions, cache_dir=cache_dir,
                           progress=progress, layers=layers, skip=skip, threads=threads, recovery=recovery,
                           train_data=train_data, seed=seed, workers=workers, backend=backend)
    by_name = {a.name: a for a in chosen_actions}
    baseline = analysis.baseline
    original = copy.deepcopy(model).eval()
    inputs = D.check_model_runs(original, data)
    example = next(D.batches(data))
    metric = eval_fn if eval_fn is not None else _RecordedOutputs(original, data).metric(data)
    held_out = verify_fn
    if held_out is None and verify_data is not None:
        verify_data = D.reiterable(verify_data)
        held_out = _RecordedOutputs(original, verify_data).metric(verify_data)
    warnings: list[str] = []
    if held_out is None:
        warnings.append("auto: no held-out check (verify_fn= or verify_data=): the budget was checked on the data "
                        "the search selected on only, so the drop on other data may be larger; pass one, or a margin")
    limit = max_drop - margin
    cache = EvalCache(cache_dir, fingerprint("auto", analysis.to_dict()["results"], analysis.baseline,
                                             [lp.name for lp in analysis.layers], objective, fn_hash(eval_fn),
                                             None if recovery is None else recovery.model_dump(mode="json"), seed,
                                             data_hash(train_data) if train_data is not None and recovery else None))
    workdir = Path(tempfile.mkdtemp(prefix="shrink-auto-"))
    job = _Job(original, by_name, data, train_data, recovery, metric, objective, example, _first_samples(inputs, 1),
               workdir, seed)
    candidates: list[dict[str, Any]] = []
    budget = max(0, min(max_evaluations, 10_000))
    keys: dict[str, int] = {}
    spent = [0]

    def evaluate_round(plans: list[tuple[Plan, str]]) -> list[dict[str, Any]]:
        """Evaluate the new plans of a round (cache first, then the workers); latency timed here, one at a time."""
        fresh = []
        for plan, label in plans:
            key = _plan_key(plan)
            if key in keys or any(_plan_key(p) == key for p, _ in fresh):
                continue
            fresh.append((plan, label))
        todo = [(p, l) for p, l in fresh if cache.get(_plan_key(p)) is None]
        spent[0] += len(fresh)  # read from the cache or not: a resumed search takes the same path
        done = {}
        for (plan, _), entry in zip(todo, run_all(job, [p for p, _ in todo], workers=workers, backend=backend,
                                                  threads=threads, progress=progress,
                                                  description=f"auto: round of {len(todo)} candidates")):
            done[_plan_key(plan)] = entry
            cache.put(_plan_key(plan), entry)  # at once: an interrupted search resumes from here
        if progress and todo:  # the whole search's estimate: the mean evaluation times what the budget has left
            took = [done[_plan_key(p)]["seconds"] for p, _ in todo]
            left = max(0, budget - spent[0]) * sum(took) / len(took) / max(1, min(workers, probes))
            _console().print(f"auto: {spent[0]} of at most {budget} evaluations done, about {left:.0f} s left "
                             f"(then the held-out and runtime checks)")
        out = []
        for plan, label in fresh:
            key = _plan_key(plan)
            entry = dict(cache.get(key))
            entry.pop("key", None)
            entry["cached"] = key not in done
            timed = False
            if objective == "latency" and entry["status"] == "ok" and "latency_ms" not in entry:
                timed = True
                try:
                    entry["latency_ms"], _ = _latency_onnx(job.onnx(plan), inputs, threads)
                except Exception as exc:
                    entry.update(status="failed", note=f"ONNX Runtime: {one_line(exc)}")
            if timed:
                cache.put(key, {k: v for k, v in entry.items() if k != "cached"})
            entry.update(plan=plan, label=label, key=key)
            entry["drop"] = None if entry.get("metric") is None else baseline - entry["metric"]
            entry["fits"] = entry["status"] == "ok" and entry["drop"] <= limit + 1e-12
            if entry["status"] == "failed":
                warnings.append(f"auto: candidate {label} failed: {entry['note']}")
            keys[key] = len(candidates)
            candidates.append(entry)
            out.append(entry)
        return out

    options = _layer_options(analysis, objective, by_name)  # an analysis may hold actions not passed here
    hull = lagrangian_plans(options)
    evaluate_round([({}, "original")])
    spent[0] = 0
    _search(hull, options, objective, limit, probes, budget, spent, evaluate_round, candidates, uniform)
    try:
        return _choose(job, candidates, analysis, objective, max_drop, limit, metric, held_out, baseline, inputs,
                       threads, verify_runtime, max_verifications, warnings, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _uniform_plans(options, objective) -> list[tuple[Plan, str]]:
    """Each action on every layer that takes it, cheapest predicted first: the single-method plans
    the joint search must beat, and a start for the moves when the hull's combinations fail."""
    totals: dict[str, tuple[float, Plan]] = {}
    for layer, opts in options.items():
        keep = next(o[1] for o in opts if o[0] is None)
        for action, cost, _ in opts:
            if action is None or cost >= keep and objective != "size":
                continue
            saved, plan = totals.get(action, (0.0, {}))
            totals[action] = (saved + keep - cost, {**plan, layer: action})
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [(plan, f"uniform {action}") for action, (_, plan) in ranked]


def _search(hull, options, objective, limit, probes, budget, spent, evaluate_round, candidates, uniform=True) -> None:
    """Rounds of `probes` candidates: the uniform single-action plans, a k-ary search over the hull,
    then single-layer moves from the best fitting candidate."""
    if uniform and budget > probes:
        evaluate_round(_uniform_plans(options, objective)[: min(probes, budget - spent[0])])
    lo, hi = 0, len(hull)  # hull[lo] fits (keep everything); hull[hi:] is known (or assumed) not to
    guess = max([i for i, (_, _, d) in enumerate(hull) if d <= limit] or [0])
    first = True
    while hi - lo > 1 and spent[0] < budget:
        room = min(probes, budget - spent[0], hi - lo - 1)
        if first:  # around the cheapest plan predicted to fit: most of the hull is far off
            near = [guess + o for o in _spread(2 * len(hull) + 2) if lo < guess + o < hi]
            picks = sorted(near[:room])  # below the guess too: the fallbacks when the held-out check refuses it
            first = False
        else:
            picks = sorted({lo + round((j + 1) * (hi - lo) / (room + 1)) for j in range(room)} - {lo, hi})
        if not picks:
            break
        results = evaluate_round([(hull[i][0], f"hull {i}/{len(hull) - 1}") for i in picks])
        by_plan = {_plan_key(c["plan"]): c for c in results}
        for i in picks:
            c = by_plan.get(_plan_key(hull[i][0])) or candidates[[_plan_key(x["plan"]) for x in candidates].index(_plan_key(hull[i][0]))]
            if c["fits"]:
                lo = max(lo, i)
        failing = [i for i in picks if i > lo and not _fits_plan(hull[i][0], candidates)]
        hi = min([hi, *failing]) if failing else hi
        if not failing and max(picks) >= hi - 1:
            break
    tried: set[tuple] = set()
    merged: list[tuple[Plan, str]] = []  # the fitting moves of the last round, all taken together
    while spent[0] < budget:
        fitting = [c for c in candidates if c["fits"]]
        if not fitting:
            return
        best = min(fitting, key=lambda c: _objective_cost(c, objective))
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
        room = min(probes, budget - spent[0])
        batch = [(plan, label) for plan, label in merged if tuple(sorted(plan.items())) not in tried][:room]
        taken = {tuple(sorted(plan.items())) for plan, _ in batch}
        moves = [m for m in moves if tuple(sorted(m[3].items())) not in taken]
        batch += [(plan, f"{best['label']} + {layer}:{action}") for _, layer, action, plan in moves[: room - len(batch)]]
        if not batch:
            return
        for plan, _ in batch:
            tried.add(tuple(sorted(plan.items())))
        results = evaluate_round(batch)
        merged = _merge_moves(best, results, options)


def _merge_moves(best: dict[str, Any], results: list[dict[str, Any]], options) -> list[tuple[Plan, str]]:
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
    key = _plan_key(plan)
    return any(c["key"] == key and c["fits"] for c in candidates)


def _objective_cost(c: dict[str, Any], objective: str) -> float:
    if objective == "size":
        return c["bytes"]
    if objective == "macs":
        return c["macs"]
    return c.get("latency_ms", math.inf)


def _choose(job: _Job, candidates, analysis, objective, max_drop, limit, metric, held_out, baseline, inputs, threads,
            verify_runtime, max_verifications, warnings, t0) -> AutoResult:
    ok = [i for i, c in enumerate(candidates) if c["status"] == "ok"]
    pareto = {"size": pareto_front([candidates[i]["bytes"] if i in ok else None for i in range(len(candidates))],
                                   [c.get("metric") for c in candidates])}
    if objective == "latency":
        pareto["latency"] = pareto_front([c.get("latency_ms") for c in candidates], [c.get("metric") for c in candidates])
    compressed = [i for i in ok if candidates[i]["plan"]]
    fitting = sorted((i for i in compressed if candidates[i]["fits"]), key=lambda i: _objective_cost(candidates[i], objective))
    held_base = None
    if held_out is not None and fitting:
        with torch.no_grad():
            held_base = float(held_out(job.original))
    chosen, notes = None, []
    for n, i in enumerate(fitting):
        c = candidates[i]
        if n >= max_verifications:
            warnings.append(f"auto: {max_verifications} fitting candidates failed their checks; the rest are not verified")
            break
        model = job.model(c["plan"])
        if held_base is not None:
            with torch.no_grad():
                value = float(held_out(model))
            c["verify_metric"], c["verify_drop"] = value, held_base - value
            if not held_base - value <= limit + 1e-12:
                c["fits"] = False
                warnings.append(f"auto: {c['label']} fits on the search data but not on the held-out check (drop "
                                f"{held_base - value:.4g} > {limit:.4g}); the next candidate is tried")
                continue
        if verify_runtime:
            try:
                path = job.onnx(c["plan"])
                ms, value = _latency_onnx(path, inputs, threads, metric)
                base_ms, _ = _latency_onnx(job.onnx({}), inputs, threads)
            except Exception as exc:  # the runtime could not run it: say so, keep PyTorch's figures
                warnings.append(f"auto: {c['label']} was not verified in ONNX Runtime: {one_line(exc)}")
                chosen = i
                break
            c.update(runtime_metric=value, runtime_latency_ms=ms, runtime_latency_original_ms=base_ms)
            if not baseline - value <= limit + 1e-12:
                c["fits"] = False
                warnings.append(f"auto: {c['label']} fits in PyTorch but not in ONNX Runtime (metric {value:.4g}); "
                                f"the next candidate is tried")
                continue
        chosen = i
        break
    if chosen is not None:
        c = candidates[chosen]
        fits = True
        message = (f"chosen: {c['label']} ({len(c['plan'])} layers changed), metric {c['metric']:.4g} "
                   f"(drop {c['drop']:.4g} <= {limit:.4g}, max_drop {max_drop}"
                   + (f" less margin {max_drop - limit:.4g}" if limit < max_drop else "") + ")"
                   + (f", held-out drop {c['verify_drop']:.4g}" if "verify_drop" in c else "")
                   + (f", ONNX Runtime metric {c['runtime_metric']:.4g}" if "runtime_metric" in c else "")
                   + f", {c['bytes']:,} bytes on disk vs {candidates[0]['bytes']:,}")
    elif compressed:
        chosen = min(compressed, key=lambda i: (candidates[i].get("verify_drop", candidates[i]["drop"]),
                                                _objective_cost(candidates[i], objective)))
        c = candidates[chosen]
        fits = False
        message = (f"NO CANDIDATE MEETS THE BUDGET max_drop={max_drop}: the best compressed candidate, {c['label']}, "
                   f"drops the metric by {c.get('verify_drop', c['drop']):.4g}; it is returned marked fits=False. Raise "
                   f"max_drop, or keep the original model (drop 0)")
        warnings.append("auto: " + message)
    else:
        chosen, fits = 0, True
        if any(c["plan"] for c in candidates):
            message = "no compressed candidate could be evaluated (every one failed); the original model is returned"
        else:  # the hull held no plan but "keep everything": no action makes a layer cheaper
            message = (f"no action makes any layer cheaper for objective {objective!r} (every action's measured cost is "
                       f"at or above the layer's own), so no candidate was built; the original model is returned. Try "
                       f"other actions (--actions), or another objective")
        warnings.append("auto: " + message)
    model = job.model(candidates[chosen]["plan"])
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

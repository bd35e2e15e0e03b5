"""Rounds of candidate evaluations for `st.auto`: the cache first, then the workers; ONNX Runtime
timing in this process after each round; the budget in evaluations and in time; the progress line.

A candidate fits when it ran, its drop is within the limit, and, where the config asks, ONNX Runtime
runs it at least `min_speedup` times faster than the original (timed in alternation with it) and its
artifact is at most `max_bytes`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..errors import ConfigError, one_line
from .cache import EvalCache
from .config import AutoConfig, Objective
from .job import Job, Plan, latency_onnx, paired_onnx, plan_key
from .parallel import run_all

__all__ = ["Evaluator", "objective_cost"]


def objective_cost(c: dict[str, Any], objective: str) -> float:
    if objective == "size":
        return c["bytes"]
    if objective == "macs":
        return c["macs"]
    return c.get("latency_ms", math.inf)


def _console():
    from rich.console import Console

    return Console(stderr=True)


class Evaluator:
    """Evaluates rounds of plans and keeps every candidate (candidate 0: the original)."""

    def __init__(self, job: Job, cache: EvalCache, config: AutoConfig, *, baseline: float, inputs: Any,
                 warnings: list[str]) -> None:
        self.job, self.cache, self.config = job, cache, config
        self.baseline, self.inputs, self.warnings = baseline, inputs, warnings
        self.limit = config.max_drop - config.margin
        self.objective = config.objective.value
        self.candidates: list[dict[str, Any]] = []
        self.keys: dict[str, int] = {}
        self.spent = 0
        self.budget = config.max_evaluations
        self.started = time.perf_counter()
        self.round_seconds: list[float] = []

    # -- the budget ----------------------------------------------------------------------------------

    def left(self) -> int:
        """Evaluations the next round may take: the count left, and none when the time budget would
        be passed by another round (the mean round so far)."""
        if self.spent >= self.budget:
            return 0
        tb = self.config.time_budget
        if tb is not None and self.round_seconds:
            mean = sum(self.round_seconds) / len(self.round_seconds)
            if self.elapsed() + mean > tb:
                return 0
        return self.budget - self.spent

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check_time_budget(self) -> None:
        """After the original's evaluation (no build: the cheapest evaluation there is): a time budget
        below it cannot hold one candidate, which is a configuration error, not a search result."""
        tb = self.config.time_budget
        took = self.candidates[0].get("seconds", 0.0) if self.candidates else 0.0
        if tb is not None and tb < took:
            raise ConfigError(f"time budget {tb:g} s is shorter than one evaluation ({took:.1f} s measured for the "
                              f"original model alone, candidates also train and compress): raise --time-budget "
                              f"(time_budget) or drop it and bound the search with --max-evaluations")
        self.started = time.perf_counter()  # the budget covers the candidates' rounds

    # -- a round -------------------------------------------------------------------------------------

    def round(self, plans: list[tuple[Plan, str]], *, count: bool = True) -> list[dict[str, Any]]:
        """Evaluate the new plans of a round (cache first, then the workers); timing here, one at a time."""
        t0 = time.perf_counter()
        fresh: list[tuple[Plan, str]] = []
        for plan, label in plans:
            key = plan_key(plan)
            if key not in self.keys and all(plan_key(p) != key for p, _ in fresh):
                fresh.append((plan, label))
        todo = [(p, lab) for p, lab in fresh if self.cache.get(plan_key(p)) is None]
        if count:
            self.spent += len(fresh)  # read from the cache or not: a resumed search takes the same path
        p = self.config.parallel
        done = {}
        results = run_all(self.job, [plan for plan, _ in todo], workers=p.workers, backend=p.backend.value,
                          threads=self.config.threads, progress=self.config.progress, address=p.ray_address,
                          description=f"auto: round of {len(todo)} candidates")
        for (plan, _), entry in zip(todo, results):
            done[plan_key(plan)] = entry
            self.cache.put(plan_key(plan), entry)  # at once: an interrupted search resumes from here
        out = [self._record(plan, label, cached=plan_key(plan) not in done) for plan, label in fresh]
        if todo and count:
            self.round_seconds.append(time.perf_counter() - t0)
        if self.config.progress and todo and count:
            _console().print(self.progress_line(), highlight=False, soft_wrap=True)
        return out

    def _record(self, plan: Plan, label: str, *, cached: bool) -> dict[str, Any]:
        key = plan_key(plan)
        entry = dict(self.cache.get(key))
        entry.pop("key", None)
        entry["cached"] = cached
        if self.timed and entry["status"] == "ok" and "latency_ms" not in entry:
            self._time(plan, entry)
            self.cache.put(key, {k: v for k, v in entry.items() if k != "cached"})
        entry.update(plan=plan, label=label, key=key)
        entry["drop"] = None if entry.get("metric") is None else self.baseline - entry["metric"]
        entry["fits"] = self.fits(entry)
        if entry["status"] == "failed":
            self.warnings.append(f"auto: candidate {label} failed: {entry['note']}")
        self.keys[key] = len(self.candidates)
        self.candidates.append(entry)
        return entry

    @property
    def timed(self) -> bool:
        return self.objective == "latency" or self.config.min_speedup is not None

    def _time(self, plan: Plan, entry: dict[str, Any]) -> None:
        from ..export.runtimes import NAMES

        threads, runtime = self.config.threads, self.config.runtime
        entry["runtime"] = runtime  # where latency_ms and speedup were measured
        try:
            if not plan:
                entry["latency_ms"], _ = latency_onnx(self.job.onnx(plan), self.inputs, threads, runtime_name=runtime)
                entry["speedup"] = 1.0
            else:
                entry["latency_ms"], entry["speedup"] = paired_onnx(self.job.onnx(plan), self.job.onnx({}),
                                                                    self.inputs, threads, runtime)
        except Exception as exc:  # a candidate the runtime cannot run is failed, the search goes on
            entry.update(status="failed", note=f"{NAMES[runtime]}: {one_line(exc)}")

    def fits(self, c: dict[str, Any]) -> bool:
        cfg = self.config
        if c["status"] != "ok" or c["drop"] is None or not c["drop"] <= self.limit + 1e-12:
            return False
        if cfg.min_speedup is not None and c["plan"] and not c.get("speedup", 0.0) >= cfg.min_speedup:
            return False
        return cfg.max_bytes is None or not c["plan"] or c["bytes"] <= cfg.max_bytes

    # -- what the user sees --------------------------------------------------------------------------

    def best(self) -> dict[str, Any] | None:
        fitting = [c for c in self.candidates if c["fits"] and c["plan"]]
        return min(fitting, key=lambda c: objective_cost(c, self.objective)) if fitting else None

    def progress_line(self) -> str:
        """`auto: 8 of at most 16 evaluations, 2m10s of 10m0s; best so far: <label>, 41,160 bytes (37.9x
        smaller), drop 0.0012; about 95 s left`."""
        cfg = self.config
        line = f"auto: {self.spent} of at most {self.budget} evaluations"
        if cfg.time_budget is not None:
            line += f", {_mmss(self.elapsed())} of {_mmss(cfg.time_budget)}"
        best = self.best()
        if best is None:
            line += "; nothing fits yet"
        else:
            base = self.candidates[0]
            line += (f"; best so far: {best['label']}, {best['bytes']:,} bytes "
                     f"({base['bytes'] / max(best['bytes'], 1):.1f}x smaller)")
            if "speedup" in best:
                line += f", {best['speedup']:.2f}x faster"
            line += f", drop {best['drop']:.4g}"
        if self.round_seconds:
            rounds_left = math.ceil(max(0, self.budget - self.spent) / max(1, cfg.probes))
            left = rounds_left * sum(self.round_seconds) / len(self.round_seconds)
            if cfg.time_budget is not None:
                left = min(left, max(0.0, cfg.time_budget - self.elapsed()))
            line += f"; about {left:.0f} s left (then the held-out and runtime checks)"
        return line


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"

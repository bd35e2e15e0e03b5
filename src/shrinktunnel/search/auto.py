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
   (`verify_fn`, or fidelity on `verify_data`) and in the runtime it will run in (`runtime`: ONNX Runtime,
   OpenVINO or ExecuTorch, which also times the candidates); a candidate failing either is
   passed over for the next (at most `max_verifications`).
5. Nothing fits: the candidate with the smallest drop is returned with `fits=False` and a message.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from ..core import data as D
from ..errors import ConfigError
from .actions import Action, resolve_actions
from .analysis import Analysis, _RecordedOutputs, _first_samples, analyze
from .cache import EvalCache, data_hash, fingerprint, fn_hash
from .choose import choose, pareto_fronts
from .config import AutoConfig, auto_config
from .evaluate import Evaluator
from .histogram import layer_histogram
from .hull import lagrangian_plans, layer_options
from .job import Job
from .parallel import check_backend
from .plan import RecoveryConfig
from .rounds import search

__all__ = ["auto", "AutoResult", "AutoConfig", "OBJECTIVES", "lagrangian_plans", "RecoveryConfig"]

OBJECTIVES = ("size", "latency", "macs")


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
    runtime: str = "ort"  # where the candidates were timed and the chosen one checked

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
                "runtime": self.runtime,
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


def auto(
    model: nn.Module,
    data: Any,
    config: AutoConfig | dict | str | Path | None = None,
    *,
    eval_fn: Callable[[nn.Module], float] | None = None,
    verify_fn: Callable[[nn.Module], float] | None = None,
    verify_data: Any = None,
    train_data: Any = None,
    analysis: Analysis | None = None,
    actions: Iterable[Action | str] | None = None,
    **options: Any,
) -> AutoResult:
    """Choose an action per layer so that the metric stays within `max_drop` of the original's and
    the `objective` (size | latency | macs) is least; `model` is not changed.

    `config`: an AutoConfig, a dict or a YAML file of its keys; `**options` are AutoConfig keys that
    override it (`st.auto(model, data, max_drop=0.005, workers=2)`: workers, backend and ray_address go
    into `parallel`). Unknown keys are a ConfigError naming the allowed ones.

    The metric is `eval_fn(model)` (higher is better) or, without it, the mean cosine of the outputs
    to the original's on `data`. Held-out check: `verify_fn` (the same metric on data the search does
    not see) or, without an eval_fn, fidelity on `verify_data`; the returned model fits there too.
    Without either, the budget is checked on the search data only (said in `warnings`).
    `config.recovery`: training after the lossy actions (distillation after structure, centroid tuning
    after sharing, QAT after low-bit quantization) on `train_data` (default `data`).
    `actions`: names or Action objects (default: config.actions, else every default action).
    Returns an AutoResult whose `fits` is False when no candidate met the budget.
    """
    t0 = time.perf_counter()
    cfg = auto_config(config, options)
    if verify_data is not None and eval_fn is not None and verify_fn is None:
        raise ConfigError("verify_data is scored by fidelity, which is the metric only without an eval_fn; with an "
                          "eval_fn pass verify_fn= (the same metric on held-out data)")
    check_backend(cfg.parallel.backend.value, cfg.parallel.workers)
    chosen_actions, _ = resolve_actions(actions if actions is not None else cfg.actions)
    data = D.reiterable(data)
    train_data = None if train_data is None else D.reiterable(train_data)
    if analysis is None:
        analysis = analyze(model, data, eval_fn=eval_fn, actions=chosen_actions, cache_dir=cfg.cache_dir,
                           progress=cfg.progress, layers=cfg.layers, skip=cfg.skip, threads=cfg.threads,
                           recovery=cfg.recovery, train_data=train_data, seed=cfg.seed,
                           workers=cfg.parallel.workers, backend=cfg.parallel.backend.value,
                           ray_address=cfg.parallel.ray_address)
    original = copy.deepcopy(model).eval()
    inputs = D.check_model_runs(original, data)
    metric = eval_fn if eval_fn is not None else _RecordedOutputs(original, data).metric(data)
    held_out = verify_fn
    if held_out is None and verify_data is not None:
        verify_data = D.reiterable(verify_data)
        held_out = _RecordedOutputs(original, verify_data).metric(verify_data)
    warnings: list[str] = []
    if held_out is None:
        warnings.append("auto: no held-out check (verify_fn= or verify_data=): the budget was checked on the data "
                        "the search selected on only, so the drop on other data may be larger; pass one, or a margin")
    workdir = Path(tempfile.mkdtemp(prefix="shrink-auto-"))
    try:
        job = Job(original, {a.name: a for a in chosen_actions}, data, metric, next(D.batches(data)),
                  _first_samples(inputs, 1), workdir, train_data=train_data, recovery=cfg.recovery,
                  timed=cfg.objective.value == "latency" or cfg.min_speedup is not None, seed=cfg.seed,
                  runtime=cfg.runtime)
        ev = Evaluator(job, _cache(cfg, analysis, eval_fn, train_data), cfg, baseline=analysis.baseline,
                       inputs=inputs, warnings=warnings)
        options_ = layer_options(analysis, cfg.objective.value, job.actions, cfg.min_speedup)  # of these actions only
        hull = lagrangian_plans(options_)
        ev.round([({}, "original")], count=False)
        ev.check_time_budget()
        search(hull, options_, ev, uniform=cfg.uniform)
        chosen, fits, message = choose(ev, metric, held_out)
        return _result(ev, analysis, chosen, fits, message, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _cache(cfg: AutoConfig, analysis: Analysis, eval_fn, train_data) -> EvalCache:
    recovery = None if cfg.recovery is None else cfg.recovery.model_dump(mode="json")
    timing = None if cfg.min_speedup is None else "paired"  # entries timed against the original
    if cfg.runtime != "ort" and (cfg.min_speedup is not None or cfg.objective.value == "latency"):  # timed
        # elsewhere (the key of an ONNX Runtime search is as it was)
        timing = f"{timing}@{cfg.runtime}"
    return EvalCache(cfg.cache_dir, fingerprint("auto", analysis.to_dict()["results"], analysis.baseline,
                                                [lp.name for lp in analysis.layers], cfg.objective.value,
                                                fn_hash(eval_fn), recovery, cfg.seed, timing,
                                                data_hash(train_data) if train_data is not None and recovery else None))


def _result(ev: Evaluator, analysis: Analysis, chosen: int, fits: bool, message: str, t0: float) -> AutoResult:
    cands = ev.candidates
    model = ev.job.model(cands[chosen]["plan"])
    hist = None
    plan = cands[chosen]["plan"]
    if plan:
        layer = max(plan, key=lambda n: next(lp.params for lp in analysis.layers if lp.name == n))
        try:
            hist = layer_histogram(model.get_submodule(layer), layer, bits=None)
        except AttributeError:  # the layer was restructured (decomposed): no single weight to show
            hist = None
    fronts = pareto_fronts(cands, ev.timed)
    for c in cands:
        c.pop("key", None)
    return AutoResult(model, fits, message, chosen, cands, analysis, ev.objective, ev.config.max_drop,
                      analysis.metric_name, analysis.baseline, fronts, ev.warnings, hist, time.perf_counter() - t0,
                      ev.config.runtime)

"""`st.analyze`: for every layer, its size, MACs and share of the measured latency, and how much the
metric drops when ONE candidate action (quantize to N bits, prune, decompose, share weights) is
applied to that layer alone, every other layer untouched.

The metric is `eval_fn(model)` (higher is better) when given; without it, output fidelity: the mean
cosine of the candidate's outputs to the original model's on the data (shrinktunnel.measure.quality),
which needs no labels. Each (layer, action) evaluation goes through the registered method
(`run_stage`), so the analysis measures exactly what the method would do in a recipe.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings as pywarnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .._version import __version__
from ..core import data as D
from ..core.artifact import artifact_nbytes
from ..core.progress import track
from ..core.registry import Context
from ..errors import ModelError, ShrinkError, one_line
from ..measure.macs import count_macs
from ..measure.quality import fidelity
from ..report.tables import Table, fmt_bytes
from .actions import Action, resolve_actions
from .cache import EvalCache, data_hash, entry_key, fingerprint, fn_hash, model_hash
from .histogram import layer_histogram
from .profile import LayerProfile, candidate_layers, profile_layers

if TYPE_CHECKING:
    from .config import AnalyzeConfig

__all__ = ["analyze", "Analysis", "evaluate_candidate"]


@dataclass
class Analysis:
    """What `analyze` measured. `results[layer][action]` is an entry with `status` ("ok", "skipped"
    or "failed"), `metric`, `drop` (baseline - metric: positive is worse), `bytes_after` and
    `macs_after` of that layer, and `note` (why it was skipped or failed)."""

    metric_name: str
    baseline: float
    layers: list[LayerProfile]
    totals: dict[str, Any]
    actions: list[dict[str, Any]]
    results: dict[str, dict[str, dict[str, Any]]]
    skipped_actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    histogram: dict[str, Any] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, layer: str, action: str) -> float | None:
        entry = self.results.get(layer, {}).get(action)
        return entry["drop"] if entry and entry["status"] == "ok" else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "shrinktunnel.analysis", "toolkit": __version__,
                "metric": {"name": self.metric_name, "baseline": self.baseline},
                "totals": self.totals, "layers": [lp.to_dict() for lp in self.layers],
                "actions": self.actions, "skipped_actions": self.skipped_actions,
                "results": self.results, "warnings": self.warnings, "histogram": self.histogram,
                "cache": self.cache, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Analysis":
        return cls(d["metric"]["name"], d["metric"]["baseline"], [LayerProfile(**lp) for lp in d["layers"]],
                   d["totals"], d["actions"], d["results"], d.get("skipped_actions", []), d.get("warnings", []),
                   d.get("histogram"), d.get("cache", {}), d.get("seconds", 0.0))

    def table(self) -> Table:
        """One row per layer: size, MACs, latency share, then the metric's drop under each action."""
        names = [a["name"] for a in self.actions]
        table = Table(f"analysis: drop of {self.metric_name} (baseline {self.baseline:.4g}) when one layer takes an action",
                      ["layer", "kind", "params", "size", "MACs", "latency", *names],
                      note="drop = baseline - metric with only that layer changed (positive: worse); "
                           "skip: the method does not handle the layer; fail: the evaluation failed")
        for lp in self.layers:
            cells = []
            for a in names:
                e = self.results.get(lp.name, {}).get(a)
                cells.append("-" if e is None else {"ok": lambda e: f"{e['drop']:+.4f}", "skipped": lambda e: "skip",
                                                    "failed": lambda e: "fail"}[e["status"]](e))
            table.add(lp.name, lp.kind, f"{lp.params:,}", fmt_bytes(lp.bytes), f"{lp.macs:,}",
                      f"{100 * lp.latency_share:.1f} %", *cells)
        return table

    def save(self, directory: str | Path, *, title: str = "shrink analyze") -> tuple[Path, Path]:
        """Write analysis.json and analysis.html (self-contained, plots inline) into `directory`."""
        from ..core.jsonio import write_json
        from ..report.html import analysis_html

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        jpath, hpath = directory / "analysis.json", directory / "analysis.html"
        write_json(jpath, self.to_dict())
        hpath.write_text(analysis_html(self.to_dict(), self.table(), title=title))
        return jpath, hpath


class _RecordedOutputs:
    """Stands in for the reference model in `fidelity`: returns the reference's outputs recorded
    once, in the order the data yields its batches, so each candidate costs one forward, not two."""

    def __init__(self, model: nn.Module, data: Any) -> None:
        with torch.no_grad():
            self.outputs = [D.first_tensor(D.forward(model, D.split(b)[0])).detach() for b in D.batches(data)]
        self.i = 0

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        out = self.outputs[self.i]
        self.i += 1
        return out

    def metric(self, data: Any) -> Callable[[nn.Module], float]:
        def cosine(candidate: nn.Module) -> float:
            self.i = 0
            return fidelity(candidate, self, data)["cosine"]

        return cosine


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
                                        and torch.equal(sa[k], sb[k]) for k in sa)


def artifact_size(model: nn.Module) -> int:
    """Bytes of the model's artifact on disk (manifest + tensors): what a method's storage really
    costs, whatever it keeps in memory while the model runs; counted in memory (core.artifact)."""
    return artifact_nbytes(model)


def evaluate_candidate(model: nn.Module, stages: list[tuple[str, dict[str, Any]]], data: Any,
                       metric: Callable[[nn.Module], float], base_bytes: int, base_macs: int,
                       inputs: D.Inputs, ctx: Context | None = None, seed: int = 0) -> tuple[dict[str, Any], nn.Module | None]:
    """Apply the stages (method, config) in order to a copy of `model` and measure the result: the entry (status, metric, artifact byte
    and MAC deltas of the whole model against `base_bytes` / `base_macs`, note, seconds) and the candidate (None unless status is "ok").
    `ctx`: the context the stages run in (default: `data` for calibration); seeded with `seed`."""
    from ..core.stage import run_stage
    from .plan import seed_everything

    t0 = time.perf_counter()
    seed_everything(seed)
    ctx = Context(data=data, progress=False) if ctx is None else dataclasses.replace(ctx, warnings=[])
    method = "+".join(m for m, _ in stages)
    entry: dict[str, Any] = {"method": method, "config": [c for _, c in stages], "status": "ok", "metric": None, "note": ""}
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")  # kept in ctx.warnings, reported as the entry's note
            candidate = model
            for stage_method, config in stages:
                candidate = run_stage(candidate, stage_method, config, ctx)
    except ShrinkError as exc:
        entry.update(status="skipped", note=str(exc))
        candidate = None
    except Exception as exc:  # a method's bug on an odd layer must not end a long analysis
        entry.update(status="failed", note=f"{method} raised {one_line(exc)}")
        candidate = None
    if candidate is not None and _same_state(model, candidate):
        entry.update(status="skipped", note="; ".join(ctx.warnings) or f"{method} left the model unchanged")
        candidate = None
    if candidate is not None:
        if ctx.warnings:
            entry["note"] = "; ".join(ctx.warnings)
        entry["bytes_delta"] = artifact_size(candidate) - base_bytes
        entry["macs_delta"] = count_macs(candidate, inputs) - base_macs
        try:
            with torch.no_grad():
                value = float(metric(candidate))
        except Exception as exc:
            entry.update(status="failed", note=f"eval_fn raised {one_line(exc)}")
        else:
            if math.isnan(value):
                entry.update(status="failed", note="eval_fn returned NaN")
            else:
                entry["metric"] = value
    entry["seconds"] = time.perf_counter() - t0
    return entry, (candidate if entry["status"] == "ok" else None)


def analyze(
    model: nn.Module, data: Any, config: "AnalyzeConfig | dict | None" = None, *,
    eval_fn: Callable[[nn.Module], float] | None = None, actions: Iterable[Action | str] | None = None,
    train_data: Any = None, **options: Any,
) -> Analysis:
    """Measure every layer and its sensitivity to every action; `model` is not changed.

    `data`: batches the model runs on (the first one is the profiling batch; all of them score
    fidelity when there is no `eval_fn`). `actions`: names from `shrinktunnel.search.ACTIONS` or
    `Action` objects (default: every built-in action whose method is registered; the others are
    listed in `skipped_actions`). `cache_dir`: evaluations are stored there, keyed by the model, the
    data, the eval_fn, the action configs and the toolkit version, so a second run reads them back and
    an interrupted one resumes. `layers` / `skip`: glob patterns over module names.
    `recovery` (a RecoveryConfig): structural actions (channel and unstructured pruning, decomposition)
    are scored after `recovery.analysis_steps` steps of distillation from the original on `train_data`
    (default `data`), sharing after as many centroid-tuning steps; None: every action one shot.
    `workers` / `backend`: evaluations run in that many local processes ("process") or on Ray ("ray");
    each is seeded from `seed`, so the figures are the same either way (`ray_address`: a running cluster).
    The settings (`layers` ... `ray_address`) are an AnalyzeConfig's: pass one as `config`, or as keywords.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ModelError(f"analyze expects a torch.nn.Module, got {type(model).__name__}")
    from .config import analyze_config
    from .parallel import check_backend, run_all
    from .plan import analysis_recovery, plan_stages, recovery_context

    cfg = analyze_config(config, options)
    layers, skip, seed, threads, progress = cfg.layers, cfg.skip, cfg.seed, cfg.threads, cfg.progress
    workers, backend, ray_address = cfg.parallel.workers, cfg.parallel.backend.value, cfg.parallel.ray_address
    check_backend(backend, workers)
    recovery, cache_dir, latency_runs = cfg.recovery, cfg.cache_dir, cfg.latency_runs
    chosen, skipped_actions = resolve_actions(actions)
    recovery = analysis_recovery(recovery)
    data = D.reiterable(data)
    train_data = None if train_data is None else D.reiterable(train_data)
    model = _frozen_copy(model)
    inputs = D.check_model_runs(model, data)
    one = _first_samples(inputs, 1)  # MACs per sample: one sample counts them (FlopCounterMode is slow)
    names = candidate_layers(model, layers, skip)
    if not names:
        raise ModelError(f"no layer with a weight matches layers={list(layers)} skip={list(skip)}; "
                         f"layers with weights: {', '.join(candidate_layers(model)[:20]) or 'none'}")
    base = _cache_key(model, data, eval_fn, layers, skip, recovery, seed, train_data)
    cache = EvalCache(cache_dir, base)
    metric_name = "eval_fn" if eval_fn is not None else "cosine to the original outputs"
    profiles, totals, baseline = _profile(cache, model, inputs, names, eval_fn, latency_runs, threads, one)

    metric = eval_fn
    by_name = {a.name: a for a in chosen}
    pairs = [(lp, a) for lp in profiles for a in chosen]
    stages = {(lp.name, a.name): plan_stages({lp.name: a.name}, by_name, recovery) for lp, a in pairs}

    def key(lp, a) -> str:
        return entry_key(base, lp.name, a.method, stages[(lp.name, a.name)])

    todo = [(lp, a) for lp, a in pairs if cache.get(key(lp, a)) is None]
    hits = len(pairs) - len(todo)
    if todo and metric is None:
        metric = _RecordedOutputs(model, data).metric(data)
    ctx = recovery_context(model, data, train_data, recovery, next(D.batches(data)))

    def one_pair(pair) -> dict[str, Any]:
        lp, a = pair
        return evaluate_candidate(model, stages[(lp.name, a.name)], data, metric, totals["artifact_bytes"],
                                  totals["macs"], one, ctx=ctx, seed=seed)[0]

    for (lp, a), entry in zip(todo, run_all(one_pair, todo, workers=workers, backend=backend, threads=threads,
                                            address=ray_address, progress=progress,
                                            description=f"analyze: {len(todo)} evaluations")):
        cache.put(key(lp, a), entry)

    results, warnings = _collect(pairs, lambda lp, a: cache.get(key(lp, a)), baseline)
    histogram = _histogram(model, profiles, chosen)
    return Analysis(metric_name, baseline, profiles, totals,
                    [{"name": a.name, "method": a.method, "family": a.family, "level": a.level} for a in chosen],
                    results, skipped_actions, warnings, histogram,
                    {"dir": None if cache.dir is None else str(cache.dir), "hits": hits, "evaluated": len(todo)},
                    time.perf_counter() - t_start)


def _cache_key(model, data, eval_fn, layers, skip, recovery, seed: int, train_data) -> str:
    """What an analysis's figures depend on: the model, data, eval_fn, toolkit, layers and recovery."""
    return fingerprint(model_hash(model), data_hash(data), fn_hash(eval_fn), __version__, list(layers), list(skip),
                       *(() if recovery is None else (recovery.model_dump(mode="json"), seed,
                                                      data_hash(train_data) if train_data is not None else "data")))


def _histogram(model: nn.Module, profiles: list[LayerProfile], chosen: list[Action]) -> dict[str, Any]:
    layer = max(profiles, key=lambda p: p.params).name
    return layer_histogram(model.get_submodule(layer), layer, bits=_grid_bits(chosen))


def _profile(cache: EvalCache, model: nn.Module, inputs, names: list[str], eval_fn, latency_runs: int, threads: int,
             one) -> tuple[list[LayerProfile], dict[str, Any], float]:
    """The per-layer figures and the baseline metric: from the cache, or measured once and cached."""
    profile = cache.profile
    if profile is None or profile.get("layers_analyzed") != names:
        profiles, totals = profile_layers(model, inputs, names, runs=latency_runs, threads=threads, mac_inputs=one)
        with torch.no_grad():
            baseline = float(eval_fn(model)) if eval_fn is not None else 1.0
        if math.isnan(baseline):
            raise ModelError("eval_fn returned NaN on the original model; it must return a number (higher is better)")
        totals["artifact_bytes"] = artifact_size(model)
        profile = {"layers": [p.to_dict() for p in profiles], "totals": totals, "baseline": baseline,
                   "layers_analyzed": names}
        cache.set_profile(profile)
    return [LayerProfile(**p) for p in profile["layers"]], profile["totals"], profile["baseline"]


def _collect(pairs, entry_of: Callable, baseline: float) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Each (layer, action)'s cached entry as the analysis reports it: drop, bytes and MACs after."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    warnings: list[str] = []
    for lp, a in pairs:
        e = entry_of(lp, a)
        metric_value = e.get("metric") if isinstance(e.get("metric"), (int, float)) else None
        ok = e["status"] == "ok" and metric_value is not None
        results.setdefault(lp.name, {})[a.name] = {
            "status": e["status"] if e["status"] != "ok" or ok else "failed",
            "metric": metric_value, "drop": (baseline - metric_value) if ok else None,
            "bytes_after": lp.bytes + e["bytes_delta"] if ok else None,
            "macs_after": lp.macs + e["macs_delta"] if ok else None,
            "note": e.get("note", ""), "seconds": e.get("seconds", 0.0)}
        if e["status"] == "failed":
            warnings.append(f"analyze: {a.name} on {lp.name} failed: {e.get('note')}")
    return results, warnings


def _grid_bits(actions: list[Action]) -> int | None:
    """The bits of the histogram's grid: the narrowest quantize action of 3 bits or more (a 2-bit grid
    has three levels and says little), else 4."""
    bits = sorted(int(a.level) for a in actions if a.family == "quantize" and a.level >= 3)
    return bits[0] if bits else 4


def _first_samples(inputs: D.Inputs, n: int) -> D.Inputs:
    args, kwargs = inputs
    cut = lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A canonicalized copy in eval mode (core/layers.py: the layers every method sees, under the names
    a recipe will select them by); analysis must never update the caller's BatchNorm statistics."""
    import copy

    from ..core.layers import canonicalize

    canonical, _, _ = canonicalize(model)
    return (copy.deepcopy(model) if canonical is model else canonical).eval()

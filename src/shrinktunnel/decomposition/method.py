"""The `decompose` method: plan per layer, choose ranks, factorise, keep only what pays, replay."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core import data as D
from ..core.registry import Context, SearchAction, SearchHooks, register_method
from ..core.select import matches, names_by_module, set_submodule, unmatched_patterns
from ..errors import ArtifactError, DataError
from ..measure import count_macs, count_weights
from . import budget as B
from . import factorize as F
from . import layers as L
from .config import BudgetScope, DecomposeConfig, Method
from .ranks import WHITENED_SCHEMES, SVDCache, check_rank, ranks_for_energy, ranks_for_ratio
from ..core.layers import visible_modules

__all__ = ["decompose_model", "replay_decompose", "LayerPlan", "plan_layers"]

DEFAULT_RATIO = 0.5  # used when the config gives none of rank / energy / ratio / budget


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    kind: str
    scheme: str
    rule: tuple[str, Any] | None  # ("rank" | "energy" | "ratio", value); None: chosen by the budget
    aliases: tuple[str, ...] = ()


def replay_decompose(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the decomposed structure recorded by `decompose_model` (shapes only, no values)."""
    for name, spec in replay["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"decompose replay: the model has no layer {name!r}; pass the architecture the "
                                f"artifact was made from (st.load(dir, model=...))") from None
        kind = L.layer_kind(module)
        if kind != spec["kind"]:
            raise ArtifactError(f"decompose replay: {name} is a {type(module).__name__}, but the artifact decomposed "
                                f"a {spec['kind']}; pass the architecture the artifact was made from")
        set_submodule(model, name, L.build(module, spec["scheme"], list(spec["ranks"])))
    for alias, name in replay.get("shared", {}).items():
        set_submodule(model, alias, model.get_submodule(name))
    return model


def _rule(name: str, cfg: DecomposeConfig) -> tuple[tuple[str, Any] | None, str, bool]:
    """(rule, conv scheme, skip) of one layer: the config's, overridden field by field, last match wins."""
    rule = next(((k, getattr(cfg, k)) for k in ("rank", "energy", "ratio") if getattr(cfg, k) is not None), None)
    if rule is None and cfg.budget is None:
        rule = ("ratio", DEFAULT_RATIO)
    scheme, skip = cfg.conv_scheme.value, False
    for o in cfg.overrides:
        if not matches(name, [o.pattern]):
            continue
        for key in ("rank", "energy", "ratio"):
            if getattr(o, key) is not None:
                rule = (key, getattr(o, key))
        if o.scheme is not None:
            scheme = o.scheme.value
        if "skip" in o.model_fields_set:
            skip = o.skip
    return rule, scheme, skip


def plan_layers(model: nn.Module, cfg: DecomposeConfig, ctx: Context) -> list[LayerPlan]:
    """Which layers are decomposed and by which scheme; everything selected but not handled is warned."""
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip, *(o.pattern for o in cfg.overrides)]):
        ctx.warn(f"decompose: pattern {pattern!r} matches no module")
    names_of = names_by_module(model)
    inside = {id(m) for lr in model.modules() if isinstance(lr, L.LowRank) for m in lr.children()}
    owners: dict[int, list[str]] = {}  # parameter -> the modules holding it (tied weights)
    for name, module in visible_modules(model):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    plans, done = [], set()
    for name, module in visible_modules(model):
        if not name or not matches(name, cfg.layers) or matches(name, cfg.skip) or id(module) in done:
            continue
        # A matrix (or larger) parameter of its own: a layer worth decomposing; norms' 1-d weights are not.
        if isinstance(module, L.LowRank) or not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            continue
        kind = L.layer_kind(module)
        if id(module) in inside:
            ctx.skip(name, "already part of a decomposed layer; kept as it is")
            continue
        if kind is None:
            base = next((c for c in L.KINDS if isinstance(module, c)), None)
            why = (f"subclasses {base.__name__} (its forward or its parent may rely on the weight)" if base else
                   "is not a layer kind decompose handles (Linear, Conv1d, Conv2d)")
            ctx.skip(name, f"{type(module).__name__} {why}; kept whole")
            continue
        rule, scheme, skip = _rule(name, cfg)
        if skip:
            continue
        if kind != "linear" and module.groups > 1:
            label = "depthwise" if module.groups == module.in_channels else f"grouped (groups={module.groups})"
            ctx.skip(name, f"a {label.split(' ')[0]} convolution, already a factorised form; kept whole")
            continue
        scheme = "svd" if kind == "linear" else scheme
        if scheme not in L.schemes_for(kind):
            ctx.skip(name, f"scheme {scheme} needs a 2-d kernel; kept whole (use conv_scheme channel or tucker2 for {kind})")
            continue
        tied = [n for n in owners.get(id(module.weight), []) if n not in names_of[id(module)]]
        if tied:
            ctx.skip(name, f"shares its weight with {tied[0]}; kept whole (decomposing would untie them)")
            continue
        done.add(id(module))
        aliases = tuple(n for n in names_of[id(module)] if n != name)
        plans.append(LayerPlan(name, module, kind, scheme, rule, aliases))
    if not plans:
        ctx.warn("decompose: no Linear/Conv1d/Conv2d layer selected; the model is unchanged")
    return plans


def _fixed_ranks(plan: LayerPlan, cfg: DecomposeConfig, cache: SVDCache) -> list[int]:
    key, value = plan.rule
    if key == "rank":
        return check_rank(plan.name, plan.module, plan.scheme, value)
    if key == "ratio":
        return ranks_for_ratio(plan.module, plan.scheme, value)
    return ranks_for_energy(plan.module, plan.scheme, value, cache, cp_iterations=cfg.cp_iterations, seed=cfg.seed)


def _decompose(plan: LayerPlan, ranks: list[int], cfg: DecomposeConfig, cache: SVDCache):
    return L.decompose_layer(plan.module, plan.scheme, ranks, tucker_iterations=cfg.tucker_iterations,
                             cp_iterations=cfg.cp_iterations, seed=cfg.seed, usv=cache.usv(plan.module, plan.scheme),
                             white=cache.white(plan.module, plan.scheme))


def _whitenings(model: nn.Module, plans: list[LayerPlan], cfg: DecomposeConfig, ctx: Context,
                source: Any) -> tuple[dict[int, F.Whitening], dict[int, Any]]:
    """Each whitenable layer's Whitening (by id of the layer) and its X^T X, from one calibration pass."""
    if cfg.method == Method.SVD or not plans:
        return {}, {}
    if source is None:
        if cfg.method == Method.WHITENED_SVD:
            raise DataError("decompose: method whitened_svd needs data (a few batches of real inputs) to measure each "
                            "layer's inputs: pass data=, or set method: svd")
        return {}, {}
    targets = {p.name: p.module for p in plans if p.scheme in WHITENED_SCHEMES}
    grams = B.input_grams(model, targets, list(D.take(source, cfg.whitening_batches))) if targets else {}
    for name in targets:
        if name not in grams:
            ctx.warn(f"decompose: {name} not whitened (it did not run on the data, or its padding is not zeros of a "
                     f"given size); its plain SVD is used")
    for p in plans:
        if p.scheme not in WHITENED_SCHEMES and cfg.method == Method.WHITENED_SVD:
            ctx.warn(f"decompose: {p.name} ({p.scheme}) is factorised from its weight alone: whitening applies to "
                     f"Linears and to the channel scheme")
    by_id = {id(targets[n]): g for n, g in grams.items()}
    whites = {}
    for i, g in by_id.items():
        whites[i] = F.whitening(g, cfg.whitening_damping)
    return whites, by_id


def _pays(plan: LayerPlan, ranks: list[int], decomposed: nn.Module, x, cfg: DecomposeConfig, ctx: Context,
          threads: int | None) -> bool:
    """False, with a warning, when the decomposed form is not smaller, or measured slower."""
    before, after = plan.module.weight.numel(), L.decomposed_weights(plan.module, plan.scheme, ranks)
    if after >= before:
        ctx.skip(plan.name, f"left whole: its {plan.scheme} form at the chosen ranks has no fewer weights than the layer")
        return False
    if cfg.keep_if_slower and x is not None:
        slower, whole_ms, dec_ms = B.is_slower(plan.module, decomposed, x, threads)
        if slower:
            ctx.skip(plan.name, f"left whole: its {plan.scheme} form ran slower than the whole layer (measured)")
            return False
    return True


def _choose_by_budget(model, plans, fixed, cfg, ctx, cache, batches, inputs, threads) -> dict[str, tuple[list[int], nn.Module, float]]:
    """Ranks of the budgeted layers: candidates per layer, their measured output error, then `allocate`."""
    macs = cfg.budget_metric.value == "macs"

    def cost(module: nn.Module, x) -> float:
        return float(B.layer_macs(module, x)) if macs else float(sum(
            m.weight.numel() for m in module.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)))

    if cfg.budget_scope == BudgetScope.LAYERS:
        original = float(sum(cost(p.module, inputs.get(p.name)) for p in plans))
    else:
        original = float(count_macs(model, D.split(batches[0])[0]) if macs else count_weights(model))
    total = original
    # Layers with a fixed rule count at the cost they will have; their choice is not the budget's.
    for name, (ranks, module, _) in fixed.items():
        plan = next(p for p in plans if p.name == name)
        total -= cost(plan.module, inputs.get(name)) - cost(module, inputs.get(name))
    options: dict[str, list[B.Candidate]] = {}
    names: dict[str, list[str]] = {}
    for plan in plans:
        if plan.rule is not None:
            continue
        x = inputs.get(plan.name)
        whole = B.Candidate(None, None, cost(plan.module, x))
        seen, cands = set(), [whole]
        for ratio in cfg.budget_candidates:
            ranks = ranks_for_ratio(plan.module, plan.scheme, ratio)
            if tuple(ranks) in seen:
                continue
            seen.add(tuple(ranks))
            module, werr = _decompose(plan, ranks, cfg, cache)
            c = B.Candidate(ranks, module, cost(module, x), weight_error=werr)
            if c.cost < whole.cost and L.decomposed_weights(plan.module, plan.scheme, ranks) < plan.module.weight.numel():
                cands.append(c)
        cands.sort(key=lambda c: -c.cost)
        options[plan.name], names[plan.name] = cands, [plan.name, *plan.aliases]
    B.sensitivity(model, names, options, batches, ctx.progress)
    target = cfg.budget * original
    # Only the chosen candidates are timed (timing all of them took minutes on the MNIST CNN); one found
    # slower than its whole layer is dropped and the choice made again, until every chosen one is faster.
    by_name = {p.name: p for p in plans}
    while True:
        choice, reached = B.allocate(options, total, target)
        slow = []
        for name, j in choice.items():
            c, x = options[name][j], inputs.get(name)
            if cfg.keep_if_slower and c.module is not None and x is not None and "slower" not in c.extra:
                c.extra["slower"], c.extra["whole_ms"], c.extra["ms"] = B.is_slower(by_name[name].module, c.module, x, threads)
            if c.extra.get("slower"):
                slow.append((name, j))
        if not slow:
            break
        for name, j in slow:
            c = options[name].pop(j)
            ctx.warn(f"decompose: {name}: the {by_name[name].scheme} form at ranks {c.ranks} ran slower than the whole "
                     f"layer ({c.extra['ms']:.3f} ms vs {c.extra['whole_ms']:.3f} ms); not used")
    if reached > target:
        scope = "selected layers'" if cfg.budget_scope == BudgetScope.LAYERS else "model's"
        ctx.warn(f"decompose: budget {cfg.budget} of the {scope} {cfg.budget_metric.value} not reached: the layers that "
                 f"decompose profitably reach {reached / original:.3f}; decompose more layers or accept it")
    out = {}
    for name, j in choice.items():
        c = options[name][j]
        if c.module is not None:
            out[name] = (c.ranks, c.module, c.weight_error)
    return out


# the search's actions: factors holding 1/2 or 1/4 of the layer's weights, kept even where slower (the
# analysis measures the action itself; the latency objective measures every candidate)
DECOMPOSE_SEARCH = SearchHooks("decompose", order=0, structural=True, actions=tuple(
    SearchAction(f"lowrank1/{d}", {"ratio": 1 / d, "keep_if_slower": False}, 1 / d) for d in (2, 4)))


@register_method("decompose", DecomposeConfig, replay=replay_decompose, search=DECOMPOSE_SEARCH)
def decompose_model(model: nn.Module, cfg: DecomposeConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Low-rank decomposition of a copy of `model`: Linear -> two Linears, Conv -> thin convolutions."""
    model = copy.deepcopy(model).eval()
    plans = plan_layers(model, cfg, ctx)
    source = ctx.data if ctx.data is not None else ctx.example_inputs
    whites, grams = _whitenings(model, plans, cfg, ctx, source)
    cache = SVDCache(whites)
    batches = list(D.take(source, cfg.calibration_batches)) if source is not None else []
    inputs = B.capture_inputs(model, {p.name: p.module for p in plans}, batches) if batches and plans else {}
    threads = None
    if cfg.keep_if_slower and batches and plans:
        threads, note = B.timing_threads()
        if note:
            ctx.warn(note)
    if cfg.keep_if_slower and not batches and plans:
        ctx.warn("decompose: no data, so no layer could be timed; layers were kept whole only when their "
                 "decomposed form is larger (pass data= to leave slower ones whole too)")

    chosen: dict[str, tuple[list[int], nn.Module, float]] = {}
    for plan in plans:
        if plan.rule is None:
            continue
        ranks = _fixed_ranks(plan, cfg, cache)
        module, werr = _decompose(plan, ranks, cfg, cache)
        if _pays(plan, ranks, module, inputs.get(plan.name), cfg, ctx, threads):
            chosen[plan.name] = (ranks, module, werr)
    if any(p.rule is None for p in plans):
        if not batches:
            raise DataError("decompose: a budget needs data to measure each layer's sensitivity (and MACs): pass "
                            "data= (a few batches), or give ranks by ratio, energy or rank instead of budget")
        chosen.update(_choose_by_budget(model, plans, chosen, cfg, ctx, cache, batches, inputs, threads))

    replay: dict[str, Any] = {"layers": {}, "shared": {}}
    for plan in plans:  # in model order, so the replay reads top to bottom
        if plan.name not in chosen:
            continue
        ranks, module, werr = chosen[plan.name]
        for n in (plan.name, *plan.aliases):
            set_submodule(model, n, module)
        spec = {"kind": plan.kind, "scheme": plan.scheme, "ranks": list(ranks), "weight_error": round(werr, 6)}
        white = cache.white(plan.module, plan.scheme)
        if plan.scheme in WHITENED_SCHEMES:
            spec["method"] = "whitened_svd" if white is not None else "svd"
        gram = grams.get(id(plan.module))
        if gram is not None:  # ||(W - W~) X^T|| / ||W X^T|| on the calibration inputs
            w = F.matrix_view(plan.scheme, plan.module.weight.detach())
            approx = F.reconstruct(plan.scheme, L.factors(plan.module, plan.scheme, ranks, usv=cache.usv(
                plan.module, plan.scheme), white=white))
            spec["output_error"] = round(F.output_error(w, F.matrix_view(plan.scheme, approx), gram), 6)
        replay["layers"][plan.name] = spec
        replay["shared"].update({a: plan.name for a in plan.aliases})
    if cfg.fine_tune is not None and chosen:
        _fine_tune(model, cfg, ctx)
    return model, replay


def _fine_tune(model: nn.Module, cfg: DecomposeConfig, ctx: Context) -> None:
    from ..core.train import FitConfig, fit

    if ctx.data is None:
        raise DataError("decompose: fine_tune needs labelled data: pass data= as (inputs, target) batches, "
                        "or remove fine_tune and recover in a following stage")
    ft = cfg.fine_tune
    fit(model, ctx.data, FitConfig(epochs=ft.epochs, lr=ft.lr, optimizer=ft.optimizer,
                                   description="decompose: fine-tuning", progress=ctx.progress))

"""Unstructured pruning (the `prune` method): zero individual weights by magnitude (or at random, the
baseline), per layer or under one global threshold, in one shot or over Zhu & Gupta's gradual (AGP)
schedule while fine-tuning; then store each pruned layer as its kept weights plus the cheaper of a
bitmask and a relative index (`SparseLayer`, codec/sparse).

Fine-tuning runs the user's own training step when the context carries one (`ctx.train_step`, see
`prune_context`), else the built-in loop `core.train.fit` on `ctx.data` with a classification loss (or
`ctx.loss_fn`). The masks are held in between mask updates (pruning/schedule.py).
"""

from __future__ import annotations

import copy
import difflib
import itertools
from typing import Any, Callable

import torch
from torch import nn

from ..core import data as D
from ..core.progress import track
from ..core.registry import Context, SearchAction, SearchHooks, merge_overrides, register_method
from ..core.select import matches, names_by_module, resolve, select_modules, set_submodule, unmatched_patterns
from ..core.train import FitConfig, classification_loss, fit
from ..errors import ConfigError, DataError
from .schedule import MaskSet, Target, agp_sparsity, update_steps
from .sparse_layer import SUPPORTED, SparseLayer
from .unstructured_config import Criterion, PruneConfig, Schedule, Scope
from ..core.layers import visible_modules
from ..core.tied import left_alone, tie, tie_plan, tie_record, tied_pairs

__all__ = ["prune_model", "replay_prune", "plan_targets", "prune_context", "closest_names"]

TrainStep = Callable[[nn.Module, Any], Any]


def prune_context(
    *,
    data: Any = None,
    train_step: TrainStep | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    example_inputs: Any = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
) -> Context:
    """A Context for the `prune` method with its two optional live objects:

    - `train_step(model, batch)`: one step of the caller's own training (forward, backward, optimiser
      step) on `model`, the copy being pruned (the same object at every call, so an optimiser made at
      the first call can be kept); `batch` is the next batch of `data`, cycled, or None without data.
      It replaces the built-in loop; the masks are re-applied after every call.
    - `loss_fn(model, batch) -> loss`: the built-in loop's loss instead of cross-entropy on (x, y).
    """
    return Context(data=D.reiterable(data), example_inputs=example_inputs, eval_fn=eval_fn, progress=progress,
                   train_step=train_step, loss_fn=loss_fn)


# -- which layers -----------------------------------------------------------------------------------

def closest_names(model: nn.Module, pattern: str, n: int = 3) -> list[str]:
    """The module names most like `pattern` (its glob characters ignored), for a did-you-mean hint."""
    names = [name for name, m in visible_modules(model) if name and isinstance(m, SUPPORTED)] or \
            [name for name, _ in visible_modules(model) if name]
    bare = pattern.replace("*", "").replace("?", "").strip(".")
    close = difflib.get_close_matches(bare, names, n=n, cutoff=0.3)
    return close or names[:n]


def _has_own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def plan_targets(model: nn.Module, cfg: PruneConfig, ctx: Context) -> list[Target]:
    """The layers to prune with their final sparsity; everything selected but not prunable is warned."""
    rules = [(o.pattern, o.sparsity) for o in cfg.overrides]
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip, *(p for p, _ in rules)]):
        ctx.warn(f"prune: pattern {pattern!r} matches no module; closest names: {', '.join(closest_names(model, pattern))}")
    for name, module in visible_modules(model):
        if name and matches(name, cfg.layers) and not matches(name, cfg.skip):
            if _has_own_weight(module) and not isinstance(module, SUPPORTED):
                ctx.skip(name, f"{type(module).__name__} is not a supported layer kind; not pruned")
    names_of = names_by_module(model)
    owners: dict[int, set[int]] = {}  # weight parameter -> modules holding it (tied weights)
    for m in model.modules():
        if isinstance(getattr(m, "weight", None), nn.Parameter):
            owners.setdefault(id(m.weight), set()).add(id(m))
    # Tied weights (an Embedding and its lm_head, Embeddings sharing a table) are pruned once (core/tied.py).
    together, refused = tie_plan(model, cfg.layers, cfg.skip)
    followers = {e for embs in together.values() for e in embs}
    generator = torch.Generator().manual_seed(cfg.seed)
    targets: list[Target] = []
    for name, module in select_modules(model, SUPPORTED, cfg.layers, cfg.skip):
        why = left_alone(name, module, SUPPORTED, refused, followers, "not pruned")
        if why is not None:  # "": an Embedding pruned with the Linear it is tied to
            if why:
                ctx.skip(name, why)
            continue
        if len(owners.get(id(module.weight), ())) > 1 + len(together.get(name, ())):
            ctx.skip(name, "its weight is tied to another module's; not pruned (a sparse copy would untie them)")
            continue
        if not bool(torch.isfinite(module.weight).all()):
            raise DataError(f"prune: the weight of {name} holds NaN or infinite values, which have no magnitude to "
                            f"rank; fix the model, or leave the layer dense with skip: [{name!r}]")
        sparsity = cfg.sparsity if cfg.scope == Scope.GLOBAL else resolve(name, rules, cfg.sparsity)
        if sparsity == 0.0:
            continue
        score = torch.rand(module.weight.shape, generator=generator) if cfg.criterion == Criterion.RANDOM else None
        aliases = tuple(n for n in names_of[id(module)] if n != name)
        if isinstance(module, nn.Embedding):  # Embeddings sharing its table: further names of its sparse layer
            aliases += tuple(together.get(name, ()))
        targets.append(Target(name, module, sparsity, aliases, score))
    if not targets:
        ctx.warn("prune: no Linear/Conv1d/Conv2d/Embedding layer selected with a sparsity above 0; the model is unchanged")
    return targets


# -- the schedule and fine-tuning ----------------------------------------------------------------------

def _total_steps(cfg: PruneConfig, ctx: Context) -> int:
    if cfg.steps:
        return cfg.steps
    if not cfg.epochs:
        return 0
    if ctx.data is None:
        raise DataError(f"prune: epochs={cfg.epochs} counts passes over the data, but no data was given; "
                        "pass labelled batches as data, or give steps with a train_step")
    try:
        per_epoch = len(ctx.data)
    except TypeError:
        raise ConfigError("prune: the data has no length, so epochs cannot be counted; give steps instead") from None
    return max(1, round(per_epoch * cfg.epochs))


def _sparsities(cfg: PruneConfig, targets: list[Target], step: int, ramp_end: int) -> dict[str, float]:
    """Scheduled sparsity of every layer (or of all of them, "*", under a global threshold) at `step`."""
    def at(final: float) -> float:
        if cfg.schedule == Schedule.ONESHOT:
            return final
        return agp_sparsity(step, 0, ramp_end, min(cfg.initial_sparsity, final), final)

    if cfg.scope == Scope.GLOBAL:
        return {"*": at(cfg.sparsity)}
    return {t.name: at(t.sparsity) for t in targets}


def _fine_tune(model: nn.Module, masks: MaskSet, cfg: PruneConfig, ctx: Context, total: int, ramp_end: int) -> None:
    updates = set(update_steps(ramp_end, cfg.updates)) if cfg.schedule == Schedule.AGP else set()
    done = 0

    def after_step(_model: nn.Module) -> None:
        nonlocal done
        done += 1
        if done in updates:
            masks.set_sparsity(_sparsities(cfg, masks.targets, done, ramp_end), step=done)
        else:
            masks.apply()

    train_step: TrainStep | None = getattr(ctx, "train_step", None)
    masks.hold()
    try:
        if train_step is not None:
            stream = itertools.cycle([None]) if ctx.data is None else \
                itertools.chain.from_iterable(D.batches(ctx.data) for _ in itertools.count())
            model.train()
            try:
                for batch in track(itertools.islice(stream, total), "pruning: your train_step", total=total,
                                   enabled=ctx.progress):
                    train_step(model, batch)
                    after_step(model)
            finally:
                model.eval()
        else:
            if ctx.data is None:
                raise DataError(f"prune: fine-tuning for {total} steps needs data: pass labelled (inputs, target) "
                                "batches, or a train_step of your own, or set steps and epochs to 0 (one shot)")
            fit_cfg = FitConfig(steps=total, lr=cfg.lr, optimizer=cfg.optimizer.value, weight_decay=cfg.weight_decay,
                                description=f"pruning ({cfg.schedule.value}) and fine-tuning", progress=ctx.progress)
            fit(model, ctx.data, fit_cfg, loss_fn=getattr(ctx, "loss_fn", None) or classification_loss,
                after_step=after_step)
    finally:
        masks.release()


# -- the method -------------------------------------------------------------------------------------

def replay_prune(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the sparse layers recorded by `prune_model` (shapes only; `st.load` fills the values)."""
    for name, spec in replay["layers"].items():
        set_submodule(model, name, SparseLayer.from_spec(spec))
    for alias, name in replay.get("shared", {}).items():
        set_submodule(model, alias, model.get_submodule(name))
    return tie(model, replay.get("tied", {}))


def _recover_pruning(config: dict[str, Any], recovery: Any) -> tuple[str, dict[str, Any]] | None:
    """The search's recovery: prune's own fine-tuning (masks held) on the distillation loss of the context."""
    return ("prune", {**config, "steps": recovery.steps, "lr": recovery.lr}) if getattr(recovery, "steps", 0) else None


# the search's actions (one-shot magnitude pruning of one layer) and plan rules (one stage, per-layer sparsity)
PRUNE_SEARCH = SearchHooks("prune", order=20, structural=True, recover=_recover_pruning, recovers_structure=True,
                           merge=merge_overrides("overrides", "sparsity", {"schedule": "oneshot"}),
                           actions=tuple(SearchAction(f"prune{p}", {"sparsity": p / 100}, p / 100, default=p <= 75)
                                         for p in (25, 50, 75, 90, 95)))  # 90, 95: by name, and in chains with sharing


@register_method("prune", PruneConfig, replay=replay_prune, search=PRUNE_SEARCH, recurrent=True)
def prune_model(model: nn.Module, cfg: PruneConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of `model` (unstructured), fine-tune it if asked, store the pruned layers sparse."""
    model = copy.deepcopy(model).eval()
    targets = plan_targets(model, cfg, ctx)
    if not targets:
        return model, {"layers": {}, "shared": {}, "dense": [], "sparsity": 0.0}
    masks = MaskSet(targets, scope=cfg.scope.value, random=cfg.criterion == Criterion.RANDOM)
    total = _total_steps(cfg, ctx)
    ramp_end = max(1, round(cfg.ramp * total)) if total else 0
    masks.set_sparsity(_sparsities(cfg, targets, 0, ramp_end))
    if total:
        _fine_tune(model, masks, cfg, ctx, total, ramp_end)
    masks.set_sparsity(_sparsities(cfg, targets, max(total, ramp_end), ramp_end))  # the final sparsity, exactly
    return model, _convert(model, masks, cfg, ctx)


def _convert(model: nn.Module, masks: MaskSet, cfg: PruneConfig, ctx: Context) -> dict[str, Any]:
    """Replace each pruned layer by its SparseLayer, unless the sparse form would not be smaller."""
    layers, shared, dense, tied = {}, {}, [], {}
    pairs = tied_pairs(model)  # plan_targets kept a tied Linear only where its Embedding goes with it
    for t in masks.targets:
        layer = SparseLayer.from_module(t.module, masks.masks[t.name], cfg.encoding.value, cfg.index_bits)
        if layer.stored_bytes() >= t.weight.numel() * t.weight.element_size():
            dense.append(t.name)  # too few zeros to pay for an index: stored dense, zeros included
            continue
        for alias in (t.name, *t.aliases):
            set_submodule(model, alias, layer)
            if alias != t.name:
                shared[alias] = t.name
        layers[t.name] = layer.spec()
        tied.update({emb: tie_record(model, emb, t.name) for emb, lin in pairs.items() if lin == t.name})
    tie(model, tied)  # each tied Embedding reads the rows of its Linear's sparse layer
    if dense:
        ctx.warn(f"prune: {', '.join(dense)} stored dense: at this sparsity an index costs more than the zeros it saves")
    replay = {"layers": layers, "shared": shared, "dense": dense, "sparsity": round(masks.sparsity(), 6)}
    if tied:
        replay["tied"] = tied
    return replay

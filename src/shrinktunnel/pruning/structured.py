"""The `prune_channels` method: structured pruning that rewrites layers to fewer channels.

where (graph.py: dependency groups) -> what (importance.py: a score per channel of a group) ->
how many (here: ratios, rules, protection, rounding, global mode) -> how (surgery.py: the rewrite
table) -> check (the forward runs and its output shapes are unchanged) -> optional fine-tuning.
The replay data is the kept indices of every rewritten layer, so `st.load` rebuilds the shapes.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import data as D
from ..core.registry import Context, SearchAction, SearchHooks, merge_rules, register_method
from ..core.select import unmatched_patterns
from ..core.train import FitConfig, classification_loss, fit
from ..errors import ConfigError, DataError, ModelError
from . import surgery
from .config import ChannelPruneConfig, Finetune, FinetuneLoss, Importance, Mode
from .graph import OUTPUT_REASON, Group, build_groups
from .importance import accumulate_gradients, group_scores, input_energies
from .refit import input_moments, refit_layers
from ..core.layers import visible_modules

__all__ = ["prune_channels", "replay_prune_channels", "Selection"]


@dataclass
class Selection:
    group: Group
    kept: list[int]  # kept root channels, increasing
    heads: int | None = None  # kept heads (attention groups)


def replay_prune_channels(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the pruned shapes from the kept indices recorded by `prune_channels` (no values)."""
    return surgery.apply(model, replay["layers"], replay.get("attrs", {}))


# the search's actions: the channel group rooted at the layer loses that share, kept counts multiples of 8 (the
# channel block of ONNX Runtime's NCHWc convs); one stage holds every layer's rules
CHANNELS_SEARCH = SearchHooks("channels", order=10, structural=True, merge=merge_rules, actions=tuple(
    SearchAction(f"chan{p}", {"ratio": 0.0, "rules": [{"pattern": "{layer}", "ratio": p / 100}], "round_to": 8}, p / 100)
    for p in (25, 50, 75)))


@register_method("prune_channels", ChannelPruneConfig, replay=replay_prune_channels, search=CHANNELS_SEARCH)
def prune_channels(model: nn.Module, cfg: ChannelPruneConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Structured pruning of a copy of `model`: channels, FFN neurons and attention heads removed, layers
    rewritten smaller; then optional fine-tuning."""
    original = copy.deepcopy(model).eval()
    example = _example(ctx)
    _warn_patterns(original, cfg, ctx)
    work = copy.deepcopy(original)
    groups = build_groups(work, example)
    if cfg.importance == Importance.TAYLOR:
        if ctx.data is None:
            raise DataError("prune_channels: importance 'taylor' needs labelled data=; or use l1, l2 or bn_scale")
        accumulate_gradients(work, ctx.data, cfg.calibration_batches, ctx.progress)
    energies = None
    if cfg.importance == Importance.ACTIVATION:
        # data (up to calibration_batches of it), else the one example batch that the trace needed anyway
        energies = input_energies(work, ctx.data if ctx.data is not None else [example], cfg.calibration_batches,
                                  ctx.progress)
    for g in groups:
        if g.blocked:  # each layer of a group kept whole carries the group's reason (coverage, one warning per reason)
            for name in [g.root, *g.out_names]:
                ctx.skip(name, f"its output channels are tied to a group kept whole: {g.blocked}")
    selections = _select([g for g in groups if not g.blocked], cfg, ctx, energies)
    work.zero_grad(set_to_none=True)
    del work

    reference = _output_shapes(original, example)
    pruned, selections = _build(original, selections, example, reference, ctx)
    if not any(len(s.kept) < s.group.size for s in selections):
        ctx.warn("prune_channels: no channel was removed (every group is protected, reaches the output, "
                 "or is too small for round_to); the model is unchanged")
    layers, attrs = _layer_plan(selections)
    refitted = []
    if cfg.refit:
        names = [n for n, e in layers.items() if e.get("in") is not None and isinstance(original.get_submodule(n), nn.Linear)]
        moments = input_moments(original, names, ctx.data if ctx.data is not None else [example],
                                cfg.calibration_batches, ctx.progress)
        refitted = refit_layers(pruned, original, layers, moments, cfg.refit_damping)
    if cfg.finetune is not None:
        _finetune(pruned, original, cfg.finetune, ctx)
    summary = [{"root": s.group.root, "before": s.group.size, "after": len(s.kept)} for s in selections]
    return pruned, {"layers": layers, "attrs": attrs, "groups": summary, **({"refitted": refitted} if cfg.refit else {})}


# -- inputs and patterns ------------------------------------------------------------------------

def _example(ctx: Context) -> Any:
    if ctx.example_inputs is not None:
        return ctx.example_inputs
    if ctx.data is not None:
        return next(D.batches(ctx.data))
    raise DataError("prune_channels traces one forward pass to find which channels are tied: pass "
                    "example_inputs= (one batch) or data=")


def _warn_patterns(model: nn.Module, cfg: ChannelPruneConfig, ctx: Context) -> None:
    names = [n for n, _ in visible_modules(model) if n]
    for pattern in unmatched_patterns(model, [*(r.pattern for r in cfg.rules), *cfg.protect]):
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
        hint = f"; closest layer names: {', '.join(close)}" if close else f"; layer names look like: {', '.join(names[:3])}"
        ctx.warn(f"prune_channels: pattern {pattern!r} matches no layer{hint}")


# -- how many channels each group keeps, and which --------------------------------------------

def _ratio_for(group: Group, cfg: ChannelPruneConfig) -> tuple[float, bool]:
    """The group's ratio and whether a rule set it (last matching rule wins)."""
    ratio, ruled = cfg.ratio, False
    for rule in cfg.rules:
        if any(fnmatchcase(n, rule.pattern) for n in group.out_names):
            ratio, ruled = rule.ratio, True
    return ratio, ruled


def _keep_count(group: Group, remove: int, cfg: ChannelPruneConfig, what: str) -> int:
    n = group.size
    keep = n - remove
    if keep <= 0:
        raise ConfigError(f"prune_channels: {what} would remove all {n} channels of {group.root} "
                          f"(tied: {', '.join(sorted({m.name for m in group.members}))}); a layer needs at least one; "
                          f"use a smaller ratio for it (rules: [{{pattern: {group.root!r}, ratio: 0.5}}]) or protect it")
    unit = math.lcm(cfg.round_to, group.chunks)
    if unit > 1:
        if n <= unit:
            return n  # too few channels to round: left whole
        keep = min(n, max(unit, unit * round(keep / unit)))
        if keep % group.chunks:
            keep = n
    return keep


def _top(scores: torch.Tensor, keep: int, chunks: int) -> list[int]:
    """The `keep` best channels, the same number from each of `chunks` equal slices."""
    per, k = scores.numel() // chunks, keep // chunks
    kept: list[int] = []
    for j in range(chunks):
        part = scores[j * per:(j + 1) * per]
        # Stable order: equal scores keep the lowest index, so the choice is reproducible.
        order = sorted(range(per), key=lambda i: (-float(part[i]), i))[:k]
        kept += [j * per + i for i in order]
    return sorted(kept)


def _skip_group(ctx: Context, g: Group, why: str) -> None:
    """Every layer whose output channels the group holds is left alone for `why` (the coverage record)."""
    for name in dict.fromkeys([g.root, *g.out_names]):
        ctx.skip(name, why)


def _select(groups: list[Group], cfg: ChannelPruneConfig, ctx: Context,
            energies: dict[str, torch.Tensor] | None = None) -> list[Selection]:
    selections, pooled = [], []
    for g in groups:
        protected = [n for n in g.out_names if any(fnmatchcase(n, p) for p in cfg.protect)]
        if protected:
            _skip_group(ctx, g, f"protected (protect: {', '.join(p for p in cfg.protect if any(fnmatchcase(n, p) for n in protected))})")
            continue
        if g.heads is not None:
            if cfg.head_ratio > 0:
                selections.append(_select_heads(g, cfg, ctx, energies))
            else:
                _skip_group(ctx, g, "attention query / key / value channels go only as whole heads, and head_ratio is 0 "
                                    "(the default); set head_ratio to remove heads")
            continue
        ratio, ruled = _ratio_for(g, cfg)
        scores = group_scores(g, cfg.importance, ctx.warn, energies)
        if cfg.mode == Mode.GLOBAL and not ruled:
            pooled.append((g, scores))
            continue
        if ratio == 0:
            _skip_group(ctx, g, "its rule sets ratio 0")
            continue
        keep = _keep_count(g, round(ratio * g.size), cfg, f"ratio {ratio}")
        if keep == g.size:
            _skip_group(ctx, g, _whole_why(g, cfg, f"ratio {ratio}"))
            continue
        selections.append(Selection(g, _top(scores, keep, g.chunks)))
    if pooled:
        chosen = _select_global(pooled, cfg)
        picked = {id(s.group) for s in chosen}
        for g, _ in pooled:
            if id(g) not in picked:
                _skip_group(ctx, g, _whole_why(g, cfg, f"global ratio {cfg.ratio}"))
        selections += chosen
    return selections


def _whole_why(g: Group, cfg: ChannelPruneConfig, what: str) -> str:
    unit = math.lcm(cfg.round_to, g.chunks)
    if unit > 1 and g.size <= unit:
        return f"kept whole: {g.size} channels, too few to keep a multiple of {unit} (round_to / groups) and remove some"
    if what.startswith("global"):
        return f"kept whole: none of its channels ranked among the least important of the model ({what})"
    return f"kept whole: {what} of its {g.size} channels rounds to none removed"


def _select_global(pooled: list[tuple[Group, torch.Tensor]], cfg: ChannelPruneConfig) -> list[Selection]:
    """The `ratio` least important channels of all pooled groups, scores normalised by each group's
    mean (raw sums grow with a layer's fan-in, which would make wide layers look important)."""
    entries = []
    for gi, (g, s) in enumerate(pooled):
        norm = s / s.mean() if float(s.mean()) > 0 else s
        entries += [(float(v), gi) for v in norm]
    total = len(entries)
    removed = [0] * len(pooled)
    caps = [math.floor(cfg.max_group_ratio * g.size) for g, _ in pooled]
    budget = round(cfg.ratio * total)
    for _, gi in sorted(entries):
        if budget == 0:
            break
        if removed[gi] < caps[gi]:
            removed[gi] += 1
            budget -= 1
    out = []
    for (g, s), r in zip(pooled, removed):
        if r:
            keep = _keep_count(g, r, cfg, f"global ratio {cfg.ratio}")
            out.append(Selection(g, _top(s, keep, g.chunks)))
    return out


def _select_heads(g: Group, cfg: ChannelPruneConfig, ctx: Context,
                  energies: dict[str, torch.Tensor] | None = None) -> Selection:
    heads = g.heads
    remove = round(cfg.head_ratio * heads.count)
    if remove >= heads.count:
        raise ConfigError(f"prune_channels: head_ratio {cfg.head_ratio} would remove all {heads.count} heads of "
                          f"{heads.module}; use a smaller head_ratio (at most {(heads.count - 1) / heads.count:.2f})")
    scores = group_scores(g, cfg.importance, ctx.warn, energies).view(heads.count, heads.size).sum(dim=1)
    kept_heads = _top(scores, heads.count - remove, 1)
    kept = [h * heads.size + i for h in kept_heads for i in range(heads.size)]
    return Selection(g, kept, heads=len(kept_heads))


def _layer_plan(selections: list[Selection]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Kept indices per layer and side: every channel of a layer not removed by some group stays."""
    removed: dict[str, dict[str, set[int]]] = {}
    sizes: dict[tuple[str, str], int] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for sel in selections:
        kept_roots = set(sel.kept)
        for m in sel.group.members:
            sizes[(m.name, m.dim)] = _dim_size(m.module, m.dim)
            gone = {i for i, r in zip(m.idxs, m.root_idxs) if r not in kept_roots}
            removed.setdefault(m.name, {}).setdefault(m.dim, set()).update(gone)
        if sel.heads is not None:
            h = sel.group.heads
            attrs[h.module] = {"num_attention_heads": sel.heads, "all_head_size": sel.heads * h.size}
    layers = {}
    for name, sides in removed.items():
        entry = {}
        for dim in ("out", "in"):
            gone = sides.get(dim)
            entry[dim] = None if not gone else [i for i in range(sizes[(name, dim)]) if i not in gone]
        if entry["out"] is not None or entry["in"] is not None:
            layers[name] = entry
    return layers, attrs


def _dim_size(module: nn.Module, dim: str) -> int:
    rows = surgery.along(module, dim)
    if rows is not None:
        return rows.shape[0]
    return module.weight.shape[0]


# -- build and check ----------------------------------------------------------------------------

def _output_shapes(model: nn.Module, example: Any) -> list[tuple[int, ...]]:
    inputs, _ = D.split(example)
    with torch.no_grad():
        out = D.forward(model, inputs)
    return [tuple(t.shape) for t in _tensors(out)]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _try(original: nn.Module, selections: list[Selection], example: Any, reference) -> tuple[nn.Module, str | None]:
    model = copy.deepcopy(original)
    layers, attrs = _layer_plan(selections)
    surgery.apply(model, layers, attrs)
    try:
        shapes = _output_shapes(model, example)
    except Exception as exc:  # noqa: BLE001  (the user's forward on rewritten layers: anything can fail)
        return model, f"the forward fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if shapes != reference:
        return model, f"the output shapes change from {reference} to {shapes}"
    return model, None


def _build(original: nn.Module, selections: list[Selection], example: Any, reference, ctx: Context):
    """The pruned model; groups whose rewrite breaks the forward (a shape the model's code hard-wires,
    an op the graph did not see) are found one by one, skipped and reported."""
    model, problem = _try(original, selections, example, reference)
    if problem is None:
        return model, selections
    good = []
    for sel in selections:
        _, p = _try(original, [sel], example, reference)
        if p is None:
            good.append(sel)
        else:
            ctx.warn(f"prune_channels: skipped {sel.group.describe()}: after rewriting it, {p}")
    model, problem = _try(original, good, example, reference)
    if problem is not None:
        raise ModelError(f"prune_channels: the pruned model does not run ({problem}) although each group "
                         f"alone does; protect some layers (protect: [...]) and report this model")
    return model, good


# -- recovery -----------------------------------------------------------------------------------

def _finetune(model: nn.Module, teacher: nn.Module, cfg: Finetune, ctx: Context) -> None:
    if ctx.data is None:
        raise DataError("prune_channels: finetune needs data= (batches to train on); remove the finetune "
                        "section to prune only")
    teacher = teacher.eval()

    def teacher_out(inputs):
        with torch.no_grad():
            return D.first_tensor(D.forward(teacher, inputs))

    def kd(m: nn.Module, batch: Any) -> torch.Tensor:
        inputs, target = D.split(batch)
        s, t = D.first_tensor(D.forward(m, inputs)), teacher_out(inputs)
        if cfg.loss == FinetuneLoss.MSE:
            return F.mse_loss(s, t)
        c, temp = s.shape[-1], cfg.temperature
        soft = F.kl_div(F.log_softmax(s.reshape(-1, c) / temp, -1), F.log_softmax(t.reshape(-1, c) / temp, -1),
                        log_target=True, reduction="batchmean") * temp**2
        if target is None or cfg.alpha == 1.0:
            return soft
        return cfg.alpha * soft + (1 - cfg.alpha) * F.cross_entropy(s.reshape(-1, c), target.reshape(-1))

    loss_fn = classification_loss if cfg.loss == FinetuneLoss.CE else kd
    fit(model, ctx.data, FitConfig(steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                                   description="fine-tuning after channel pruning", progress=ctx.progress),
        loss_fn=loss_fn)

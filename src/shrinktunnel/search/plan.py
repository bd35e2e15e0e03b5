"""A plan (layer -> action) turned into stages, in a sound order, with recovery in between.

Every rule here is read from the methods' declared search hooks (core/registry.SearchHooks), never
from their names: the stages go in the order of their family's `order` (the built-in methods declare
decompose 0, channels 10, prune 20, share 30, quantize 40: structure first, precision last); steps of
one method on several layers become ONE stage where the method declares a `merge` rule (per-layer
overrides or rules), so one fine-tuning pass recovers every pruned layer with its mask held; the
others get one stage per distinct config.

Recovery (with a RecoveryConfig): each stage whose method declares `recover` runs as it says (prune's
own fine-tuning with masks held on the distillation loss, which `recovers_structure`; the codebooks'
centroid tuning after sharing; QAT after low-bit quantization); after structural families a
`distill` stage from the original follows unless a stage already recovered them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core import data as D
from ..core.config import Config
from ..core.registry import Context, SearchHooks, searchable_methods
from ..distillation.losses import hinton_loss
from .actions import Action

__all__ = ["RecoveryConfig", "family_order", "plan_stages", "build_plan", "kd_loss"]

Plan = dict[str, str]


def family_order() -> list[str]:
    """The families of the searchable methods, in their declared order (structure first)."""
    orders: dict[str, int] = {}
    for m in searchable_methods():
        orders[m.search.family] = min(orders.get(m.search.family, m.search.order), m.search.order)
    return sorted(orders, key=lambda f: (orders[f], f))


def _hooks(method: str) -> SearchHooks:
    from ..core.registry import get_method

    return get_method(method).search or SearchHooks(family="", order=10**6)


class RecoveryConfig(Config):
    """Training that wins back what the structural actions and the sharing lost (search only)."""

    steps: int = Field(default=300, ge=0)  # optimiser steps of distillation from the original after the
    # structural stages; 300 x 64 images is a third of an MNIST epoch, enough for a net pruned to half its channels
    lr: float = Field(default=1e-3, gt=0)  # Adam; pruned and factorised nets move far from their start
    temperature: float = Field(default=4.0, gt=0)  # Hinton's soft targets at T = 4 carry the class similarities
    alpha: float = Field(default=0.9, ge=0, le=1)  # weight of the soft term; 1 - alpha: cross-entropy when
    # the batches carry labels
    share_steps: int = Field(default=100, ge=0)  # centroid tuning after sharing (indices fixed), cluster's own
    share_lr: float = Field(default=1e-4, gt=0)  # each centroid step moves every weight of its cluster
    qat_steps: int = Field(default=100, ge=0)  # QAT after a weight-only quantization stage of qat_bits or fewer
    # (0: rounding only); 100 steps of fake-quantized training win back most of a 4-bit layer's loss
    qat_bits: int = Field(default=4, ge=1, le=8)  # the widest quantization trained through (8 bits rarely needs it)
    qat_lr: float = Field(default=1e-4, gt=0)  # Adam on a trained model: 10x below a from-scratch rate
    analysis_steps: int = Field(default=50, ge=0)  # the analysis scores structural actions after this many
    # recovery steps (0: one shot): a one-shot drop of channel pruning says little about the drop after recovery


def kd_loss(teacher: nn.Module, temperature: float, alpha: float) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Distillation loss from `teacher` for the built-in loop: soft targets (KL at `temperature`, x T^2)
    plus (1 - alpha) x cross-entropy when the batch has a target; MSE for outputs that are not logits."""
    teacher = teacher.eval()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, target = D.split(batch)
        with torch.no_grad():
            t = D.first_tensor(D.forward(teacher, inputs))
        s = D.first_tensor(D.forward(model, inputs))
        if s.dim() < 2:
            return F.mse_loss(s, t)
        hard = None if target is None or target.dtype.is_floating_point else target  # a regression target: soft only
        return hinton_loss(s, t, hard, temperature, alpha)

    return loss


def plan_stages(plan: Plan, actions: dict[str, Action], recovery: RecoveryConfig | None) -> list[tuple[str, dict[str, Any]]]:
    """(method, config) stages that apply `plan`, in the declared family order, with recovery where it belongs."""
    by_family: dict[str, list[tuple[str, Action]]] = {}
    for layer in sorted(plan):
        action = actions[plan[layer]]
        for step in action.steps or (action,):
            by_family.setdefault(step.family, []).append((layer, step))
    order = family_order()
    stages: list[tuple[str, dict[str, Any]]] = []
    structural = False  # a structural stage ran and nothing has recovered it yet
    recovering = recovery is not None
    for family in [*order, *sorted(set(by_family) - set(order))]:
        groups = _groups(by_family.get(family, []))
        if not groups:
            continue
        if structural and recovering and recovery.steps and not any(_hooks(m).structural for m, _ in groups):
            stages.append(("distill", _distill_config(recovery)))  # recovery before sharing and quantization
            structural = False
        for (method, _), group in groups.items():
            hooks = _hooks(method)
            if hooks.merge is not None:
                config = hooks.merge(group)
            else:
                config = copy.deepcopy(group[0][1])
                if "layers" in config:
                    config["layers"] = [layer for layer, _ in group]
            recovered = hooks.recover(config, recovery) if recovering and hooks.recover is not None else None
            if recovered is not None:
                method, config = recovered
            if recovered is not None and hooks.recovers_structure:
                structural = False  # this stage trained the whole model on the distillation loss
            elif hooks.structural:
                structural = True
            stages.append((method, config))
    if structural and recovering and recovery.steps:
        stages.append(("distill", _distill_config(recovery)))
    return stages


def _groups(items: list[tuple[str, Action]]) -> dict[tuple[str, str], list[tuple[str, dict[str, Any]]]]:
    """The steps of one family by stage: one group per method with a merge rule, else per distinct config."""
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for layer, step in items:
        config = step.config(layer)
        merged = _hooks(step.method).merge is not None
        key = (step.method, "merge" if merged else repr(sorted((k, v) for k, v in config.items() if k != "layers")))
        groups.setdefault(key, []).append((layer, config))
    return groups


def _distill_config(recovery: RecoveryConfig) -> dict[str, Any]:
    return {"teacher": "original", "steps": recovery.steps, "lr": recovery.lr, "temperature": recovery.temperature,
            "alpha": recovery.alpha}


def recovery_context(original: nn.Module, data: Any, train_data: Any, recovery: RecoveryConfig | None,
                     example: Any) -> Context:
    """The context stages run in: calibration and training on `train_data`, the original as teacher."""
    loss = None if recovery is None else kd_loss(original, recovery.temperature, recovery.alpha)
    return Context(data=train_data if train_data is not None else data, example_inputs=example, progress=False,
                   original=original, loss_fn=loss)


def build_plan(model: nn.Module, plan: Plan, actions: dict[str, Action], data: Any, *,
               recovery: RecoveryConfig | None = None, train_data: Any = None, seed: int = 0) -> nn.Module:
    """The model with `plan` applied (a copy; `model` is the original and the teacher). Seeded, so the
    same plan gives the same model in any process."""
    from ..core.stage import run_stage

    if not plan:
        return model
    seed_everything(seed)
    ctx = recovery_context(model, data, train_data, recovery, next(D.batches(data)))
    current = model
    for method, config in plan_stages(plan, actions, recovery):
        current = run_stage(current, method, config, ctx)
    return current


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the search itself
        pass


def as_recovery(recovery: RecoveryConfig | dict | None) -> RecoveryConfig | None:
    if recovery is None or isinstance(recovery, RecoveryConfig):
        return recovery
    return RecoveryConfig.parse(recovery)


def analysis_recovery(recovery: RecoveryConfig | dict | None) -> RecoveryConfig | None:
    """The short recovery the analysis scores actions with: `analysis_steps` of distillation, as many of
    centroid tuning at most; None when there is no recovery or it is 0 steps."""
    recovery = as_recovery(recovery)
    if recovery is None or recovery.analysis_steps == 0:
        return None
    return recovery.model_copy(update={"steps": recovery.analysis_steps,
                                       "share_steps": min(recovery.share_steps, recovery.analysis_steps),
                                       "qat_steps": min(recovery.qat_steps, recovery.analysis_steps)})

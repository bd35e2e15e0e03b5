"""A plan (layer -> action) turned into stages, in a sound order, with recovery in between.

Order (the issue's): structure first (decompose, channel pruning, unstructured pruning), then
recovery by distillation from the original, then sharing (k-means codebooks, their centroids tuned),
then quantization; encoding is each method's own storage (Huffman streams, packed integers).

Steps of one method on several layers become ONE stage where the method takes per-layer settings
(`prune` overrides, `cluster` overrides, `prune_channels` rules), so a single fine-tuning pass
recovers every pruned layer with its mask held; the other methods get one stage per distinct config.
Recovery: when unstructured pruning is in the plan, its own fine-tuning (masks held) trains the whole
model on a distillation loss from the original; otherwise a `distill` stage follows the structure.
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
from ..core.registry import Context
from ..distill.losses import hinton_loss
from .actions import Action

__all__ = ["RecoveryConfig", "FAMILY_ORDER", "STRUCTURE", "plan_stages", "build_plan", "kd_loss"]

Plan = dict[str, str]

FAMILY_ORDER = ("decompose", "channels", "prune", "share", "quantize")  # structure first, precision last
STRUCTURE = ("decompose", "channels", "prune")  # families that change what the weights can express


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


def _merge_overrides(key: str, value_key: str, base: dict[str, Any]) -> Callable:
    def merge(items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        config = {k: v for k, v in items[0][1].items() if k not in ("layers", key)}
        config["layers"] = [layer for layer, _ in items]
        config[key] = [{"pattern": layer, value_key: c[value_key]} for layer, c in items]
        return {**config, **base}

    return merge


def _merge_rules(items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    config = {k: v for k, v in items[0][1].items() if k != "rules"}
    config["rules"] = [rule for _, c in items for rule in c.get("rules", [])]
    return config


# method -> how the steps of several layers become one stage
_MERGE: dict[str, Callable[[list[tuple[str, dict[str, Any]]]], dict[str, Any]]] = {
    "prune": _merge_overrides("overrides", "sparsity", {"schedule": "oneshot"}),
    "cluster": _merge_overrides("overrides", "bits", {}),
    "prune_channels": _merge_rules,
}


def plan_stages(plan: Plan, actions: dict[str, Action], recovery: RecoveryConfig | None) -> list[tuple[str, dict[str, Any]]]:
    """(method, config) stages that apply `plan`, in FAMILY_ORDER, with recovery where it belongs."""
    by_family: dict[str, list[tuple[str, Action]]] = {}
    for layer in sorted(plan):
        action = actions[plan[layer]]
        for step in action.steps or (action,):
            by_family.setdefault(step.family, []).append((layer, step))
    stages: list[tuple[str, dict[str, Any]]] = []
    structural = False
    for family in [*FAMILY_ORDER, *sorted(set(by_family) - set(FAMILY_ORDER))]:
        items = by_family.get(family, [])
        if not items:
            continue
        groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
        for layer, step in items:
            config = step.config(layer)
            key = (step.method, "merge" if step.method in _MERGE else repr(sorted((k, v) for k, v in config.items() if k != "layers")))
            groups.setdefault(key, []).append((layer, config))
        if family not in STRUCTURE and structural and recovery is not None and recovery.steps:
            stages.append(("distill", _distill_config(recovery)))  # recovery before sharing and quantization
            structural = False
        for (method, _), group in groups.items():
            if method in _MERGE:
                config = _MERGE[method](group)
            else:
                config = copy.deepcopy(group[0][1])
                if "layers" in config:
                    config["layers"] = [layer for layer, _ in group]
            if method == "prune" and recovery is not None and recovery.steps:
                config.update(steps=recovery.steps, lr=recovery.lr)  # masks held; KD loss from the context
                structural = False
            elif family in STRUCTURE:
                structural = True
            if method == "cluster" and recovery is not None and recovery.share_steps:
                config["tune"] = {"steps": recovery.share_steps, "lr": recovery.share_lr}
            stages.append((method, config))
    if structural and recovery is not None and recovery.steps:
        stages.append(("distill", _distill_config(recovery)))
    return stages


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
                                       "share_steps": min(recovery.share_steps, recovery.analysis_steps)})

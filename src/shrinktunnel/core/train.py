"""The one built-in training loop that recovery stages share (pruning, clustering, decomposition,
QAT, distillation): plain PyTorch, no framework.

A method that needs fine-tuning calls `fit` with its own hooks: `loss_fn` (cross-entropy against the
batch's target by default; a distillation loss closes over its teacher), `after_step` (re-apply a
pruning mask, snap weights back onto a codebook) and `before_step` (edit gradients, e.g. sum them per
centroid). Users with their own training loop call their loop instead and never come here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from . import data as D
from .progress import track

__all__ = ["FitConfig", "FitLog", "fit", "classification_loss"]


@dataclass
class FitConfig:
    """Knobs of the built-in loop; methods expose the ones their users need in their own config."""

    steps: int | None = None  # optimiser steps; None: `epochs` passes over the data
    epochs: float = 1.0  # passes over the data when `steps` is None (fractions allowed)
    lr: float = 1e-3  # Adam's default; SGD users usually want 1e-2
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global L2 norm of the gradients; None: no clipping
    description: str = "fine-tuning"
    progress: bool = True


@dataclass
class FitLog:
    steps: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of the model's output against the batch's target."""
    inputs, target = D.split(batch)
    if target is None:
        raise DataError(
            "fine-tuning with the built-in classification loss needs (inputs, target) batches; "
            "pass labelled data, or a loss_fn (for example a distillation loss) that needs no target"
        )
    return F.cross_entropy(D.first_tensor(D.forward(model, inputs)), target)


def _optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is not known; use adam, adamw or sgd")


def _num_steps(data: Iterable, cfg: FitConfig) -> int:
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {cfg.steps}")
        return int(cfg.steps)
    if not cfg.epochs > 0:
        raise ConfigError(f"epochs must be positive, got {cfg.epochs}")
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("the data has no length, so epochs cannot be counted; give `steps` instead") from None
    return max(1, round(per_epoch * cfg.epochs))


def fit(
    model: nn.Module,
    data: Iterable,
    cfg: FitConfig | None = None,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = classification_loss,
    params: list[nn.Parameter] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[int, float, torch.optim.Optimizer], bool | None] | None = None,
    resume: tuple[int, dict[str, Any]] | None = None,
) -> FitLog:
    """Train `model` IN PLACE on `data` (cycled as needed) and return the loss log.

    `params`: what the optimiser updates (default: every parameter that requires grad);
    `before_step(model)` runs after backward, before the optimiser step; `after_step(model)` after it.
    `on_step(step, loss, optimizer)` runs after each step (`step` counts from 1, in train mode, the
    model is its to evaluate or checkpoint); returning True stops early. `resume=(steps_done,
    optimizer_state)` continues an interrupted run: the optimiser state is restored and the first
    `steps_done` batches of the data cycle are skipped, so a list of batches is seen in the same order.
    The model is left in eval mode.
    """
    cfg = cfg or FitConfig()
    data = D.reiterable(data)
    total = _num_steps(data, cfg)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if not params:
        raise ConfigError("nothing to train: the model has no parameter that requires grad")
    opt = _optimizer(params, cfg)
    log = FitLog()
    start = 0
    if resume is not None:
        start, opt_state = resume
        opt.load_state_dict(opt_state)
        log.steps = start
    model.train()
    stream = itertools.chain.from_iterable(D.batches(data) for _ in itertools.count())
    try:
        for batch in track(itertools.islice(stream, start, total), cfg.description, total=total - start, enabled=cfg.progress):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise DataError(f"the loss became {loss.item()} at step {log.steps}; lower the learning rate (lr={cfg.lr})")
            loss.backward()
            if before_step is not None:
                before_step(model)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            log.steps += 1
            log.losses.append(float(loss.detach()))
            if on_step is not None and on_step(log.steps, log.losses[-1], opt):
                break
    finally:
        model.eval()
    return log

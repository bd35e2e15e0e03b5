"""The distillation trainer: one loop (core.train.fit) with a teacher, hints, evaluation, early
stopping and a resumable checkpoint.

    log = distill_train(student, teacher, data, DistillConfig(...), eval_fn=...)   # trains IN PLACE
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core import data as D
from ..core.select import matches
from ..core.train import FitConfig, _num_steps, fit
from ..errors import ConfigError, DataError, ModelError
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DistillConfig, OutputLoss, Schedule
from .losses import check_output_shapes, embedding_loss, feature_loss, hinton_loss, make_adapter, pool
from .relations import projection_names, relation_logits, relation_loss

__all__ = ["DistillLog", "distill_train", "lr_factor"]


def lr_factor(step: int, total: int, schedule: Schedule | str, warmup: float) -> float:
    """The multiple of lr used by optimiser step `step` (0-based) of `total`: a linear rise over the
    first round(warmup * total) steps, then constant, linear or cosine decay towards 0 at the end."""
    warm = round(warmup * total)
    if step < warm:
        return (step + 1) / warm
    if schedule == Schedule.CONSTANT:
        return 1.0
    progress = (step - warm) / max(1, total - warm)  # 0 at the first step after warmup, -> 1 at the end
    if schedule == Schedule.LINEAR:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class DistillLog:
    steps: int = 0  # optimiser steps done in all, including those of a resumed run
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_fn) pairs; step 0: before training
    best_step: int | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None  # the step a checkpoint resumed from

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (what a stage records)."""
        return {"steps": self.steps, "final_loss": self.losses[-1] if self.losses else None,
                "best_step": self.best_step, "best_metric": self.best_metric,
                "stopped_early": self.stopped_early, "resumed_from": self.resumed_from,
                "evals": [list(e) for e in self.evals]}


class _Capture:
    """Forward hooks that keep the output of named modules (FitNets' hint and guided layers)."""

    def __init__(self, model: nn.Module, names: list[str], who: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                near = [n for n in modules if n and (name in n or n in name)][:5]
                raise ConfigError(f"distill: hint names {who} module {name!r}, which does not exist"
                                  + (f"; similar names: {', '.join(near)}" if near else "")
                                  + f"; module names are those of {who}.named_modules()")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = D.first_tensor(output)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _output(model: nn.Module, inputs: D.Inputs) -> torch.Tensor:
    out = D.forward(model, inputs)
    try:
        return D.first_tensor(out)
    except DataError:
        raise ModelError(f"distill: the model returned {type(out).__name__}, which holds no tensor to distill") from None


def _fingerprint(student: nn.Module, cfg: DistillConfig, total: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run."""
    keep = ("loss", "temperature", "alpha", "pooling", "hints", "relations", "dropout", "lr", "optimizer", "schedule", "warmup", "weight_decay",
            "grad_clip", "freeze")
    config = {k: v for k, v in cfg.to_dict().items() if k in keep}
    shapes = {k: list(v.shape) for k, v in student.state_dict().items()}
    return {"config": config, "total_steps": total, "student": shapes}


class _Sides:
    """Both models' hooks (hints, relation projections) and the teacher's targets per batch, cached
    for a list of batches when `cache_teacher` is on."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.hints, self.relations = list(cfg.hints), list(cfg.relations)
        # Relations: the query / key / value projections of each named attention module, hooked like hints.
        self.s_proj = [projection_names(student, r.student, "the student") for r in self.relations]
        self.t_proj = [projection_names(teacher, r.teacher, "the teacher") for r in self.relations]
        self.caps: list[_Capture] = []
        try:  # no hook of a failed call stays behind on either model
            self.s_cap = self._capture(student, [h.student for h in self.hints], "the student")
            self.t_cap = self._capture(teacher, [h.teacher for h in self.hints], "the teacher")
            self.s_rel = self._capture(student, sorted({n for names in self.s_proj for n in names}), "the student")
            self.t_rel = self._capture(teacher, sorted({n for names in self.t_proj for n in names}), "the teacher")
        except ConfigError:
            self.close()
            raise
        # {id(batch): (batch, teacher outputs)}: the batch itself is kept, so its id cannot be reused by
        # another batch while the entry lives, and a hit is checked by identity (a DataLoader yields new
        # batches whose ids may be those of freed ones: keyed by id alone they got another batch's targets).
        self.cache: dict[int, tuple[Any, tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]]] = {}
        self.cacheable = False

    def _capture(self, model: nn.Module, names: list[str], who: str) -> _Capture:
        cap = _Capture(model, names, who)
        self.caps.append(cap)
        return cap

    def close(self) -> None:
        for cap in self.caps:
            cap.close()

    def relation_targets(self, cap: _Capture, proj: list[tuple[str, str, str]], mask) -> list[torch.Tensor]:
        return [relation_logits(tuple(cap.outputs[n] for n in names), kind, r.heads, mask)
                for r, names in zip(self.relations, proj) for kind in r.kinds]

    def teacher_targets(self, batch: Any, inputs: D.Inputs) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        cfg, key = self.cfg, id(batch)
        if cfg.cache_teacher and key in self.cache and self.cache[key][0] is batch:
            return self.cache[key][1]
        mask = inputs[1].get("attention_mask")
        with torch.no_grad():
            out = _output(self.teacher, inputs)
            rels = self.relation_targets(self.t_rel, self.t_proj, mask)
        t_out = None if cfg.loss == OutputLoss.NONE else pool(out, mask, cfg.pooling, cfg.loss).detach()
        feats = [self.t_cap.outputs[h.teacher].detach() for h in self.hints]
        if cfg.cache_teacher and self.cacheable:
            self.cache[key] = (batch, (t_out, feats, rels))
        return t_out, feats, rels

    def adapters(self, student: nn.Module, data: Any) -> nn.ModuleList:
        """Probe one batch: output shapes are checked and hint adapters built before any training."""
        cfg = self.cfg
        first = next(D.batches(data))
        inputs, _ = D.split(first)
        t_out, t_feats, _ = self.teacher_targets(first, inputs)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            s_out = _output(student, inputs)
        student.train(was_training)
        if t_out is not None:
            check_output_shapes(pool(s_out, inputs[1].get("attention_mask"), cfg.pooling, cfg.loss), t_out, cfg.loss)
        adapters = nn.ModuleList(make_adapter(self.s_cap.outputs[h.student].shape, f.shape, f"{h.student} -> {h.teacher}")
                                 for h, f in zip(self.hints, t_feats))
        ref = next(student.parameters(), None)
        if ref is not None:
            adapters.to(device=ref.device, dtype=ref.dtype)
        self.cache.clear()  # the probe ran the student in eval mode; nothing of it is kept
        return adapters

    def loss_fn(self, adapters: nn.ModuleList, warn: Callable[[str], None]) -> Callable[[nn.Module, Any], torch.Tensor]:
        cfg, warned_no_target = self.cfg, [False]

        def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            inputs, target = D.split(batch)
            t_out, t_feats, t_rels = self.teacher_targets(batch, inputs)
            if not cfg.dropout:
                model.eval()  # fit sets train mode once per run and evaluation restores it: set it per step
            out = _output(model, inputs)
            loss = out.new_zeros(())
            mask = inputs[1].get("attention_mask")
            if t_out is not None:
                s = pool(out, mask, cfg.pooling, cfg.loss)
                if cfg.loss != OutputLoss.KL:
                    loss = loss + embedding_loss(s, t_out, cfg.loss)
                else:
                    if target is None and cfg.alpha < 1 and not warned_no_target[0]:
                        warned_no_target[0] = True
                        warn(f"distill: the data has no targets, so the hard-label term (weight 1 - alpha = "
                             f"{1 - cfg.alpha:g}) is dropped; only the teacher's soft targets train the student")
                    loss = loss + hinton_loss(s, t_out, target, cfg.temperature, cfg.alpha)
            for h, adapter, t_feat in zip(self.hints, adapters, t_feats):
                loss = loss + h.weight * feature_loss(adapter(self.s_cap.outputs[h.student]), t_feat, mask, h.loss)
            if self.relations:
                s_rels = self.relation_targets(self.s_rel, self.s_proj, mask)
                weights = [r.weight for r in self.relations for _ in r.kinds]
                for w, s_r, t_r in zip(weights, s_rels, t_rels):
                    loss = loss + w * relation_loss(s_r, t_r, mask)
            return loss

        return loss_fn


def distill_train(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    cfg: DistillConfig,
    *,
    eval_fn: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> DistillLog:
    """Distill `teacher` into `student` IN PLACE; the teacher is only run (eval mode, no grad)."""
    data = D.reiterable(data)
    sides = _Sides(student, teacher, cfg)
    sides.cacheable = isinstance(data, (list, tuple))  # only a list yields the same batch objects again
    teacher_was_training = teacher.training
    teacher.eval()  # for the run only: its mode is restored at the end
    try:
        adapters = sides.adapters(student, data)
        loss_fn = sides.loss_fn(adapters, warn or (lambda m: None))
        return _Run(student, adapters, data, cfg, eval_fn, progress).train(loss_fn)
    finally:
        sides.close()
        teacher.train(teacher_was_training)


class _Run:
    """One training run: learning-rate schedule, evaluation with patience and best-state restore, and a
    resumable checkpoint (a finished run's checkpoint returns at once)."""

    def __init__(self, student, adapters, data, cfg: DistillConfig, eval_fn, progress) -> None:
        self.student, self.adapters, self.data, self.cfg, self.eval_fn = student, adapters, data, cfg, eval_fn
        self.scheduled = cfg.schedule != Schedule.CONSTANT or cfg.warmup > 0
        self.total = _num_steps(data, FitConfig(steps=cfg.steps, epochs=cfg.epochs))
        # fit builds the optimiser with the first step's lr; on_step sets each following step's
        first_lr = cfg.lr * lr_factor(0, self.total, cfg.schedule, cfg.warmup) if self.scheduled else cfg.lr
        self.fit_cfg = FitConfig(steps=cfg.steps, epochs=cfg.epochs, lr=first_lr, optimizer=cfg.optimizer,
                                 weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, description="distilling",
                                 progress=progress)
        self.fingerprint = _fingerprint(student, cfg, self.total)
        self.log = DistillLog()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.evaluating = eval_fn is not None and cfg.eval_every is not None
        self.last_opt: torch.optim.Optimizer | None = None

    def restore(self) -> tuple[int, Any] | None | bool:
        """Continue from the checkpoint: (step, optimizer state), None when there is none, True when it
        holds a finished run (nothing left to train)."""
        cfg, log = self.cfg, self.log
        ckpt = load_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
        if ckpt is None:
            return None
        state = ckpt["state"]
        if state["fingerprint"] != self.fingerprint:
            differs = [k for k in self.fingerprint if self.fingerprint[k] != state["fingerprint"].get(k)]
            raise ConfigError(f"distill: the checkpoint at {cfg.checkpoint!r} was written by a different run "
                              f"(its {', '.join(differs)} differ); delete it to start over, or set another checkpoint path")
        self.student.load_state_dict(ckpt["student"])
        self.adapters.load_state_dict(ckpt["adapters"])
        if ckpt["rng"] is not None:
            torch.set_rng_state(ckpt["rng"])
        log.steps, log.losses = state["step"], list(state["losses"])
        log.evals = [tuple(e) for e in state["evals"]]
        log.best_step, log.best_metric, self.bad_evals = state["best_step"], state["best_metric"], state["bad_evals"]
        log.resumed_from = state["step"]
        self.best_state = ckpt["best"]
        if state["finished"]:
            log.stopped_early = state["stopped_early"]
            return True
        return state["step"], ckpt["optimizer"]

    def evaluate(self, step: int) -> bool:
        """Evaluate; True when patience is exhausted."""
        student, log = self.student, self.log
        was_training = student.training
        student.eval()
        try:
            metric = float(self.eval_fn(student))
        finally:
            student.train(was_training)
        log.evals.append((step, metric))
        if log.best_metric is None or metric > log.best_metric:
            log.best_metric, log.best_step, self.bad_evals = metric, step, 0
            self.best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience

    def write(self, opt: torch.optim.Optimizer, finished: bool) -> None:
        if self.cfg.checkpoint:
            log = self.log
            save_checkpoint(self.cfg.checkpoint, student=self.student, adapters=self.adapters, optimizer=opt,
                            best=self.best_state, state={
                                "step": log.steps, "fingerprint": self.fingerprint, "losses": log.losses,
                                "evals": log.evals, "best_step": log.best_step, "best_metric": log.best_metric,
                                "bad_evals": self.bad_evals, "finished": finished, "stopped_early": log.stopped_early})

    def on_step(self, step: int, loss: float, opt: torch.optim.Optimizer) -> bool:
        cfg, log, total = self.cfg, self.log, self.total
        self.last_opt = self.last_opt or opt
        log.steps = step
        log.losses.append(loss)
        if self.scheduled and step < total:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, cfg.schedule, cfg.warmup)
        stop = self.evaluating and (step % cfg.eval_every == 0 or step == total) and self.evaluate(step)
        log.stopped_early = bool(stop) and step < total
        if step % cfg.checkpoint_every == 0 or stop or step == total:
            self.write(opt, finished=False)
        return bool(stop)

    def train(self, loss_fn) -> DistillLog:
        student, cfg = self.student, self.cfg
        resume = self.restore()
        if resume is True:
            student.eval()
            return self.log
        if self.evaluating and resume is None:
            self.evaluate(0)
        with _frozen(student, cfg.freeze):
            params = [p for p in student.parameters() if p.requires_grad] + list(self.adapters.parameters())
            if resume is None or resume[0] < self.total:
                fit(student, self.data, self.fit_cfg, loss_fn=loss_fn, params=params, on_step=self.on_step, resume=resume)
        if cfg.restore_best and self.best_state is not None:
            student.load_state_dict(self.best_state)
        if self.last_opt is not None:
            self.write(self.last_opt, finished=True)
        student.eval()
        return self.log


@contextmanager
def _frozen(student: nn.Module, patterns: list[str]):
    """Parameters matching `patterns` get no gradient at all (not merely no update) for the block:
    their backward is skipped."""
    frozen = [n for n, p in student.named_parameters() if matches(n, patterns)]
    if patterns and not frozen:
        raise ConfigError(f"distill: freeze {patterns} matches no parameter; names look like "
                          f"{', '.join(n for n, _ in list(student.named_parameters())[:3])}")
    was = {n: p.requires_grad for n, p in student.named_parameters() if n in frozen}
    for n, p in student.named_parameters():
        if n in was:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in student.named_parameters():
            if n in was:
                p.requires_grad_(was[n])

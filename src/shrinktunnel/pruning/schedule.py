"""Gradual pruning: the masks, how they are chosen, when they change, and how training keeps them.

- `agp_sparsity`: the cubic schedule of Zhu & Gupta, "To prune, or not to prune" (2017), eq. 1:
  s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for t0 <= t <= t0 + n dt. It prunes fast while
  many redundant weights are left and slowly near the end, where every weight counts.
- `MaskSet`: one boolean mask per pruned layer (True = kept). A mask update ranks the weights that
  are still kept by a score (|w|, or a fixed random number) and drops the lowest; weights already
  pruned rank below every kept one, so masks only ever shrink (nested), as AGP requires.
- Between updates the masks are held: a gradient hook zeroes the gradient of every pruned weight, and
  `apply()` after each optimiser step zeroes the weights again (momentum or weight decay of an
  optimiser would otherwise move them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["agp_sparsity", "update_steps", "Target", "MaskSet", "kept_count"]


def agp_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's sparsity at `step` for a ramp from `start` (sparsity `initial`) to `end` (`final`)."""
    if step <= start and end > start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def update_steps(ramp_end: int, updates: int) -> list[int]:
    """The steps (counted in completed optimiser steps) after which the masks are recomputed: `updates`
    of them spread evenly over (0, ramp_end], the last one at ramp_end (AGP's t0 + n dt with t0 = 0)."""
    if ramp_end <= 0:
        return []
    return sorted({max(1, round(j * ramp_end / updates)) for j in range(1, updates + 1)})


def kept_count(n: int, sparsity: float) -> int:
    """Weights a layer of n weights keeps at `sparsity`: n - round(sparsity * n)."""
    return n - int(round(sparsity * n))


@dataclass
class Target:
    """One layer to prune: its name, the module (whose `.weight` is pruned), its other names, its final
    sparsity (scope "layer"), and a fixed random score per weight (criterion "random")."""

    name: str
    module: nn.Module
    sparsity: float
    aliases: tuple[str, ...] = ()
    random_score: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


@dataclass
class MaskSet:
    """The masks of every target, and the hooks that hold them during training."""

    targets: list[Target]
    scope: str = "layer"  # "layer" | "global"
    random: bool = False
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for t in self.targets:
            self.masks[t.name] = torch.ones_like(t.weight, dtype=torch.bool)

    # -- choosing ---------------------------------------------------------------------------------
    def _score(self, t: Target) -> torch.Tensor:
        w = t.weight.detach()
        score = t.random_score.to(w.device) if self.random else w.abs().float()
        return torch.where(self.masks[t.name], score, torch.full_like(score, -1.0))  # pruned: below all

    def set_sparsity(self, sparsity_of: dict[str, float], step: int | None = None) -> None:
        """Masks at these sparsities: per layer (`sparsity_of[name]`) or, scope "global", one threshold
        that removes `sparsity_of["*"]` of all target weights. Refuses a mask that keeps nothing."""
        with torch.no_grad():
            if self.scope == "global":
                self._set_global(sparsity_of["*"], step)
            else:
                for t in self.targets:
                    n = t.weight.numel()
                    keep = kept_count(n, sparsity_of[t.name])
                    if keep <= 0:
                        raise _emptied(t, sparsity_of[t.name], step)
                    self.masks[t.name] = _top(self._score(t).reshape(-1), keep).view_as(t.weight)
            self.apply()

    def _set_global(self, sparsity: float, step: int | None) -> None:
        scores = [self._score(t).reshape(-1) for t in self.targets]
        sizes = [s.numel() for s in scores]
        pooled = torch.cat([s.to(scores[0].device) for s in scores])
        keep_all = _top(pooled, kept_count(pooled.numel(), sparsity))
        for t, keep in zip(self.targets, torch.split(keep_all, sizes)):
            if not bool(keep.any()):
                raise _emptied(t, sparsity, step, global_scope=True)
            self.masks[t.name] = keep.view_as(t.weight).to(t.weight.device)

    # -- holding ----------------------------------------------------------------------------------
    def apply(self) -> None:
        """Zero every pruned weight (+0.0, so the dense and the stored form agree bit for bit)."""
        with torch.no_grad():
            for t in self.targets:
                t.weight.masked_fill_(~self.masks[t.name], 0.0)

    def hold(self) -> None:
        """Zero the gradients of pruned weights from now on (until `release`)."""
        for t in self.targets:
            if t.weight.requires_grad:  # a frozen weight gets no gradient to mask
                self._hooks.append(t.weight.register_hook(lambda g, name=t.name: g * self.masks[name]))

    def release(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(total, 1)


def _top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` highest scores (1-D)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep >= score.numel():
        mask[:] = True
    elif keep > 0:
        mask[torch.topk(score, keep, sorted=False).indices] = True
    return mask


def _emptied(t: Target, sparsity: float, step: int | None, global_scope: bool = False) -> ConfigError:
    when = f" at fine-tuning step {step}" if step else ""
    n = t.weight.numel()
    if global_scope:
        return ConfigError(
            f"prune: the global threshold at sparsity {sparsity:g}{when} would remove every one of the {n} "
            f"weights of layer {t.name!r} ({type(t.module).__name__}), cutting the network; add {t.name!r} to "
            f"skip, lower the sparsity, or use scope 'layer'"
        )
    return ConfigError(
        f"prune: sparsity {sparsity:g}{when} would remove every one of the {n} weights of layer {t.name!r} "
        f"({type(t.module).__name__}), cutting the network; add {t.name!r} to skip or give it a lower "
        f"sparsity in overrides"
    )

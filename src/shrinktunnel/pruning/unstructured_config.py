"""The config of unstructured pruning (the `prune` method): plain data, a reason beside each default."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ..core.config import Config, StrEnum

__all__ = ["PruneConfig", "LayerSparsity", "Criterion", "Scope", "Schedule", "IndexEncoding", "Optimizer"]


class Criterion(StrEnum):
    MAGNITUDE = "magnitude"  # the smallest |w| go first (Han et al. 2015)
    RANDOM = "random"  # a uniformly random subset: the baseline a criterion has to beat


class Scope(StrEnum):
    LAYER = "layer"  # each layer loses its own fraction of its weights
    GLOBAL = "global"  # one threshold over the weights of every selected layer


class Schedule(StrEnum):
    ONESHOT = "oneshot"  # the final sparsity at once, then fine-tuning (if any) with the masks held
    AGP = "agp"  # Zhu & Gupta's cubic ramp over the fine-tuning steps


class IndexEncoding(StrEnum):
    AUTO = "auto"  # per layer, the cheaper of the two
    BITMASK = "bitmask"  # one bit per weight
    RELATIVE = "relative"  # Deep Compression's index differences with fillers


class Optimizer(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"  # momentum 0.9


def _check_ratio(value: float, what: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{what} {value!r} is outside [0, 1): it is the fraction of the weights set to zero, and 1 "
            f"would remove every weight; use a value such as 0.9 (90 % of the weights removed)"
        )
    return value


class LayerSparsity(Config):
    """A per-layer sparsity: layers whose name matches `pattern` (a glob) lose `sparsity` of their weights."""

    pattern: str
    sparsity: float

    @field_validator("sparsity")
    @classmethod
    def _ratio(cls, v: float) -> float:
        return _check_ratio(v, "sparsity")


class PruneConfig(Config):
    """Unstructured pruning: zero individual weights of Linear / Conv1d / Conv2d / Embedding layers,
    optionally over a gradual schedule with fine-tuning, and store each pruned layer sparse. An
    Embedding tied to a Linear (lm_head) is pruned once with it and stays tied (core/tied.py)."""

    sparsity: float = 0.5  # fraction of the selected weights set to zero, in [0, 1); Deep Compression keeps 8 % of LeNet-300-100 (0.92)
    criterion: Criterion = Criterion.MAGNITUDE  # magnitude: smallest |w| first; random: the baseline
    scope: Scope = Scope.LAYER  # layer: no layer can be emptied by a larger neighbour; global: one threshold, usually more accurate at high sparsity
    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d, Conv2d and Embedding are pruned
    skip: list[str] = []  # glob patterns left dense (a first conv or a classifier often deserves it)
    overrides: list[LayerSparsity] = []  # per-layer sparsity, ordered, last match wins; scope "layer" only
    schedule: Schedule = Schedule.AGP  # gradual pruning recovers better (Zhu & Gupta 2017); without fine-tuning it is one shot
    steps: int = Field(default=0, ge=0)  # fine-tuning optimiser steps; 0 (and epochs 0): prune in one shot, no data needed
    epochs: float = Field(default=0.0, ge=0)  # fine-tuning length in passes over the data, instead of steps (data with a len())
    initial_sparsity: float = 0.0  # AGP's s_i: the sparsity at the first step
    ramp: float = Field(default=0.75, gt=0, le=1)  # share of the fine-tuning over which AGP raises the sparsity; the rest recovers at the final one
    updates: int = Field(default=10, ge=1)  # AGP's n: mask updates over the ramp; masks are held in between
    lr: float = Field(default=1e-4, gt=0)  # fine-tuning a trained net: a tenth of Adam's default keeps what it learned
    optimizer: Optimizer = Optimizer.ADAM  # the built-in loop's optimiser (a train_step brings its own)
    weight_decay: float = 0.0  # no decay: pruned weights are held at zero by the masks anyway
    encoding: IndexEncoding = IndexEncoding.AUTO  # how the positions of the kept weights are stored
    index_bits: int | None = Field(default=None, ge=1, le=16)  # width of the relative index; None: the cheapest per layer (Deep Compression: 8 conv, 5 fc)
    seed: int = 0  # the random criterion's generator

    @field_validator("sparsity", "initial_sparsity")
    @classmethod
    def _ratio(cls, v: float, info) -> float:
        return _check_ratio(v, info.field_name)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        if self.steps and self.epochs:
            raise ValueError(f"give steps ({self.steps}) or epochs ({self.epochs}), not both")
        if self.scope == Scope.GLOBAL and self.overrides:
            raise ValueError("overrides set per-layer sparsities, which one global threshold cannot honour; "
                             "use scope 'layer', or drop the overrides and use skip")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} is above sparsity {self.sparsity}; "
                             "AGP only raises the sparsity")
        return self

    @property
    def fine_tunes(self) -> bool:
        return bool(self.steps or self.epochs)

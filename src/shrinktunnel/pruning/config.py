"""Config of structured (channel / head) pruning: `st.ChannelPruneConfig`."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..core.config import Config, StrEnum

__all__ = ["Importance", "Mode", "FinetuneLoss", "RatioRule", "Finetune", "ChannelPruneConfig"]


class Importance(StrEnum):
    L1 = "l1"  # sum of |w| of every weight tied to the channel (Li et al. 2017, "Pruning Filters")
    L2 = "l2"  # sum of w^2 of every weight tied to the channel (Torch-Pruning's default)
    BN_SCALE = "bn_scale"  # |gamma| of the BatchNorms in the group (Liu et al. 2017, "network slimming")
    TAYLOR = "taylor"  # |sum w * dL/dw| per channel, on labelled batches (Molchanov et al. 2019)
    ACTIVATION = "activation"  # E[x_c^2] * ||W[:, c]||^2 summed over the layers that read channel c: the energy
    # the channel adds to their outputs on real inputs (Wanda, Sun et al. 2023, per channel); needs unlabelled data


class Mode(StrEnum):
    UNIFORM = "uniform"  # every group loses `ratio` of its channels (or its rule's ratio)
    GLOBAL = "global"  # `ratio` of all channels go, the least important anywhere (scores normalised per group)


class FinetuneLoss(StrEnum):
    CE = "ce"  # cross-entropy on the batch's labels
    KD = "kd"  # soft targets of the unpruned model (KL at temperature T, times T^2): no labels needed
    MSE = "mse"  # mean squared error to the unpruned model's outputs (embeddings): no labels needed


def _ratio(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"ratio={value} is outside [0, 1): it is the fraction of channels removed; "
                         f"0 removes none, 0.5 half; 1 would remove every channel")
    return value


class RatioRule(Config):
    """A per-layer ratio: applies to the groups in which a layer matching `pattern` loses output
    channels. Rules are ordered; the last matching rule wins."""

    pattern: str  # fnmatch glob over module names, e.g. "features.*" or "encoder.layer.0.*"
    ratio: float  # fraction of that group's channels removed, in [0, 1)

    _check_ratio = field_validator("ratio")(_ratio)


class Finetune(Config):
    """Recovery training right after pruning (shrinktunnel.core.train.fit on the `data` given)."""

    epochs: float = 1.0  # one pass: the budget for the MNIST CNN at half the channels
    steps: int | None = None  # optimiser steps instead of epochs (data without a length needs it)
    lr: float = Field(default=1e-3, gt=0)  # Adam's default; pruned nets recover well from it
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    loss: FinetuneLoss = FinetuneLoss.KD  # kd: learns from the unpruned model, so unlabelled data works too
    temperature: float = Field(default=4.0, gt=0)  # kd only: 4 softens logits enough to carry class similarity
    alpha: float = Field(default=0.9, ge=0, le=1)  # kd only: weight of the soft term; (1 - alpha) x CE when labels exist


class ChannelPruneConfig(Config):
    """Structured pruning: whole channels, FFN neurons and attention heads are removed and the layers
    rewritten smaller, so that dense kernels do less work."""

    ratio: float = 0.5  # fraction of the channels of every prunable group removed (the "half")
    mode: Mode = Mode.UNIFORM  # uniform: each group loses `ratio`; global: the least important channels anywhere
    importance: Importance = Importance.L2  # l2: needs no data, and is what Torch-Pruning compares with by default
    round_to: int = Field(default=1, ge=1)  # kept channel counts are multiples of this; 8 or 16 suit SIMD kernels.
    # 1: exactly the ratio. A group with fewer channels than round_to is left whole
    head_ratio: float = 0.0  # fraction of the heads of each multi-head attention (BERT-style) removed;
    # 0: heads stay. Their q/k/v/o channels are only ever pruned as whole heads
    rules: list[RatioRule] = []  # per-layer ratios by glob, last match wins: [{pattern: "fc.*", ratio: 0.25}]
    protect: list[str] = []  # globs of layers whose output channels are kept (their inputs may still shrink);
    # layers whose channels reach the model's output are always kept, so its output shape never changes
    max_group_ratio: float = 0.9  # global mode: no group loses more than this; keeps every layer alive
    calibration_batches: int = Field(default=8, ge=1)  # taylor: labelled batches whose gradients are summed;
    # activation: batches whose inputs are measured
    refit: bool = False  # True: each Linear that lost inputs is re-solved by least squares on the data so that
    # its kept inputs stand in for the removed ones (pruning/refit.py). False by default: it needs real data
    # (calibration_batches of it, or the example batch) and changes the kept weights
    refit_damping: float = Field(default=1e-2, ge=0)  # ridge on the kept inputs' covariance, as a fraction of its
    # mean diagonal: keeps the solve stable when kept channels are nearly collinear or the batches are few
    finetune: Finetune | None = None  # recovery training after pruning; None: none (run your own loop)

    _check_ratio = field_validator("ratio", "head_ratio", "max_group_ratio")(_ratio)

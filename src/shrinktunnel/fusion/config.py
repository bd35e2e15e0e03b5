"""Configs of operator fusion (`fuse_ops`) and network fusion (`st.fuse`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..core.config import Config, StrEnum
from ..distillation.config import OutputLoss

__all__ = ["LinearMerge", "FuseOpsConfig", "FuseOutput", "FuseConfig"]


class LinearMerge(StrEnum):
    NEVER = "never"
    SMALLER = "smaller"  # merge only when the product has no more weights than the pair (never undoes
    # a low-rank factorisation, whose two thin Linears are smaller than their product)
    ALWAYS = "always"  # one matmul instead of two even when it has more weights


class FuseOpsConfig(Config):
    bn: bool = True  # fold each BatchNorm into the Conv / Linear right before it (exact up to float rounding)
    linear: LinearMerge = LinearMerge.SMALLER  # merge two Linears with nothing between them
    skip: list[str] = Field(default_factory=list)  # glob patterns of module names never fused
    attention: bool = False  # Hugging Face encoders: each attention core becomes ONE ONNX Runtime kernel
    # (com.microsoft.MultiHeadAttention, fusion/attention.py); same function, a third fewer nodes in ONNX


class FuseOutput(StrEnum):
    TUPLE = "tuple"  # (task 0 output, task 1 output, ...): exports to ONNX as several outputs
    DICT = "dict"  # {name: output}, names from `names`


class FuseConfig(Config):
    split: str | None = None  # the layer of the FIRST model whose output ends the shared trunk (a module
    # name, or a torch.fx node name); None: the input of its last layer with weights (only that layer
    # stays per task: the most sharing)
    names: list[str] | None = None  # task names, one per model; None: task0, task1, ...
    output: FuseOutput = FuseOutput.TUPLE
    loss: OutputLoss = OutputLoss.KL  # kl: classifiers' soft targets; mse / cosine: regressors, encoders
    temperature: float = Field(default=2.0, gt=0)  # soft targets of several teachers at once; 2 keeps every task's top class
    # dominant while passing on the rest of the distribution
    task_weights: list[float] | None = None  # weight of each task's loss; None: 1 each
    steps: int | None = Field(default=None, ge=1)  # optimiser steps; None: `epochs` passes over the data
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=1e-3, gt=0)  # Adam; the heads start from teachers trained on other trunks, so they must move
    optimizer: str = "adam"  # adam | adamw | sgd
    train_trunk: bool = True  # False: only the heads learn; the trunk stays the first model's

    @model_validator(mode="after")
    def _check(self) -> "FuseConfig":
        if self.loss == OutputLoss.NONE:
            raise ValueError("loss: none leaves the fused model nothing to learn; use kl, mse or cosine")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not known; use adam, adamw or sgd")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ValueError(f"names {self.names} repeat a name; give each task its own")
        return self

"""Configs of distillation (`distill`) and of building a smaller student (`keep_layers`)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ..core.config import Config, StrEnum

__all__ = ["OutputLoss", "Pooling", "Schedule", "HintLoss", "Hint", "Relation", "DistillConfig", "KeepLayersConfig"]


class OutputLoss(StrEnum):
    KL = "kl"  # Hinton's soft targets: KL(softmax(t/T) || softmax(s/T)) * T^2, plus a hard-label term
    MSE = "mse"  # mean squared error between the (pooled) outputs: logits or embeddings
    COSINE = "cosine"  # 1 - cosine similarity of the (pooled) outputs: embedding distillation
    NONE = "none"  # no output term: only the hints train the student


class Pooling(StrEnum):
    AUTO = "auto"  # mse / cosine: mean over the tokens of a (B, T, D) output (attention-mask aware); kl: none
    NONE = "none"  # compare outputs position by position
    MEAN = "mean"  # mean over dim 1, weighted by the batch's attention_mask when it has one
    CLS = "cls"  # the first position (BERT's [CLS] token)


class Schedule(StrEnum):
    CONSTANT = "constant"  # lr throughout (after the warmup, if any)
    LINEAR = "linear"  # linear decay to 0 at the last step (BERT's and TinyBERT's schedule)
    COSINE = "cosine"  # half a cosine from lr to 0 at the last step


class HintLoss(StrEnum):
    MSE = "mse"  # mean squared error (FitNets, TinyBERT): dominated by the feature's largest elements
    SCALED_MSE = "scaled_mse"  # MSE divided by the teacher feature's mean square (per batch): the same
    # size whatever the layer's scale, so hints on layers of very different magnitudes weigh alike
    COSINE = "cosine"  # 1 - cosine per position (per token of a (B, T, D) feature, per pixel of a map)


class Hint(Config):
    """A FitNets hint: the student's module `student` learns to reproduce the teacher's `teacher`."""

    student: str  # module name in the student, as in named_modules() (its output is matched)
    teacher: str  # module name in the teacher
    weight: float = Field(default=1.0, gt=0)  # 1: as much as the output term; hints of a deep net often need less
    loss: HintLoss = HintLoss.MSE  # mse: FitNets' and TinyBERT's; the others are scale-free


class Relation(Config):
    """MiniLM's self-attention relations: the student's attention module learns the teacher's token-to-token
    distributions softmax(a b^T / sqrt(d)) per head, compared by KL."""

    student: str  # the student's attention module (children query/key/value, q_proj/..., or q/k/v)
    teacher: str  # the teacher's attention module
    kinds: list[str] = Field(default_factory=lambda: ["qk", "vv"])  # qk: the attention distribution, vv: the
    # value relation (MiniLM); qq and kk add MiniLMv2's query and key relations
    heads: int = Field(default=12, ge=1)  # relation heads, the same for both (12: BERT-base and MiniLM's);
    # must divide both models' projection widths
    weight: float = Field(default=1.0, gt=0)  # 1: MiniLM weighs its terms alike

    @field_validator("kinds")
    @classmethod
    def _check_kinds(cls, value: list[str]) -> list[str]:
        allowed = {"qk", "vv", "qq", "kk"}
        bad = [k for k in value if k not in allowed]
        if bad or not value:
            raise ValueError(f"relation kinds {bad or value} are not known; use some of qk, vv, qq, kk")
        return value


def _positive(name: str):
    def check(value: float) -> float:
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}; e.g. 1e-4 for a trained student")
        return value

    return check


class DistillConfig(Config):
    teacher: str = "original"  # "original": the model before the recipe's first stage (st.distill: the
    # teacher passed); or a model reference "pkg.module:factory" / "file.py:factory" to load one
    loss: OutputLoss = OutputLoss.KL  # kl: classifiers (Hinton et al. 2015); cosine: sentence encoders
    temperature: float = 4.0  # softens both distributions so the teacher's small probabilities (its
    # "dark knowledge") carry gradient; Hinton et al. used 2-20, 4 is the usual middle. Read by kl only
    alpha: float = Field(default=0.9, ge=0, le=1)  # weight of the soft term; 1 - alpha weighs the hard
    # cross-entropy on the batch's labels (dropped, with a warning, when batches have none). kl only
    pooling: Pooling = Pooling.AUTO  # how a (B, T, D) output becomes one vector per example
    hints: list[Hint] = Field(default_factory=list)  # FitNets hints; empty: outputs only
    relations: list[Relation] = Field(default_factory=list)  # MiniLM attention relations; empty: none
    dropout: bool = True  # False: the student trains in eval mode (dropout off, BatchNorm statistics
    # frozen): the student then regresses exactly the function it is evaluated with. True: as usual
    steps: int | None = Field(default=None, ge=1)  # optimiser steps; None: `epochs` passes over the data
    epochs: float = Field(default=1.0, gt=0)  # passes over the data when steps is None
    lr: float = 1e-4  # Adam; low because the student usually starts from trained (compressed) weights.
    # A student trained from scratch wants 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    schedule: Schedule = Schedule.CONSTANT  # the learning rate over the steps; constant: what a short
    # recovery after compression wants. A student far from its teacher (keep_layers) learns faster with
    # a higher lr, warmed up and decayed: linear or cosine
    warmup: float = Field(default=0.0, ge=0, lt=1)  # fraction of the steps over which lr rises linearly
    # from lr / warmup-steps to lr; 0: none. 0.1 is BERT's usual
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)  # max global gradient norm; None: no clipping
    freeze: list[str] = Field(default_factory=list)  # glob patterns of parameter names kept as they are,
    # e.g. ["*embeddings*"]: a student sharing the teacher's embeddings trains faster without moving them
    eval_every: int | None = Field(default=None, ge=1)  # steps between eval_fn calls; None: no
    # evaluation during training (then no early stopping and no best-model restore)
    patience: int | None = Field(default=None, ge=1)  # evaluations without improvement before stopping;
    # None: never stop early
    restore_best: bool = True  # True: end with the weights of the best evaluation (step 0 included, so
    # distillation never returns a student worse than it received, by eval_fn)
    checkpoint: str | None = None  # directory for a resumable checkpoint (safetensors + json); a run
    # finding one there continues from it. None: no checkpoint
    checkpoint_every: int = Field(default=100, ge=1)  # steps between checkpoint writes
    cache_teacher: bool = False  # True: keep the teacher's outputs per batch object in memory, saving a
    # teacher forward per step when the data is a list that is cycled more than once (other data: no effect)

    _lr = field_validator("lr")(_positive("lr"))

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"temperature must be positive, got {value}: soft targets are softmax(logits / T); "
                             "T = 1 is the plain softmax and 2 to 20 soften it (4 is usual)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.loss == OutputLoss.NONE and not self.hints and not self.relations:
            raise ValueError("loss: none with no hints or relations leaves nothing to learn; set loss (kl, mse, "
                             "cosine) or add hints")
        if self.patience is not None and self.eval_every is None:
            raise ValueError("patience needs eval_every (the steps between evaluations); set eval_every, e.g. 50")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not known; use adam, adamw or sgd")
        return self


class KeepLayersConfig(Config):
    """Keep some blocks of a stack (a transformer's layers): a shallower student initialised from the teacher."""

    blocks: str = "auto"  # dotted name of the nn.ModuleList of blocks; auto: the longest ModuleList
    # (encoder.layer in BERT, h in GPT-2, layers in most others)
    keep: list[int] | str = "alternate"  # indices to keep, or "alternate": every other block ending
    # with the last one (6 -> 1, 3, 5), so the top block, whose output the head reads, survives

    @field_validator("keep")
    @classmethod
    def _check_keep(cls, value):
        if isinstance(value, str):
            if value != "alternate":
                raise ValueError(f"keep={value!r} is not known; give a list of block indices or 'alternate'")
            return value
        if not value:
            raise ValueError("keep is empty: a student needs at least one block; e.g. keep: [1, 3, 5]")
        if len(set(value)) != len(value):
            raise ValueError(f"keep={value} lists a block twice; give each index once")
        return value

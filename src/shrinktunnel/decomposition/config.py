"""Config of the `decompose` method: which layers, which scheme, and how each layer's rank is chosen."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from ..core.config import Config, StrEnum

__all__ = ["ConvScheme", "BudgetMetric", "BudgetScope", "Method", "FineTune", "LayerRank", "DecomposeConfig"]


class ConvScheme(StrEnum):
    """How a convolution is factorised (a Linear is always a truncated SVD into two Linears)."""

    SPATIAL = "spatial"  # Jaderberg et al. 2014, scheme 2: (kh x 1, r channels) then (1 x kw)
    CHANNEL = "channel"  # Zhang et al. 2015: (kh x kw, r channels) then 1 x 1: an SVD of (out, in*kh*kw)
    TUCKER2 = "tucker2"  # Kim et al. 2016: 1 x 1 (in -> r_in), kh x kw core, 1 x 1 (r_out -> out)
    CP = "cp"  # Lebedev et al. 2015: 1 x 1, depthwise kh x 1, depthwise 1 x kw, 1 x 1 (rank R)


class Method(StrEnum):
    """What the truncated SVD of a Linear (and of a conv under the channel scheme) keeps."""

    AUTO = "auto"  # whitened_svd when the stage has data, svd otherwise
    SVD = "svd"  # the weight's own leading singular directions: least ||W - W~|| (Eckart-Young)
    WHITENED_SVD = "whitened_svd"  # least ||(W - W~) X^T|| on the calibration inputs X: an SVD of W S with
    # X^T X = S S^T, then S^-1 back (SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023). Needs data


class BudgetScope(StrEnum):
    MODEL = "model"  # the budget is a fraction of the whole model's metric (the "MACs cut by half")
    LAYERS = "layers"  # a fraction of the selected layers' metric only (e.g. "the projections at half their
    # weights" while the embeddings, which are not decomposed, stay as they are)


class BudgetMetric(StrEnum):
    MACS = "macs"  # multiply-adds of one forward pass per sample: what decides CPU latency
    PARAMS = "params"  # weights stored: what decides the size on disk


def _check_rank(rank: Any) -> Any:
    if rank is None:
        return rank
    ranks = rank if isinstance(rank, list) else [rank]
    if isinstance(rank, list) and len(rank) not in (1, 2):
        raise ValueError(f"rank={rank} has {len(rank)} entries; give one integer, or [r_out, r_in] for tucker2")
    for r in ranks:
        if r < 1:
            raise ValueError(f"rank={rank} is not allowed: a rank must be an integer of at least 1 (a rank of 0 "
                             f"would remove the layer); give a rank from 1 to the layer's full rank, or use ratio")
    return rank


def _check_energy(energy: float | None) -> float | None:
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy={energy} is outside (0, 1]: it is the fraction of the weight's squared norm the "
                         f"decomposition keeps; use e.g. 0.9 (1.0 keeps the full rank)")
    return energy


def _check_ratio(ratio: float | None) -> float | None:
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio} is outside (0, 1): it is the decomposed layer's weights as a fraction of "
                         f"the layer's; use e.g. 0.5 for half the parameters")
    return ratio


_CHOICES = ("rank", "energy", "ratio")


class LayerRank(Config):
    """Per-layer settings: layers whose name matches `pattern` take the fields given here. Rules apply in
    order, the last match wins, field by field; a field left out is inherited from the config."""

    pattern: str  # fnmatch pattern over module names, e.g. "conv_layers.3"
    rank: int | list[int] | None = None  # given: this rank ([r_out, r_in] for tucker2)
    energy: float | None = None  # given: the smallest rank keeping this fraction of ||W||^2
    ratio: float | None = None  # given: the largest rank whose weights fit in this fraction of the layer's
    scheme: ConvScheme | None = None  # given: the conv scheme of the matching convolutions
    skip: bool = False  # True: the matching layers stay whole

    _rank = field_validator("rank")(_check_rank)
    _energy = field_validator("energy")(_check_energy)
    _ratio = field_validator("ratio")(_check_ratio)

    @model_validator(mode="after")
    def _one_choice(self) -> "LayerRank":
        given = [k for k in _CHOICES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"override {self.pattern!r} sets {' and '.join(given)}; set one of rank, energy, ratio")
        return self


class FineTune(Config):
    """Recovery right after decomposition: the built-in loop (core.train.fit) with cross-entropy on the
    labels of the stage's data. For distillation from the original model use a following stage."""

    epochs: float = Field(default=1.0, gt=0)  # 1: the "one epoch of recovery"
    lr: float = Field(default=1e-4, gt=0)  # 1e-4: the factors start near the trained weights; Adam's 1e-3
    # throws a good part of that away in the first steps
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)


class DecomposeConfig(Config):
    """Low-rank decomposition: Linear -> two Linears (truncated SVD); Conv -> a chain of thin convolutions."""

    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d and Conv2d among them are decomposed
    skip: list[str] = []  # glob patterns of layers kept whole, applied after `layers`
    conv_scheme: ConvScheme = ConvScheme.TUCKER2  # tucker2: closed form (HOSVD + HOOI), an error bound for the
    # energy rule, both channel sides shrunk, dense convs only. On the MNIST CNN all four schemes land within
    # 0.11 pt at a third of the weights; cp had the lowest error there (docs/decomposition.md)
    rank: int | list[int] | None = None  # one rank for every layer ([r_out, r_in] for tucker2); above a
    # layer's full rank is an error
    energy: float | None = None  # (0, 1]: per layer, the smallest rank keeping this fraction of ||W||^2
    ratio: float | None = None  # (0, 1): per layer, the largest rank whose weights fit in this fraction of the
    # layer's. When none of rank / energy / ratio / budget is given: ratio 0.5
    budget: float | None = None  # (0, 1): ranks chosen per layer, from measured sensitivity, so that the whole
    # model keeps this fraction of its `budget_metric`; needs data
    budget_metric: BudgetMetric = BudgetMetric.MACS  # macs: what decides CPU latency
    budget_candidates: list[float] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # the ranks
    # each layer may take under a budget, as fractions of its weights: finer where the savings are large. Each
    # costs one sensitivity pass over the calibration batches per layer; fewer make a large model affordable
    budget_scope: BudgetScope = BudgetScope.MODEL  # model: a budget of the whole model, as the issue states it
    method: Method = Method.AUTO  # auto: whitened_svd with data (on MiniLM at half the projections' weights
    # the cosine to fp32 before recovery rose from 0.35 to 0.77; docs/decomposition.md), svd without. Applies
    # to Linears and to convolutions under the channel scheme; the other conv schemes factor the weight alone
    whitening_batches: int = Field(default=16, ge=1)  # batches whose inputs give each layer's X^T X: a
    # 1536-wide layer needs many more rows than columns for its second moment to be estimated
    whitening_damping: float = Field(default=1e-4, ge=0)  # added to X^T X as a fraction of its mean diagonal:
    # directions the calibration data never took keep a little weight instead of an arbitrary amount
    keep_if_slower: bool = True  # True: a layer whose decomposed form runs slower than the whole layer on
    # the data's real shapes (timed here, in PyTorch) is left whole. Without data nothing can be timed
    calibration_batches: int = Field(default=4, ge=1)  # batches that measure sensitivity and latency: 4 of 64
    # MNIST images rank the layers the same way as 40 did
    tucker_iterations: int = Field(default=2, ge=0)  # HOOI sweeps after the HOSVD start; 0: plain HOSVD. Two
    # sweeps take most of the gain (each is two SVDs)
    cp_iterations: int = Field(default=100, ge=1)  # CP-ALS sweeps; ALS converges slowly, and a sweep of a
    # 3x3 conv costs a millisecond
    seed: int = 0  # CP-ALS starts from the HOSVD factors, padded with random columns from this seed
    overrides: list[LayerRank] = []  # per-layer exceptions, last match wins (a search sets these)
    fine_tune: FineTune | None = None  # None: no recovery here (add a fine-tuning or distill stage after);
    # given: train on the stage's labelled data right after decomposing

    _rank = field_validator("rank")(_check_rank)
    _energy = field_validator("energy")(_check_energy)
    _ratio = field_validator("ratio")(_check_ratio)

    @field_validator("budget_candidates")
    @classmethod
    def _check_candidates(cls, values: list[float]) -> list[float]:
        if not values or any(not 0 < v < 1 for v in values):
            raise ValueError(f"budget_candidates={values}: give at least one fraction of a layer's weights, each in "
                             f"(0, 1), e.g. [0.3, 0.5, 0.7]")
        return values

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, budget: float | None) -> float | None:
        if budget is not None and not 0 < budget < 1:
            raise ValueError(f"budget={budget} is outside (0, 1): it is the fraction of the model's MACs (or "
                             f"parameters) to keep; use e.g. 0.5 to halve them")
        return budget

    @model_validator(mode="after")
    def _one_choice(self) -> "DecomposeConfig":
        given = [k for k in (*_CHOICES, "budget") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are all set; set one of rank, energy, ratio, budget "
                             f"(per-layer exceptions go in overrides)")
        return self

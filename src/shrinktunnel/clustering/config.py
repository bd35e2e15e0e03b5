"""ClusterConfig: weight sharing through per-layer k-means codebooks (Deep Compression, section 3)."""

from __future__ import annotations

from pydantic import field_validator, model_validator

from ..core.config import Config, StrEnum

__all__ = ["ClusterConfig", "ClusterOverride", "CodebookTuning", "Init", "Coding", "SparseStorage", "Trainable", "TuneLoss"]


class Init(StrEnum):
    LINEAR = "linear"  # evenly spaced over [min, max]: keeps the rare large weights (the paper's best)
    DENSITY = "density"  # evenly spaced quantiles: many centroids where weights are dense
    RANDOM = "random"  # k weights drawn at random (Forgy)
    KMEANS_PP = "kmeans++"  # D^2 seeding (Arthur & Vassilvitskii 2007)


class Coding(StrEnum):
    HUFFMAN = "huffman"  # canonical Huffman code per stream, tables in the artifact (smallest file)
    PACKED = "packed"  # fixed width: indices at ceil(log2 k) bits, positions at position_bits


class SparseStorage(StrEnum):
    AUTO = "auto"  # sparse when the layer was pruned (a pruned layer, or zeros >= sparse_from)
    DENSE = "dense"  # an index for every weight; zeros are clustered like any value
    SPARSE = "sparse"  # positions of the non-zero weights + their indices, whatever the sparsity


class Trainable(StrEnum):
    CODEBOOKS = "codebooks"  # only the centroids (the paper); everything else stays as it is
    ALL = "all"  # centroids and every other float parameter (biases, norms, layers left in float)


class TuneLoss(StrEnum):
    AUTO = "auto"  # cross_entropy when the batches carry a target, else distill
    CROSS_ENTROPY = "cross_entropy"  # against the batch's target
    DISTILL = "distill"  # mean squared error to the unclustered model's outputs: needs no labels


def _check_bits(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8 (2 to 256 clusters), got {value!r}; "
                         "8 bits is the widest codebook index")
    return value


class ClusterOverride(Config):
    """Bits for the layers whose names match `pattern` (ordered: the last matching rule wins)."""

    pattern: str
    bits: int

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _check_bits(v)


class CodebookTuning(Config):
    """Fine-tuning of the centroids with every index fixed (built-in loop, shrinktunnel.core.train)."""

    steps: int | None = None  # optimiser steps; None: `epochs` passes over the data
    epochs: float = 1.0  # a pass is enough to win back most of the loss on the MNIST nets
    lr: float = 1e-4  # Adam on centroids: each step moves every weight of a cluster, so smaller than usual
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9); sgd sees the summed gradients' scale
    train: Trainable = Trainable.CODEBOOKS  # codebooks: the paper's update, nothing else moves
    loss: TuneLoss = TuneLoss.AUTO  # auto: cross-entropy with labelled batches, distillation without

    @model_validator(mode="after")
    def _check(self) -> "CodebookTuning":
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1 (or null for epochs), got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer.lower() not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        return self


class ClusterConfig(Config):
    """Share the weights of each selected layer through a codebook of 2^bits centroids."""

    bits: int = 5  # 32 clusters: the paper's width for fully connected layers (8 for conv)
    init: Init = Init.LINEAR  # the paper found linear best: it keeps the few large weights
    optimal: bool = False  # exact 1-D k-means (dynamic programming, `kmeans1d`) instead of Lloyd from `init`
    iterations: int = 300  # Lloyd iterations after `init`, fewer when it converges; each is O(k log n), so cheap
    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d, Conv2d, Embedding and pruned layers
    skip: list[str] = []  # glob patterns kept in float
    overrides: list[ClusterOverride] = []  # per-layer bits, e.g. [{pattern: "conv*", bits: 8}]
    coding: Coding = Coding.HUFFMAN  # entropy-code the streams: about 1 bit per weight less at 5 bits
    sparse: SparseStorage = SparseStorage.AUTO  # how zeros of pruned layers are stored
    sparse_from: float = 0.1  # with auto, a layer with this fraction of exact zeros counts as pruned
    position_bits: int | None = None  # relative-index width; None: per layer, the one giving the smallest stream
    tune: CodebookTuning | None = None  # fine-tune the centroids on `data` after clustering; None: no training
    seed: int = 0  # random and kmeans++ initialisations

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _check_bits(v)

    @field_validator("iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"iterations must be >= 0, got {v}")
        return v

    @field_validator("sparse_from")
    @classmethod
    def _sparse_from(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"sparse_from must be a fraction in (0, 1], got {v}")
        return v

    @field_validator("position_bits")
    @classmethod
    def _position_bits(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 8:
            raise ValueError(f"position_bits must be from 1 to 8 (the paper: 8 for conv, 5 for fc) or null "
                             f"to choose per layer, got {v}")
        return v

"""Configs of the quantization methods."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..core.config import Config, StrEnum

__all__ = ["Granularity", "Calibrator", "Rounding", "WeightFormat", "WeightScale", "WeightCoding", "ActivationFormat", "WeightQuant", "ActivationQuant", "LayerOverride", "QuantConfig"]


class Granularity(StrEnum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class WeightFormat(StrEnum):
    INT = "int"  # integers of `bits` bits with scales (and zero points)
    TERNARY = "ternary"  # {-1, 0, +1} x a scale per channel (TWN), stored at 2 bits; needs training (qat)
    BINARY = "binary"  # {-1, +1} x mean|W| per channel (XNOR-Net), stored at 1 bit; needs training (qat)
    LOG2 = "log2"  # 0 or +-2^e: 2^(bits-1) - 1 powers of two below a per-channel 2^e_max (Miyashita et al.
    # 2016), so a multiply is a shift; bits 2-8 (4: 7 levels, 6 binades); PTQ or qat (INQ: qat's `inq`)


class WeightScale(StrEnum):
    FLOAT = "float"  # any float32 scale: max|w| / qmax, the finest grid that does not clip
    POW2 = "pow2"  # a power of two (fixed-point accelerators shift instead of multiplying; Brevitas' po2
    # scales): 2^floor or 2^ceil of the free scale, whichever has the smaller error; symmetric int only


class WeightCoding(StrEnum):
    PLAIN = "plain"  # int8 bytes, or bit-packed at `bits` below 8: every weight costs exactly `bits`
    HUFFMAN = "huffman"  # the integers Huffman-coded (Deep Compression's last stage): the same grid, about
    # 3.1 bits per int4 weight and 5.2 per int6 weight of a transformer; decoded once at load


class ActivationFormat(StrEnum):
    INT = "int"  # integers of `bits` bits with a scale and zero point
    BINARY = "binary"  # two levels, offset +- scale (sign(x) when symmetric, as BNN); needs training (qat)


_FORMAT_BITS = {WeightFormat.BINARY: 1, WeightFormat.TERNARY: 2}  # the storage width of each non-int format


class Calibrator(StrEnum):
    MINMAX = "minmax"  # the observed range, nothing clipped
    PERCENTILE = "percentile"  # the range at a percentile of |x| (symmetric) or of both tails (asymmetric)
    ENTROPY = "entropy"  # TensorRT's KL-divergence threshold on the histogram of |x|
    MSE = "mse"  # the clip with the least expected squared quantization error


def _only_8_bits(bits: int) -> int:
    if bits != 8:
        raise ValueError(f"bits={bits} is not supported yet; use 8 (other widths arrive with the quantization issue)")
    return bits


WEIGHT_BITS = (2, 8)  # the weight widths quantize accepts (inclusive)


def _weight_bits(bits: int) -> int:
    lo, hi = WEIGHT_BITS
    if bits == 1:
        return bits  # binary weights: checked with `format` below
    if not lo <= bits <= hi:
        raise ValueError(f"bits={bits} is not supported for weights; use an integer from {lo} to {hi} "
                         f"(8: int8, near-lossless; 4: half the bytes, more accurate per_group)")
    return bits


class WeightQuant(Config):
    bits: int = 8  # 8: int8 kernels exist in every CPU runtime; near-lossless with per-channel scales.
    # 2..7: stored packed at that many bits (an INT4 layer takes half the bytes of the INT8 one)
    granularity: Granularity = Granularity.PER_CHANNEL  # per_channel: one scale per output channel
    symmetric: bool = True  # True: signed, zero point 0, so integer kernels skip a zero-point correction
    # term. False: unsigned 0..2^bits-1 with a zero point per channel/group, for skewed weight ranges
    reduce_range: bool = False  # True: 7-bit weights ([-63, 63]). x86 CPUs without VNNI run ONNX Runtime's
    # u8s8 kernels with 16-bit intermediate sums that saturate on full-range weights; 7 bits cannot.
    group_size: int | None = None  # per_group only: consecutive input weights sharing a scale. No default:
    # it must divide every selected layer's input dimension; 32-128 is usual for transformer Linears
    format: WeightFormat = WeightFormat.INT  # int: the integer grid above. ternary / binary: 2 / 1 bits
    # (bits is implied; bits: 1 alone means binary), scale per channel or tensor; trained with `qat`
    coding: WeightCoding = WeightCoding.PLAIN  # how the artifact stores the integers (format int only)
    scale: WeightScale = WeightScale.FLOAT  # pow2: power-of-two scales (format int, symmetric); log2
    # weights' scales are powers of two anyway
    stochastic: bool = False  # format binary, qat only: during training each weight is +alpha with probability
    # hard_sigmoid(w / alpha), else -alpha (stochastic BinaryConnect, alpha = mean |w|); sign(w) at inference

    _bits = field_validator("bits")(_weight_bits)

    @model_validator(mode="before")
    @classmethod
    def _implied_bits(cls, data):
        # `format: binary` implies bits 1 and `bits: 1` implies binary (1-bit integers are nothing else);
        # ternary implies 2. A contradicting explicit value is reported by _check_combination.
        if isinstance(data, dict):
            fmt = data.get("format")
            if fmt in _FORMAT_BITS and "bits" not in data:
                data = {**data, "bits": _FORMAT_BITS[WeightFormat(fmt)]}
            elif fmt == WeightFormat.LOG2 and "bits" not in data:
                data = {**data, "bits": 4}  # 7 powers of two and zero: the usual log2 width
            elif data.get("bits") == 1 and "format" not in data:
                data = {**data, "format": WeightFormat.BINARY}
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> "WeightQuant":
        self._check_new_formats()
        if self.format == WeightFormat.LOG2:
            pass
        elif self.format != WeightFormat.INT:
            need = _FORMAT_BITS[self.format]
            if self.bits != need:
                raise ValueError(f"format {self.format} weights are stored at {need} bit(s), not bits={self.bits}; "
                                 f"remove bits (it is implied) or set bits: {need}")
            if self.coding != WeightCoding.PLAIN:
                raise ValueError(f"coding: {self.coding} applies to integer weights; format {self.format} weights are "
                                 "stored one or two bits each: remove coding")
            if self.granularity == Granularity.PER_GROUP or not self.symmetric or self.reduce_range:
                raise ValueError(f"format {self.format} weights are symmetric with one scale per channel or per tensor; "
                                 f"use granularity: per_channel or per_tensor, symmetric: true, no group_size or reduce_range")
        elif self.bits == 1:
            raise ValueError("bits=1 integers are binary weights: set format: binary (or use bits 2 to 8)")
        if self.granularity == Granularity.PER_GROUP:
            if self.group_size is None:
                raise ValueError("granularity per_group needs group_size: the number of consecutive input "
                                 "weights that share a scale, e.g. group_size: 64 (it must divide in_features)")
            if self.group_size < 2:
                raise ValueError(f"group_size={self.group_size} is too small; use 2 or more "
                                 "(a group of one weight would store a scale per weight)")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} is only read with granularity: per_group "
                             f"(granularity is {self.granularity}); set granularity: per_group or remove group_size")
        if self.reduce_range and self.bits != 8 and self.format == WeightFormat.INT:
            raise ValueError(f"reduce_range applies to 8-bit weights only (it keeps ONNX Runtime's u8s8 kernels "
                             f"from saturating); with bits={self.bits} remove it, or use bits: 7 for 7-bit weights")
        return self


    def _check_new_formats(self) -> None:
        """log2 weights, power-of-two scales and stochastic binarization (quant/log2.py, quant/binary.py)."""
        if self.format == WeightFormat.LOG2:
            if self.bits == 1:
                raise ValueError("format log2 with bits: 1 leaves no bit for an exponent (one sign bit, and code 0 is "
                                 "zero); use bits: 2 to 8 (bits: 4 gives 7 powers of two and zero), or format: binary "
                                 "for 1-bit weights")
            if self.granularity == Granularity.PER_GROUP or not self.symmetric or self.reduce_range or \
                    self.coding != WeightCoding.PLAIN:
                raise ValueError("format log2 weights are signed powers of two with one largest level per channel "
                                 "or per tensor: use granularity per_channel or per_tensor, symmetric: true, and no "
                                 "group_size, reduce_range or coding")
        if self.scale == WeightScale.POW2 and (self.format != WeightFormat.INT or not self.symmetric):
            raise ValueError(f"scale: pow2 rounds the scales of symmetric integer weights to powers of two (format "
                             f"{self.format}, symmetric={self.symmetric}); use format: int with symmetric: true "
                             "(log2 weights have power-of-two scales already: remove scale)")
        if self.stochastic and self.format != WeightFormat.BINARY:
            raise ValueError(f"stochastic applies to format binary (stochastic BinaryConnect), not format "
                             f"{self.format}; set format: binary or remove stochastic")


def _changed(cfg: Config, names: tuple[str, ...]) -> list[str]:
    # Fields given a value other than their default. Not `model_fields_set`: a config written out by
    # to_dict() sets every field, and must parse back.
    return sorted(n for n in names if getattr(cfg, n) != type(cfg).model_fields[n].default)


class ActivationQuant(Config):
    bits: int = 8
    format: ActivationFormat = ActivationFormat.INT  # binary: each layer's input takes two levels,
    # offset +- scale (offset 0 when symmetric: sign(x), as BNN); trained with `qat`, which learns both
    symmetric: bool = False  # False: uint8 with a zero point uses all 256 levels on post-ReLU tensors
    calibrator: Calibrator = Calibrator.MINMAX  # minmax: the observed range, nothing clipped
    percentile: float = Field(default=99.99, gt=0, le=100)  # 99.99: clips the rarest 1 in 10,000 values, the
    # outliers that stretch a min-max range, and little signal; only the percentile calibrator reads it
    bins: int = Field(default=2048, ge=256, le=65536)  # 2048 (TensorRT's): >= 8 bins per uint8 step at the
    # max. >= 256: the KL search needs a bin per uint8 level; <= 65536: memory is 32 bytes per bin per
    # observed tensor. Read by the percentile, entropy and mse calibrators

    outputs: bool = True  # True: each layer's output is quantized too, so a runtime can chain integer
    # kernels (a CNN's conv -> relu -> pool -> conv stays uint8). False: inputs only: where the consumers
    # are float ops (a transformer's residual Add, LayerNorm, GELU), output Q/DQ pairs cost time and accuracy
    dynamic: bool = False  # False: static, scales calibrated once on data. True: scales computed from each
    # input at run time (uint8 with a zero point; Linear layers only): no calibration data, no stale range
    per_token: bool = True  # dynamic only. True: a scale per token (row), what keeps transformers accurate;
    # False: one scale per tensor, as ONNX Runtime's quantize_dynamic does

    _bits = field_validator("bits")(_only_8_bits)

    @model_validator(mode="after")
    def _check_dynamic(self) -> "ActivationQuant":
        if self.dynamic:
            static_only = _changed(self, ("symmetric", "calibrator", "percentile", "bins", "outputs"))
            if static_only:
                raise ValueError(f"{', '.join(static_only)} only apply to static activations (dynamic: false); "
                                 "dynamic activations are uint8 with a zero point computed per input: remove them")
        elif _changed(self, ("per_token",)):
            raise ValueError("per_token only applies to dynamic activations; set dynamic: true or remove per_token")
        return self

    @model_validator(mode="after")
    def _check_binary(self) -> "ActivationQuant":
        if self.format == ActivationFormat.BINARY:
            unused = _changed(self, ("bits", "calibrator", "percentile", "bins", "per_token"))
            if self.dynamic or unused:
                raise ValueError(f"binary activations have two learned levels, offset +- scale: "
                                 f"remove {', '.join(unused) or 'dynamic'}, which only apply to integer activations")
        return self


class LayerOverride(Config):
    """Per-layer settings: layers whose name matches `pattern` take the fields given here. Rules are
    applied in order and the last match wins, field by field; a field left out is inherited."""

    pattern: str  # fnmatch pattern over module names, e.g. "fc_layers.*"
    weights: WeightQuant | None = None  # given: the weight format of the matching layers
    activations: ActivationQuant | None = None  # given: their activation format; null: weight-only there


class Rounding(StrEnum):
    NEAREST = "nearest"  # each weight to its closest level: no data needed
    GPTQ = "gptq"  # Frantar et al. 2023: later input columns absorb earlier rounding errors (Linear layers)


class QuantConfig(Config):
    """Post-training quantization (static: weights and activations; weight-only when activations is None)."""

    weights: WeightQuant = WeightQuant()
    activations: ActivationQuant | None = ActivationQuant()  # None: weight-only, no calibration data needed
    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d, Conv2d and Embedding (weight-only) among them are quantized
    skip: list[str] = []  # glob patterns of layers kept in floating point, applied after `layers`
    calibration_batches: int | None = Field(default=None, ge=1)  # None: every batch of the data given
    rounding: Rounding = Rounding.NEAREST  # nearest: fine at 8 bits. gptq: needs calibration data, worth it
    # at 4 bits and below on transformers (MiniLM int4 g32: mean cosine 0.96 -> see docs/benchmarks.md)
    gptq_damp: float = Field(default=0.01, gt=0, lt=1)  # GPTQ's dampening, a fraction of the mean diagonal
    # of the Hessian added to it: 0.01 as in the paper; raise it if a layer's inputs are nearly collinear
    gptq_act_order: bool = True  # gptq: columns rounded in decreasing order of their input energy (diag of the
    # Hessian), with static groups (scales from the original weights, groups contiguous as stored): the paper's
    # act-order; False: natural column order, each group's scale fitted to the weights as corrected so far
    awq: bool = False  # weight-only: AWQ's activation-aware input-channel scales (the layer keeps 1/s, one Mul
    # on its input) and weight clipping, searched on the calibration data (quant/awq.py); with rounding: gptq
    # the scales, then GPTQ (no clipping). Needs data; transformer blocks are calibrated true-sequentially
    tied: Literal["auto", "float", "quantize"] = "auto"  # a Linear tied to an Embedding (a language model's
    # lm_head): quantize: quantized once for both uses (core/tied.py); float: both stay float and tied;
    # auto: float when its weights would have fewer than 8 bits (the head is the most sensitive layer of a
    # decoder: SmolLM2-135M int4 g64 perplexity 1.75x fp32 with it, 1.40x without), quantized once at 8 bits
    fuse_relu: bool = True  # a ReLU right after a layer joins its output quantizer, as runtimes fuse it
    fold_bn: bool = True  # with static activations, each BatchNorm right after a Conv / Linear is folded
    # into it first (exact in float), so the int8 layer runs as one QLinearConv in ONNX Runtime instead of
    # an int8 conv, a dequantize and a float BatchNormalization; False keeps the BatchNorms as they are
    smooth: Literal["auto"] | float | None = None  # None: inputs quantized as they come. SmoothQuant: move
    # activation outliers into the weights (x / s, W * s) before quantizing, so one scale per tensor fits
    # transformer inputs. "auto": alpha chosen per Linear from a grid by its own quantized output error
    # (unsmoothed included); a number in (0, 1): that alpha everywhere. Needs calibration data
    smooth_layers: list[str] = ["*"]  # glob patterns: the Linears smooth applies to. Each smoothed layer costs
    # one elementwise Mul on its input at run time; restrict it to the layers that need it to save that
    overrides: list[LayerOverride] = []  # per-layer exceptions, last match wins (a search sets these)
    max_drop: float | None = Field(default=None, ge=0)  # None: quantize every selected layer. A number:
    # return the most sensitive layers to float until the metric (eval_fn, or without one the mean
    # cosine to the float model's outputs on the calibration data) is within max_drop of float's.
    fallback: list[Literal["per_token", "float"]] = ["per_token", "float"]  # max_drop only: what a layer may
    # become when the metric needs it, tried in this order. per_token: dynamic per-tensor Linears switch to
    # per-token activations (still int8), the fewest that fit, ranked by their measured error per token
    # (quant/recipe_choice.py); float: the most sensitive layers go back to float (quant/fallback.py)

    @model_validator(mode="after")
    def _check_fallback(self) -> "QuantConfig":
        if not self.fallback or len(set(self.fallback)) != len(self.fallback):
            raise ValueError(f"fallback={self.fallback} must list per_token and/or float once each, in the order "
                             "to try them (default [per_token, float])")
        return self

    @model_validator(mode="after")
    def _check_awq(self) -> "QuantConfig":
        if self.awq and (self.smooth is not None or self.activations is not None
                         or any(r.activations for r in self.overrides)):
            raise ValueError("awq scales weights for weight-only quantization; set activations: null (and no "
                             "activations in overrides, no smooth), or use smooth for quantized activations")
        return self

    @model_validator(mode="after")
    def _check_smooth(self) -> "QuantConfig":
        if isinstance(self.smooth, float) and not 0 < self.smooth < 1:
            raise ValueError(f"smooth={self.smooth} is not a migration strength; use a number in (0, 1) "
                             "(0.5 is the paper's default, 0.75-0.9 for strong outliers) or smooth: auto")
        if self.smooth is not None and self.activations is None and not any(r.activations for r in self.overrides):
            raise ValueError("smooth moves activation outliers into the weights, so it needs quantized "
                             "activations; set activations (static or dynamic) or remove smooth")
        return self

    @model_validator(mode="after")
    def _no_trained_formats(self) -> "QuantConfig":
        # Binary / ternary weights and binary activations lose too much without training to be a PTQ
        # result; the `qat` method trains them (and converts to the same quantized layers).
        rules = [("weights", self.weights, self.activations)]
        rules += [(f"overrides[{i}]", r.weights, r.activations) for i, r in enumerate(self.overrides)]
        for where, wq, aq in rules:
            if wq is not None and wq.stochastic:
                raise ValueError(f"{where}: stochastic binarization samples the weights during training and has "
                                 "nothing to sample without it: use the qat method (a `qat:` stage, or "
                                 "st.qat(model, st.QATConfig(weights={'format': 'binary', 'stochastic': True}), "
                                 "data=...)), or remove stochastic")
            if wq is not None and wq.format == WeightFormat.LOG2:
                if self.rounding != Rounding.NEAREST or self.awq:
                    raise ValueError(f"{where}: log2 weights are rounded to the nearest power of two; gptq and awq "
                                     "search an integer grid: set rounding: nearest and awq: false")
                if aq is not None and aq.dynamic:
                    raise ValueError(f"{where}: dynamic activations run an integer matmul with linear int8 weights; "
                                     "log2 weights need static activations (or activations: null)")
            if wq is not None and wq.scale == WeightScale.POW2 and (self.rounding != Rounding.NEAREST or self.awq):
                raise ValueError(f"{where}: scale: pow2 is applied to nearest rounding; set rounding: nearest and "
                                 "awq: false, or remove scale: pow2")
            if wq is not None and wq.format not in (WeightFormat.INT, WeightFormat.LOG2):
                raise ValueError(f"{where}: format {wq.format} weights need training: use the qat method "
                                 f"(st.qat(model, st.QATConfig(...), data=...), or a `qat:` recipe stage)")
            if aq is not None and aq.format != ActivationFormat.INT:
                raise ValueError(f"{where}: binary activations need training: use the qat method "
                                 f"(st.qat(model, st.QATConfig(...), data=...), or a `qat:` recipe stage)")
        return self

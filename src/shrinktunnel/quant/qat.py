"""Quantization-aware training (the `qat` method): PTQ first, then fine-tuning through fake
quantization, then conversion to exactly the quantized layers PTQ builds.

1. `prepare`: run PTQ (`quantize_model`) on a copy to plan the layers and calibrate the activation
   ranges, then replace each layer it quantized by a `FakeQuantLayer` that keeps a float (latent)
   weight and simulates the quantized layer in its forward, bit for bit.
2. Train: `st.qat` runs the shared loop (core/train.fit); a user's own loop trains the prepared model
   like any model (call `constrain(model)` after each optimiser step for BinaryConnect's latent clip
   and positive step sizes).
3. `convert`: each `FakeQuantLayer` becomes the `QuantizedLayer` PTQ would build for the same weights
   and scales. With `scales: observed` the weight scales are re-read from the weights, as PTQ does, so
   the artifact equals PTQ's on the trained weights with the calibrated activation ranges.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..core import data as D
from ..core.config import Config, StrEnum
from ..core.history import append_stage, get_record, record_inputs
from ..core.registry import Context, register_method
from ..core.select import matches, set_submodule
from ..core.train import FitConfig, fit
from ..errors import ConfigError, DataError, ModelError
from . import binary as B
from . import log2 as L
from .gradients import grad_quant
from .config import ActivationFormat, ActivationQuant, LayerOverride, QuantConfig, WeightFormat, WeightQuant
from .fake_quant import fake_quant_act, fake_quant_weight, lsq_grad_scale
from .modules import QuantizedLayer, apply_layer
from .ops import quantize_weight, weight_qparams
from .ptq import quantize_model, replay_quantize
from ..core.layers import canonicalize, visible_modules
from .modules import SpecAttributes
from ..core.tied import TIED_CHILD, TiedEmbedding

__all__ = ["QATConfig", "ScaleMode", "QATLoss", "GradientFormat", "inq_freeze", "FakeQuantLayer", "prepare", "convert", "constrain", "qat_model"]

_EPS = torch.finfo(torch.float32).tiny
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
_STATE = "_shrinktunnel_qat"  # the prepared model's plain-dict attribute: config and PTQ's replay extras


class ScaleMode(StrEnum):
    OBSERVED = "observed"  # weight scales re-read from the weights every step (as PTQ computes them),
    # activation ranges fixed by the calibration: the artifact is PTQ's for the trained weights
    LSQ = "lsq"  # step sizes learned by gradient descent (Esser et al. 2020), initialised from PTQ's


class GradientFormat(StrEnum):
    FLOAT = "float"  # float32 gradients, as in ordinary training
    INT8 = "int8"  # per-tensor int8 with stochastic rounding (Banner et al. 2018; quant/gradients.py)
    FP8_E5M2 = "fp8_e5m2"  # per-tensor-scaled FP8 e5m2 with stochastic rounding (Wang et al. 2018)


class QATLoss(StrEnum):
    CROSS_ENTROPY = "cross_entropy"  # against the batch's labels
    MSE_TO_FLOAT = "mse_to_float"  # mean squared error to the float model's outputs: needs no labels


class QATConfig(Config):
    """Quantization-aware training: the formats of QuantConfig, trained for a while, then converted."""

    weights: WeightQuant = WeightQuant()  # int 2-8 bits, or format: ternary / binary
    activations: ActivationQuant | None = ActivationQuant()  # None: weight-only; format: binary for BNN inputs
    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d and Conv2d among them are trained quantized
    skip: list[str] = []  # glob patterns of layers kept in floating point (and trained in float)
    overrides: list[LayerOverride] = []  # per-layer exceptions, last match wins; e.g. the first and last
    # layers at int8 around binary ones, as BinaryConnect / XNOR-Net keep them
    fuse_relu: bool = True  # a ReLU right after a layer joins its output quantizer, as in PTQ
    calibration_batches: int = Field(default=16, ge=1)  # batches that set the initial activation ranges:
    # 16 x 64 images pin a min-max range; training data is usually far larger than calibration needs
    scales: ScaleMode = ScaleMode.OBSERVED  # observed: PTQ's scales, recomputed; lsq: learned step sizes
    steps: int | None = Field(default=None, ge=1)  # optimiser steps; None: `epochs` passes over the data
    epochs: float = Field(default=1.0, gt=0)  # one epoch recovers most of the loss of 4-bit or binary weights
    lr: float = Field(default=1e-4, gt=0)  # Adam on an already trained model: 10x below a from-scratch 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    weight_decay: float = Field(default=0.0, ge=0)  # 0: decay would pull latent weights across the grid
    grad_clip: float | None = Field(default=None, gt=0)  # max global gradient norm; None: no clipping
    loss: QATLoss = QATLoss.CROSS_ENTROPY  # cross_entropy: labelled (inputs, target) batches
    clip_latent: bool = True  # binary / ternary: keep latent weights in [-1, 1] after each step
    # (BinaryConnect): beyond it the clipped-identity gradient is zero and a weight could never return
    gradients: GradientFormat = GradientFormat.FLOAT  # int8 / fp8_e5m2: each quantized layer's output
    # gradient and weight gradient on an 8-bit grid, one scale per tensor (8-bit training; float: as usual)
    gradient_rounding: Literal["stochastic", "nearest"] = "stochastic"  # stochastic: unbiased (E[q] = g),
    # what keeps 8-bit gradients training; nearest: the deterministic baseline, which loses small gradients
    inq: list[float] | None = None  # log2 weights: INQ's schedule (Zhou et al. 2017), the fraction of each
    # layer's weights frozen on powers of two at the start of each equal share of the steps, largest
    # first, the rest trained in float; e.g. [0.5, 0.75, 0.875, 1.0]. None: every weight log2 from step 1

    @model_validator(mode="after")
    def _check(self) -> "QATConfig":
        for where, aq in [("activations", self.activations),
                          *((f"overrides[{i}].activations", r.activations) for i, r in enumerate(self.overrides))]:
            if aq is not None and aq.dynamic:
                raise ValueError(f"{where}: dynamic activations have no range to train; quantize them after QAT "
                                 "(QAT with activations: null, then a quantize stage with dynamic: true)")
        if self.optimizer.lower() not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not known; use adam, adamw or sgd")
        formats = [self.weights, *(r.weights for r in self.overrides if r.weights is not None)]
        if self.scales == ScaleMode.LSQ and any(w.format == WeightFormat.LOG2 or w.scale == "pow2" for w in formats):
            raise ValueError("scales: lsq learns free step sizes, which are not powers of two; log2 weights and "
                             "scale: pow2 need scales: observed")
        if self.inq is not None:
            f = self.inq
            if not f or f[-1] != 1.0 or any(not a < b for a, b in zip([0.0, *f], f)):
                raise ValueError(f"inq={f} must be increasing fractions in (0, 1] ending at 1.0, e.g. "
                                 "[0.5, 0.75, 0.875, 1.0] (INQ's schedule)")
            if not any(w.format == WeightFormat.LOG2 for w in formats):
                raise ValueError("inq quantizes weights incrementally onto powers of two; set weights: "
                                 "{format: log2} (or remove inq)")
        return self


# -- activation fake quantizers -----------------------------------------------------------------

class ActFakeQuant(nn.Module):
    """Per-tensor integer activation quantizer; the scale is a parameter under LSQ, else a buffer."""

    def __init__(self, spec: dict[str, Any], learn: bool) -> None:
        super().__init__()
        scale = torch.tensor(float(spec["scale"]), dtype=torch.float32)
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.zero_point, self.qmin, self.qmax, self.dtype = (
            int(spec["zero_point"]), int(spec["qmin"]), int(spec["qmax"]), spec["dtype"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), self.qmax)  # N: features per example
        return fake_quant_act(x, self.scale, self.zero_point, self.qmin, self.qmax, _DTYPES[self.dtype], g)

    def to_spec(self, name: str) -> dict[str, Any]:
        scale = float(self.scale)
        if not (scale > 0 and scale < float("inf")):
            raise DataError(f"qat: the activation step of {name} became {scale}; lower lr, or use scales: observed")
        return {"scale": scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax, "dtype": self.dtype}


class BinaryActFakeQuant(nn.Module):
    """Binary activation, offset +- scale, both learned (offset fixed at 0 when symmetric)."""

    def __init__(self, symmetric: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        if symmetric:
            self.register_buffer("offset", torch.tensor(0.0))
        else:
            self.offset = nn.Parameter(torch.tensor(0.0))
        self.enabled = True  # False while prepare measures the float inputs that set the initial levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return B.binarize_activation(x, self.offset, self.scale, ste=True)

    def to_spec(self, name: str) -> dict[str, Any]:
        scale, offset = float(self.scale), float(self.offset)
        if not (0 < scale < float("inf")) or offset != offset or abs(offset) == float("inf"):
            raise DataError(f"qat: the binary activation of {name} became scale {scale}, offset {offset}; lower lr")
        return B.BinaryActivation(scale, offset).to_dict()


# -- the training-time layer --------------------------------------------------------------------

class FakeQuantLayer(SpecAttributes, nn.Module):
    """A Linear / Conv1d / Conv2d with a float latent weight whose forward is, bit for bit, the
    forward of the `QuantizedLayer` it converts to. `spec`: the quantized layer's spec (PTQ's)."""

    def __init__(self, module: nn.Module, spec: dict[str, Any], learn: bool, binary_input: bool = False,
                 symmetric_input: bool = False) -> None:
        super().__init__()
        self._spec = spec
        self.weight = nn.Parameter(module.weight.detach().float().clone())
        bias = getattr(module, "bias", None)  # an Embedding (weight-only) has none
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        meta = spec["weight"]
        self.format = meta.get("format", "int")
        self.stochastic = False  # stochastic BinaryConnect while training (set by prepare)
        self.gradients: str | None = None  # int8 / fp8_e5m2: 8-bit gradients in the backward (prepare)
        self.gradient_stochastic = True
        self.learn_weight_scale = learn and self.format == "int"
        if self.learn_weight_scale:
            scale, zero_point = self._observed_qparams()
            # Per tensor: one step, stored repeated per channel in the artifact.
            init = scale[:1].clone() if meta["granularity"] == "per_tensor" else scale.clone()
            self.weight_scale = nn.Parameter(init)
            self.register_buffer("weight_zero_point", zero_point)
        self.input_quant: nn.Module | None = None
        self.output_quant: nn.Module | None = None
        if binary_input:
            self.input_quant = BinaryActFakeQuant(symmetric_input)
        elif spec.get("input") is not None:
            self.input_quant = ActFakeQuant(spec["input"], learn)
        if spec.get("output") is not None and not binary_input:
            self.output_quant = ActFakeQuant(spec["output"], learn)

    def _observed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._spec["weight"]
        if self.format == "log2":  # 2^e_max per channel; fixed once INQ has started
            if hasattr(self, "inq_scale"):
                return self.inq_scale, torch.zeros(self.inq_scale.shape, dtype=torch.int32)
            return L.log2_qparams(self.weight.detach(), m["granularity"])
        gs = m["group_size"] if m["granularity"] == "per_group" else None
        scale, zero_point = weight_qparams(self.weight.detach(), m["qmin"], m["qmax"], m["symmetric"], m["granularity"], gs)
        if m.get("scale") == "pow2":
            scale = L.pow2_scales(self.weight.detach(), scale, zero_point, m["qmin"], m["qmax"], m["granularity"], gs)
        return scale, zero_point

    def _qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.learn_weight_scale:
            return self._observed_qparams()
        scale = self.weight_scale
        if scale.dim() == 1 and scale.numel() == 1 and self.weight_zero_point.numel() > 1:
            scale = scale.expand(self.weight_zero_point.shape)
        return scale, self.weight_zero_point

    def fake_weight(self) -> torch.Tensor:
        m = self._spec["weight"]
        if self.format == "log2":
            return L.inq_weight(self, L.fake_log2_weight(self.weight, self._observed_qparams()[0], m["bits"]))
        if self.format != "int":
            return B.fake_binary_weight(self.weight, self.format, m["granularity"], self.stochastic and self.training)
        scale, zero_point = self._qparams()
        g = 1.0
        if self.learn_weight_scale:
            g = lsq_grad_scale(self.weight.numel() // self.weight_scale.numel(), m["qmax"])  # N: weights per step
        return fake_quant_weight(self.weight, scale, zero_point, m["qmin"], m["qmax"], _DTYPES[m["dtype"]], g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = grad_quant(self.fake_weight(), self.gradients, self.gradient_stochastic)  # 8-bit weight gradient
        y = grad_quant(apply_layer(self._spec, x, w, self.bias), self.gradients, self.gradient_stochastic)
        if self._spec.get("activation") == "relu":
            y = F.relu(y)
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y

    @torch.no_grad()
    def to_quantized(self, name: str) -> QuantizedLayer:
        """The QuantizedLayer PTQ would build from this weight with these scales."""
        if not bool(torch.isfinite(self.weight).all()):
            raise DataError(f"qat: the weight of {name} holds NaN or Inf after training; lower lr (or set grad_clip)")
        spec = dict(self._spec)
        m = spec["weight"]
        spec["input"] = self.input_quant.to_spec(name) if self.input_quant is not None else None
        spec["output"] = self.output_quant.to_spec(name) if self.output_quant is not None else None
        if self.format == "log2":
            scale, zero_point = (t.detach().clone() for t in self._observed_qparams())
            q = L.quantize(self.weight, scale, m["bits"])
        elif self.format != "int":
            q, scale, zero_point = B.quantize_binary_weight(self.weight, self.format, m["granularity"])
        else:
            scale, zero_point = (t.detach().clone() for t in self._qparams())
            if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                raise DataError(f"qat: a weight step of {name} became zero, negative or non-finite; lower lr, "
                                "or use scales: observed")
            q = quantize_weight(self.weight, scale, zero_point, m["qmin"], m["qmax"], _DTYPES[m["dtype"]])
        layer = QuantizedLayer.from_spec(spec)
        layer.set_weight(q, scale.float(), zero_point)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer

    def extra_repr(self) -> str:
        m = self._spec["weight"]
        fmt = self.format if self.format != "int" else f"{m['bits']}-bit {m['dtype']}"
        return f"{self._spec['kind']}, weight={tuple(self.weight.shape)} {fmt} {m['granularity']}, " \
               f"scales={'lsq' if self.learn_weight_scale else 'observed'}"


# -- prepare / convert --------------------------------------------------------------------------

def _resolve(name: str, cfg: QATConfig) -> tuple[WeightQuant, ActivationQuant | None]:
    """The layer's formats: the defaults, then the overrides in order, last match wins, field by field
    (the rule of QuantConfig.overrides)."""
    weights, activations = cfg.weights, cfg.activations
    for rule in cfg.overrides:
        if matches(name, [rule.pattern]):
            if "weights" in rule.model_fields_set and rule.weights is not None:
                weights = rule.weights
            if "activations" in rule.model_fields_set:
                activations = rule.activations
    return weights, activations


def _ptq_config(cfg: QATConfig) -> QuantConfig:
    """The PTQ that plans and calibrates for QAT: binary / ternary weights and binary activations,
    which PTQ does not produce, stand in as int8 (their parameters are set by `prepare` instead)."""
    def w(wq: WeightQuant | None) -> WeightQuant | None:
        if wq is None or wq.format in (WeightFormat.INT, WeightFormat.LOG2):
            return wq
        return WeightQuant(granularity=wq.granularity)

    def a(aq: ActivationQuant | None) -> ActivationQuant | None:
        return aq if aq is None or aq.format == ActivationFormat.INT else ActivationQuant()

    overrides = []
    for rule in cfg.overrides:
        fields = {"pattern": rule.pattern}
        if "weights" in rule.model_fields_set:
            fields["weights"] = w(rule.weights)
        if "activations" in rule.model_fields_set:
            fields["activations"] = a(rule.activations)
        overrides.append(LayerOverride(**fields))
    return QuantConfig(weights=w(cfg.weights), activations=a(cfg.activations), layers=cfg.layers, skip=cfg.skip,
                       calibration_batches=cfg.calibration_batches, fuse_relu=cfg.fuse_relu, overrides=overrides,
                       fold_bn=False)  # QAT trains through the BatchNorms as they are


def prepare(model: nn.Module, config: QATConfig | dict | None = None, *, data: Any = None, progress: bool = True,
            ctx: Context | None = None) -> nn.Module:
    """Return a NEW model for quantization-aware training (`model` is not changed): the layers PTQ
    would quantize become `FakeQuantLayer`s, initialised from PTQ's scales (calibrated on `data`
    unless activations are null). Train it with any loop, then `convert` it."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"qat expects a torch.nn.Module, got {type(model).__name__}")
    cfg = QATConfig.parse(config)
    ctx = ctx or Context(data=D.reiterable(data), progress=progress)
    model, canonical, _ = canonicalize(model)  # the layers every method sees (core/layers.py); a no-op in a stage
    _, replay = quantize_model(model, _ptq_config(cfg), ctx)
    prepared = copy.deepcopy(model).eval()
    binary_inputs = []
    for name, spec in replay["layers"].items():
        wq, aq = _resolve(name, cfg)
        spec = copy.deepcopy(spec)
        if wq.format not in (WeightFormat.INT, WeightFormat.LOG2):  # log2: PTQ's spec already
            spec["weight"] = B.weight_meta(str(wq.format), str(wq.granularity))
        binary_input = aq is not None and aq.format == ActivationFormat.BINARY
        if binary_input:
            spec["output"] = None  # the next layer binarizes its own input
        layer = FakeQuantLayer(prepared.get_submodule(name), spec, cfg.scales == ScaleMode.LSQ, binary_input,
                               bool(aq.symmetric) if aq is not None else False)
        layer.stochastic = wq.format == WeightFormat.BINARY and wq.stochastic
        layer.gradients = None if cfg.gradients == GradientFormat.FLOAT else str(cfg.gradients)
        layer.gradient_stochastic = cfg.gradient_rounding == "stochastic"
        set_submodule(prepared, name, layer)
        if binary_input:
            binary_inputs.append(layer)
    for alias, name in replay.get("shared", {}).items():
        set_submodule(prepared, alias, prepared.get_submodule(name))
    # An Embedding tied to a trained Linear (lm_head) looks up the rows of its fake-quantized weight while
    # training, and the converted layer's integer rows after (core/tied.py): trained once, stored once.
    for emb, entry in replay.get("tied", {}).items():
        set_submodule(prepared, emb, TiedEmbedding(prepared.get_submodule(entry["layer"]), entry["padding_idx"]))
    for relu in replay.get("fused", []):
        set_submodule(prepared, relu, nn.Identity())
    if binary_inputs:
        _init_binary_inputs(prepared, binary_inputs, ctx.data, cfg.calibration_batches)
    prepared.__dict__[_STATE] = {"config": cfg.to_dict(), "fused": list(replay.get("fused", [])),
                                 "shared": dict(replay.get("shared", {})), "tied": copy.deepcopy(replay.get("tied", {})),
                                 "canonical": canonical}
    if ctx.data is not None and get_record(prepared).get("inputs") is None:
        record_inputs(prepared, next(D.batches(ctx.data)))
    return prepared


@torch.no_grad()
def _init_binary_inputs(model: nn.Module, layers: list[FakeQuantLayer], data: Any, batches: int) -> None:
    """XNOR-Net's scale K = mean |x - offset| with the offset at the input's mean (or 0, symmetric),
    measured on the float inputs (every binarization off) of the calibration batches: two passes, the
    second needs the first's mean."""
    if data is None:
        raise DataError("binary activations need data to set their initial levels: pass data=...")
    for m in layers:
        m.input_quant.enabled = False
    stats = {id(m): [0.0, 0, 0.0, 0] for m in layers}  # sum x, count, sum |x - offset|, count
    for second in (False, True):
        hooks = []
        for m in layers:
            def hook(mod, args, second=second):
                x, s = args[0].detach().float(), stats[id(mod)]
                if second:
                    s[2] += float((x - mod.input_quant.offset).abs().sum()); s[3] += x.numel()
                else:
                    s[0] += float(x.sum()); s[1] += x.numel()
            hooks.append(m.register_forward_pre_hook(hook))
        try:
            for batch in D.take(data, batches):
                D.forward(model, D.split(batch)[0])
        finally:
            for h in hooks:
                h.remove()
        for m in layers:
            s = stats[id(m)]
            if not second and isinstance(m.input_quant.offset, nn.Parameter):
                m.input_quant.offset.fill_(s[0] / max(1, s[1]))
            if second:
                m.input_quant.scale.fill_(max(s[2] / max(1, s[3]), 1e-8))
                m.input_quant.enabled = True


@torch.no_grad()
def constrain(model: nn.Module) -> None:
    """After an optimiser step: latent binary / ternary weights back into [-1, 1] (BinaryConnect, when
    the config says clip_latent) and learned steps kept positive. `st.qat` calls it every step."""
    state = model.__dict__.get(_STATE, {})
    clip = state.get("config", {}).get("clip_latent", True)
    for m in model.modules():
        if isinstance(m, FakeQuantLayer):
            if m.format != "int" and clip:
                m.weight.clamp_(-1.0, 1.0)
            if m.learn_weight_scale:
                m.weight_scale.clamp_(min=_EPS)
            L.inq_restore(m)
        if isinstance(m, (ActFakeQuant, BinaryActFakeQuant)) and isinstance(m.scale, nn.Parameter):
            m.scale.clamp_(min=1e-8)


def _convert(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ModelError("convert expects a model returned by prepare (st.prepare_qat); this one has no "
                         "fake-quantized layers to convert")
    model = copy.deepcopy(model).eval()
    layers: dict[str, Any] = {}
    done: dict[int, QuantizedLayer] = {}
    tied = state.get("tied", {})
    # named_modules meets a tied Linear's layer first under its Embedding (`wte.layer`): named for the Linear
    lead = {f"{emb}.{TIED_CHILD}": entry["layer"] for emb, entry in tied.items()}
    for name, module in list(visible_modules(model)):
        name = lead.get(name, name)
        if isinstance(module, FakeQuantLayer) and id(module) not in done:
            done[id(module)] = module.to_quantized(name)
            layers[name] = done[id(module)].spec()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in done:
            set_submodule(model, name, done[id(module)])
    del model.__dict__[_STATE]
    replay = {"layers": layers, "fused": state["fused"], "shared": state["shared"]}
    if tied:
        replay["tied"] = tied
    if state.get("canonical"):
        replay["canonical"] = state["canonical"]
    return model, replay


def convert(model: nn.Module) -> nn.Module:
    """Return a NEW model with every fake-quantized layer of a prepared (and trained) model converted
    to the integer-weight `QuantizedLayer` PTQ builds; recorded as a `qat` stage, ready for st.save."""
    state = model.__dict__.get(_STATE)
    converted, replay = _convert(model)
    append_stage(converted, "qat", state["config"], replay)
    return converted


def _loss(cfg: QATConfig, teacher: nn.Module):
    if cfg.loss == QATLoss.CROSS_ENTROPY:
        from ..core.train import classification_loss

        return classification_loss

    def mse_to_float(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = D.split(batch)
        with torch.no_grad():
            target = D.first_tensor(D.forward(teacher, inputs)).float()
        return F.mse_loss(D.first_tensor(D.forward(model, inputs)).float(), target)

    return mse_to_float


@register_method("qat", QATConfig, replay=replay_quantize, recurrent=True)
def qat_model(model: nn.Module, cfg: QATConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Quantization-aware training of a copy of `model` on the data, converted to quantized layers."""
    if ctx.data is None:
        raise DataError("qat trains on data: pass data=... (labelled (inputs, target) batches, or any batches "
                        "with loss: mse_to_float)")
    prepared = prepare(model, cfg, ctx=ctx)
    if not any(isinstance(m, FakeQuantLayer) for m in prepared.modules()):
        return _convert(prepared)
    teacher = copy.deepcopy(model).eval()
    fit_cfg = FitConfig(steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, description="QAT", progress=ctx.progress)
    after_step = constrain
    if cfg.inq:
        after_step = _inq_schedule(prepared, cfg, ctx.data)
    fit(prepared, ctx.data, fit_cfg, loss_fn=_loss(cfg, teacher), after_step=after_step)
    if cfg.inq:
        inq_freeze(prepared, 1.0)  # the last share: every weight on its power of two
    return _convert(prepared)


def inq_freeze(model: nn.Module, fraction: float) -> None:
    """INQ in your own loop: freeze `fraction` of every log2 layer's weights (largest first) on their powers
    of two, the rest train in float; call it with 1.0 before `convert_qat` (quant/log2.inq_freeze)."""
    for m in model.modules():
        if isinstance(m, FakeQuantLayer) and m.format == "log2":
            L.inq_freeze(m, fraction)


def _inq_schedule(model: nn.Module, cfg: QATConfig, data: Any):
    """INQ's steps: the first fraction frozen now, each next one after an equal share of the steps."""
    try:
        total = cfg.steps if cfg.steps is not None else max(1, round(len(data) * cfg.epochs))
    except TypeError:
        raise ConfigError("inq splits the training into equal shares of steps, and the data has no length to "
                          "count epochs by; give `steps`") from None
    shares = [f for f in cfg.inq if f < 1.0] or [1.0]
    at = {max(1, round(total * i / len(shares))): shares[i] for i in range(1, len(shares))}
    inq_freeze(model, shares[0])
    done = [0]

    def after_step(m: nn.Module) -> None:
        constrain(m)
        done[0] += 1
        if done[0] in at:
            inq_freeze(m, at[done[0]])

    return after_step

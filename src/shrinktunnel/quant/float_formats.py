"""Weights stored in a narrower floating-point format: FP16, BF16, FP8 e4m3fn and e5m2 (the `cast`
method). Activations stay float32.

FP16 and BF16 keep the weight as it is, rounded to 16 bits. FP8 has too little range for raw weights
(e4m3fn tops out at 448 with 3 mantissa bits; e5m2 at 57344 with 2), so each output channel gets a
float32 scale that maps its largest magnitude onto the format's largest finite value, as FP8 recipes
do; the artifact stores real float8 tensors (safetensors F8_E4M3 / F8_E5M2).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.config import Config, StrEnum
from ..core.registry import Context, register_method
from ..core.select import names_by_module, select_modules, set_submodule, unmatched_patterns
from ..errors import DataError
from ..core.recurrent import replay_recurrent, store_recurrent
from ..core.tied import left_alone, tie, tie_plan, tie_record
from .modules import SUPPORTED, QuantizedLayer, apply_layer
from .modules import SpecAttributes

KINDS = (*SUPPORTED, nn.Embedding)  # the layers whose weight storage `cast` changes

__all__ = ["FloatFormat", "CastConfig", "FloatWeightLayer", "cast_model", "replay_cast"]


class FloatFormat(StrEnum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FP8_E4M3 = "float8_e4m3fn"
    FP8_E5M2 = "float8_e5m2"


_SCALED = {FloatFormat.FP8_E4M3, FloatFormat.FP8_E5M2}


class CastConfig(Config):
    """Store the weights of the selected layers in a 16- or 8-bit float format."""

    format: FloatFormat = FloatFormat.FLOAT16  # float16: 10 mantissa bits, lossless for most trained nets
    layers: list[str] = ["*"]  # glob patterns over module names; Linear, Conv1d, Conv2d and Embedding are cast
    skip: list[str] = []  # glob patterns kept in float32


class FloatWeightLayer(SpecAttributes, nn.Module):
    """Linear or convolution whose weight is stored as `format` (plus a per-channel float32 scale for
    FP8) and computed in float32.

    The stored tensor is the buffer `weight` of the state dict (the artifact's name for it), read as
    `stored_weight`. The attribute `weight` answers as the replaced layer's would: the float32 weight the
    layer computes with, as QuantizedLayer's does. Model code reads it outside the forward (transformers'
    ViT casts its pixels to `projection.weight.dtype`, T5 its hidden states to `wo.weight.dtype`): a
    float16 answer would make them compute in float16 against float32 biases and fail."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = spec
        dtype = getattr(torch, spec["format"])
        out = spec["weight_shape"][0]
        self.register_buffer("weight", torch.zeros(spec["weight_shape"], dtype=dtype))
        if spec["format"] in _SCALED:
            self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32))
        else:
            self.weight_scale = None
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if spec["bias"] else None

    @classmethod
    def from_module(cls, module: nn.Module, fmt: FloatFormat) -> "FloatWeightLayer":
        spec = {**QuantizedLayer.geometry(module), "format": fmt.value}
        layer = cls(spec)
        w = module.weight.detach().float()
        if not torch.isfinite(w).all():
            raise DataError(f"cast: a weight holds NaN or Inf; fix the model or skip the layer")
        if layer.weight_scale is not None:
            fmax = torch.finfo(layer.stored_weight.dtype).max
            amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
            layer.weight_scale.copy_(scale)
            w = w / scale.view(-1, *([1] * (w.dim() - 1)))
        layer.stored_weight.copy_(w.to(layer.stored_weight.dtype))
        if getattr(module, "bias", None) is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    def __getattr__(self, name: str) -> Any:
        if name == "weight" and "weight" in self.__dict__.get("_buffers", {}):
            return self.float_weight()
        return super().__getattr__(name)

    @property
    def stored_weight(self) -> torch.Tensor:
        """The weight as stored: `format` (float16, bfloat16, float8), scaled per channel for FP8."""
        return self._buffers["weight"]

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def num_weights(self) -> int:
        return self.stored_weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def dequantized_weight(self) -> torch.Tensor:
        return self.float_weight()

    def float_weight(self) -> torch.Tensor:
        w = self.stored_weight.float()
        if self.weight_scale is not None:
            w = w * self.weight_scale.view(-1, *([1] * (w.dim() - 1)))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_layer(self._spec, x, self.float_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self._spec['kind']}, weight={tuple(self.stored_weight.shape)} {self._spec['format']}"


def replay_cast(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    for name, spec in replay["layers"].items():
        set_submodule(model, name, FloatWeightLayer(spec))
    for alias, name in replay.get("shared", {}).items():
        set_submodule(model, alias, model.get_submodule(name))
    replay_recurrent(model, replay.get("recurrent", {}))
    return tie(model, replay.get("tied", {}))


@register_method("cast", CastConfig, replay=replay_cast)
def cast_model(model: nn.Module, cfg: CastConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Store the weights of a copy of `model` in FP16 / BF16 / FP8; no data needed."""
    model = copy.deepcopy(model).eval()
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip]):
        ctx.warn(f"cast: pattern {pattern!r} matches no module")
    names_of = names_by_module(model)
    layers, shared, tied = {}, {}, {}
    # Tied weights (an Embedding and its lm_head, Embeddings sharing a table) are cast once (core/tied.py).
    together, refused = tie_plan(model, cfg.layers, cfg.skip)
    following = {n for names in together.values() for n in names}
    for name, module in select_modules(model, KINDS, cfg.layers, cfg.skip):
        why = left_alone(name, module, KINDS, refused, following, "kept in float32")
        if why is not None:  # "": an Embedding cast with the layer it is tied to
            if why:
                ctx.skip(name, why)
            continue
        followers = together.get(name, [])
        layer = FloatWeightLayer.from_module(module, cfg.format)
        embedding = isinstance(module, nn.Embedding)  # Embeddings sharing its table: further names of its layer
        for alias in names_of[id(module)] + (followers if embedding else []):
            set_submodule(model, alias, layer)
            if alias != name:
                shared[alias] = name
        layers[name] = layer.spec()
        if not embedding:  # Embeddings tied to this Linear read its layer's rows
            tied.update({e: tie_record(model, e, name) for e in followers})
    tie(model, tied)
    recurrent = store_recurrent(model, cfg.layers, cfg.skip, cfg.format.value, "cast", ctx)  # LSTM / GRU: weight-only
    if not layers and not recurrent:
        ctx.warn("cast: no Linear/Conv1d/Conv2d/Embedding layer selected; the model is unchanged")
    replay: dict[str, Any] = {"layers": layers, "shared": shared}
    if recurrent:
        replay["recurrent"] = recurrent
    if tied:
        replay["tied"] = tied
    return model, replay


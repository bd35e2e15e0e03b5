"""Quantized layers: integer weights with per-channel scales, optional activation fake-quant.

A `QuantizedLayer` replaces one Linear / Conv1d / Conv2d. It stores the weight as integers
(`qweight`, the artifact's payload) and computes in float with the dequantized weight, which is
exactly what ONNX Runtime's QDQ graph computes before it fuses the pattern into integer kernels.
Everything needed to rebuild it (shapes, conv geometry, activation scales) is in `spec()`, a JSON-ready
dict; `from_spec(spec)` builds an empty layer of the right shapes that `load_state_dict` then fills.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops import dequantize_weight, fake_quant_activation

__all__ = ["QuantizedLayer", "ActQuant", "SUPPORTED"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_KIND = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}


class ActQuant:
    """Per-tensor activation quantization parameters (plain Python numbers: they are constants of
    the exported graph and JSON numbers in the manifest)."""

    __slots__ = ("scale", "zero_point", "qmin", "qmax", "dtype")

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, dtype: str) -> None:
        self.scale, self.zero_point, self.qmin, self.qmax, self.dtype = (
            float(scale), int(zero_point), int(qmin), int(qmax), dtype
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activation(x, self.scale, self.zero_point, self.qmin, self.qmax, _DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ActQuant | None":
        return None if d is None else cls(**d)


class QuantizedLayer(nn.Module):
    """Linear or convolution with integer weights. Buffers: `qweight` (weight shape, int8),
    `weight_scale` and `weight_zero_point` (out_channels,); parameter `bias` (float32) if any."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = spec
        w = spec["weight"]
        dtype = _DTYPES[w["dtype"]]
        self.register_buffer("qweight", torch.zeros(spec["weight_shape"], dtype=dtype))
        out = spec["weight_shape"][0]
        self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if spec["bias"] else None
        self.input_quant = ActQuant.from_dict(spec.get("input"))
        self.output_quant = ActQuant.from_dict(spec.get("output"))

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def geometry(module: nn.Module) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "kind": _KIND[type(module)],
            "weight_shape": list(module.weight.shape),
            "bias": module.bias is not None,
        }
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            pad = module.padding
            spec.update(
                stride=list(module.stride),
                padding=pad if isinstance(pad, str) else list(pad),
                dilation=list(module.dilation),
                groups=module.groups,
                padding_mode=module.padding_mode,
            )
            if module.padding_mode != "zeros":
                # Non-zero padding is applied by F.pad before a conv without padding, as torch does.
                spec["explicit_padding"] = list(module._reversed_padding_repeated_twice)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "QuantizedLayer":
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        spec = dict(self._spec)
        spec["input"] = self.input_quant.to_dict() if self.input_quant else None
        spec["output"] = self.output_quant.to_dict() if self.output_quant else None
        return spec

    @property
    def kind(self) -> str:
        return self._spec["kind"]

    @property
    def activation(self) -> str | None:
        return self._spec.get("activation")

    def num_weights(self) -> int:
        return self.qweight.numel() + (self.bias.numel() if self.bias is not None else 0)

    # -- compute ------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        w = self._spec["weight"]
        return dequantize_weight(self.qweight, self.weight_scale, self.weight_zero_point, w["qmin"], w["qmax"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        w = self.dequantized_weight()
        s = self._spec
        if s["kind"] == "linear":
            y = F.linear(x, w, self.bias)
        else:
            conv = F.conv2d if s["kind"] == "conv2d" else F.conv1d
            padding = s["padding"]
            if s.get("padding_mode", "zeros") != "zeros":
                x = F.pad(x, s["explicit_padding"], mode=s["padding_mode"])
                padding = 0
            y = conv(x, w, self.bias, s["stride"], padding, s["dilation"], s["groups"])
        if s.get("activation") == "relu":
            y = F.relu(y)
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y

    def extra_repr(self) -> str:
        w = self._spec["weight"]
        act = self._spec.get("activation")
        return (
            f"{self.kind}, weight={tuple(self.qweight.shape)} {w['dtype']}"
            + (f", in_q=({self.input_quant.scale:.4g}, {self.input_quant.zero_point})" if self.input_quant else "")
            + (f", out_q=({self.output_quant.scale:.4g}, {self.output_quant.zero_point})" if self.output_quant else "")
            + (f", fused={act}" if act else "")
        )

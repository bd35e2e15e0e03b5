"""Quantization arithmetic, written once and used by simulation, conversion and export.

Simulation calls the `quantized_decomposed` operators of PyTorch because the ONNX exporter translates
them to QuantizeLinear / DequantizeLinear nodes with exactly the scales and zero points given:
simulated and exported models then compute the same thing, and ONNX Runtime sees the QDQ pattern it
fuses into integer kernels.
"""

from __future__ import annotations

import torch

import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

__all__ = [
    "qrange",
    "symmetric_scale",
    "affine_qparams",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant_activation",
]

_QD = torch.ops.quantized_decomposed
_EPS = torch.finfo(torch.float32).tiny  # a scale must never be zero


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a `bits`-wide type; `narrow` drops the most negative value (symmetric)."""
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, (1 << bits) - 1


def storage_dtype(bits: int, signed: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    raise NotImplementedError(f"{bits}-bit storage")  # issue 3 widens this


def symmetric_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scale that maps [-amax, amax] onto [-qmax, qmax]; an all-zero channel gets scale 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp_min(_EPS)


def affine_qparams(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) of a per-tensor range. The range always contains 0, so zero (padding,
    ReLU output) is exactly representable."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi)
        half = qmax if qmin < 0 else (qmax - qmin) / 2
        scale = amax / half if amax > 0 else 1.0
        # Signed symmetric: zero point 0. Unsigned symmetric: the middle of the range.
        zero_point = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zero_point = int(round(qmin - lo / scale))
        zero_point = max(qmin, min(qmax, zero_point))
    # float32 is what the runtime stores: round once here so every consumer sees the same scale.
    return float(torch.tensor(max(scale, _EPS), dtype=torch.float32)), zero_point


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Per-output-channel (axis 0) quantization of a weight: round to nearest even, then clamp."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w.float() / scale.view(shape)) + zero_point.view(shape)
    return q.clamp(qmin, qmax).to(dtype)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Inverse of `quantize_weight`, as the exporter's DequantizeLinear (axis 0)."""
    return _QD.dequantize_per_channel(q, scale, zero_point, 0, qmin, qmax, q.dtype)


def fake_quant_activation(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Quantize then dequantize a tensor per-tensor; exports as a QuantizeLinear/DequantizeLinear pair."""
    q = _QD.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    return _QD.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)

"""Quantization arithmetic, written once and used by simulation, conversion and export.

Simulation calls the `quantized_decomposed` operators of PyTorch because the ONNX exporter translates
them to QuantizeLinear / DequantizeLinear nodes with exactly the scales and zero points given:
simulated and exported models then compute the same thing, and ONNX Runtime sees the QDQ pattern it
fuses into integer kernels.
"""

from __future__ import annotations

import torch

try:  # registers torch.ops.quantized_decomposed: the ops the ONNX exporter writes as QuantizeLinear /
    # DequantizeLinear and inductor's x86 int8 passes match. torch registers them only on this import
    # (torchao's PT2E imports the same name); it is the one private torch path the package relies on,
    # kept here so a torch that moves it fails at import with the reason, not deep inside a method.
    from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the torch build
    raise ImportError(f"shrinktunnel needs torch's quantized_decomposed operators, which torch {torch.__version__} "
                      "does not register at torch.ao.quantization.fx._decomposed; install torch==2.13.0 "
                      "(the version this release is tested with)") from exc

__all__ = [
    "lookup_dequantized",
    "qrange",
    "weight_qrange",
    "symmetric_scale",
    "affine_qparams",
    "affine_qparams_tensor",
    "weight_groups",
    "weight_qparams",
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


def weight_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-wide weight. Symmetric: signed and narrow, [-(2^(b-1) - 1), 2^(b-1) - 1],
    so that -w is representable for every w. Asymmetric: unsigned, [0, 2^b - 1], with a zero point."""
    return qrange(bits, signed=True, narrow=True) if symmetric else qrange(bits, signed=False)


def symmetric_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scale that maps [-amax, amax] onto [-qmax, qmax]; an all-zero channel gets scale 1."""
    amax = amax.float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp_min(_EPS)


def affine_qparams_tensor(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) of each range [lo, hi] (tensors of one shape). Each range is
    first widened to contain 0, so zero is exactly representable (the zero point is an integer in
    [qmin, qmax]); an empty range (all zero) gets scale 1. Computed in float64, rounded to float32 once."""
    lo = lo.double().clamp(max=0.0)
    hi = hi.double().clamp(min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        half = qmax if qmin < 0 else (qmax - qmin) / 2
        scale = torch.where(amax > 0, amax / half, torch.ones_like(amax))
        # Signed symmetric: zero point 0. Unsigned symmetric: the middle of the range.
        zero_point = torch.full_like(amax, 0 if qmin < 0 else (qmin + qmax + 1) // 2)
    else:
        span = hi - lo
        scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
        zero_point = torch.round(qmin - lo / scale).clamp(qmin, qmax)  # round half to even
    # float32 is what the runtime stores: round once here so every consumer sees the same scale.
    return scale.clamp_min(_EPS).float(), zero_point.to(torch.int32)


def affine_qparams(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) of a per-tensor range, as Python numbers (`affine_qparams_tensor` of one
    range). The range always contains 0, so zero (padding, ReLU output) is exactly representable."""
    scale, zero_point = affine_qparams_tensor(
        torch.tensor(float(lo), dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64), qmin, qmax, symmetric
    )
    return float(scale), int(zero_point)


def weight_groups(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """View of a weight as (out, n_groups, group_size): everything but the output axis (Linear:
    in_features; Conv: in_channels/groups x kernel, row-major) flattened and cut into consecutive groups;
    one group per output channel when `group_size` is None. The size must divide that dimension."""
    w2 = w.reshape(w.shape[0], -1)
    k = w2.shape[1]
    size = k if group_size is None else group_size
    if size < 1 or k % size:
        raise ValueError(f"group_size {size} does not divide the input dimension {k}")
    return w2.reshape(w.shape[0], k // size, size)


def weight_qparams(
    w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, granularity: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) of a weight: shape (out,) per tensor or per channel (a per
    tensor scale repeated), (out, n_groups) per group.

    Symmetric: scale = max|w| / qmax, zero point 0. Asymmetric: the range [min w, max w], widened to
    contain 0, mapped onto [qmin, qmax] (`affine_qparams_tensor`). An all-zero channel or group gets
    scale 1 and a zero point in range.
    """
    w = w.detach().float()
    per_group = granularity == "per_group"
    g = weight_groups(w, group_size if per_group else None)  # (out, G, size)
    if granularity == "per_tensor":
        lo, hi = w.amin().expand(w.shape[0], 1), w.amax().expand(w.shape[0], 1)
    else:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
    if symmetric:
        scale = symmetric_scale(torch.maximum(-lo, hi), qmax)  # = max|w|, exactly
        zero_point = torch.zeros(scale.shape, dtype=torch.int32)
    else:
        scale, zero_point = affine_qparams_tensor(lo, hi, qmin, qmax)
    if not per_group:
        scale, zero_point = scale[:, 0].contiguous(), zero_point[:, 0].contiguous()
    return scale, zero_point


def _group_shape(w_shape: torch.Size, scale: torch.Tensor) -> tuple[int, int, int]:
    out, groups = scale.shape
    return out, groups, int(torch.Size(w_shape[1:]).numel()) // groups


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Quantize a weight: round(w / scale) + zero_point (round half to even), clamped to [qmin, qmax].
    `scale` and `zero_point` of shape (out,) apply per output channel (axis 0); of shape
    (out, n_groups) per group of the flattened input dimension (`weight_groups`)."""
    if scale.dim() == 2:
        shape = _group_shape(w.shape, scale)
        q = torch.round(w.float().reshape(shape) / scale.unsqueeze(2)) + zero_point.unsqueeze(2)
        return q.clamp(qmin, qmax).to(dtype).reshape(w.shape)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w.float() / scale.view(shape)) + zero_point.view(shape)
    return q.clamp(qmin, qmax).to(dtype)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Inverse of `quantize_weight`: (q - zero_point) * scale, the integer difference exact and one
    float32 rounding. Per channel it is the exporter's DequantizeLinear (axis 0); per group the same
    arithmetic broadcast over each group."""
    if scale.dim() == 2:
        shape = _group_shape(q.shape, scale)
        diff = q.reshape(shape).to(torch.int32) - zero_point.unsqueeze(2)
        return (diff * scale.unsqueeze(2)).reshape(q.shape)
    return _QD.dequantize_per_channel(q, scale, zero_point, 0, qmin, qmax, q.dtype)


def lookup_dequantized(
    index: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """The rows `index` of the dequantized table, i.e. `dequantize_weight(q, ...)[index]`, bit for bit,
    but gathering the integer rows and their scales first: only the rows looked up are dequantized
    (in ONNX: Gather on int8, then Cast and Mul, and Sub when `zero_point` is given; None means all
    zero, as for symmetric signed weights), not the whole table on every call."""
    rows = q[index].to(torch.int32)
    if scale.dim() == 2:  # per group: (..., n_groups, group) rows, one scale per group
        grouped = rows.reshape(*rows.shape[:-1], scale.shape[1], -1)
        diff = grouped if zero_point is None else grouped - zero_point[index].to(torch.int32).unsqueeze(-1)
        return (diff * scale[index].unsqueeze(-1)).reshape(rows.shape)
    diff = rows if zero_point is None else rows - zero_point[index].to(torch.int32).unsqueeze(-1)
    return diff * scale[index].unsqueeze(-1)


def fake_quant_activation(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Quantize then dequantize a tensor per-tensor; exports as a QuantizeLinear/DequantizeLinear pair."""
    q = _QD.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    return _QD.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)

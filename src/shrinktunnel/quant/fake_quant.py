"""Autograd functions of quantization-aware training: fake quantization with the straight-through
estimator (STE), learned step sizes (LSQ), and the sign / ternary functions of binary networks.

Every forward computes exactly what the converted layer computes (the same `ops` functions, on the
same float32 values), so a trained fake-quant model and the quantized model it converts to give
bit-identical outputs; only the backward passes are estimators:

- STE (Bengio et al. 2013), as PyTorch's FakeQuantize: d out / d x = 1 where the rounded value
  round(x / s) + z lies in [qmin, qmax], 0 where it is clamped.
- LSQ (Esser et al. 2020, "Learned Step Size Quantization", eq. 3 and 5): with u = v / s, inside means
  qmin <= u + z <= qmax (before rounding, as the paper writes it: the two masks differ only within
  half a step of the ends); there d out / d v = 1 and d out / d s = (round(u) + z - z) - u = round(u) - u;
  below, 0 and (qmin - z); above, 0 and (qmax - z). The step's gradient is summed over the values
  sharing it and multiplied by g = 1 / sqrt(N * Qp) (N: values per step, Qp = qmax).
- Binary / ternary (BinaryConnect, Courbariaux et al. 2015; BNN, Hubara et al. 2016): the forward is
  sign (or TWN's ternary); the backward is the derivative of the clipped identity max(-1, min(1, x)),
  i.e. the gradient passes where |x| <= 1 and is zero elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from .ops import dequantize_weight, quantize_weight

__all__ = [
    "fake_quant_weight",
    "fake_quant_act",
    "sign_ste",
    "ternary_ste",
    "sign_pm",
    "ternary_levels",
    "lsq_grad_scale",
]


def lsq_grad_scale(n: int, qmax: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Qp): keeps the step's updates in proportion to the
    weights' updates whatever the layer size and bit width (Esser et al. 2020, section 2.2)."""
    return 1.0 / math.sqrt(max(1, n) * max(1, qmax))


def _masks(u: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, lsq: bool):
    """(inside, below) for u = v / s: STE's on the rounded value, LSQ's on u + z itself."""
    v = u + zp if lsq else torch.round(u) + zp
    return (v >= qmin) & (v <= qmax), v < qmin


def _lsq_step_grad(g: torch.Tensor, u: torch.Tensor, zp: torch.Tensor, inside, below, qmin: int, qmax: int):
    """Per-value LSQ derivative of the fake-quantized value by the step, times the incoming gradient."""
    d = torch.where(inside, torch.round(u) - u, torch.where(below, qmin - zp, qmax - zp).to(u.dtype))
    return g * d


class _FakeQuantWeight(Function):
    """w -> dequantize(quantize(w)) per channel or per group; STE for w, LSQ for the scale when it
    requires grad. `scale` / `zero_point`: (out,) or (out, n_groups), as `ops.quantize_weight`."""

    @staticmethod
    def forward(ctx, w, scale, zero_point, qmin, qmax, dtype, grad_scale):
        s = scale.detach()
        q = quantize_weight(w.detach(), s, zero_point, qmin, qmax, dtype)
        ctx.save_for_backward(w.detach(), s, zero_point)
        ctx.qrange, ctx.grad_scale = (qmin, qmax), grad_scale
        return dequantize_weight(q, s, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        w, s, zp = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        # Everything viewed as (out, n_groups, group): the arithmetic of ops.quantize_weight.
        groups = s.shape[1] if s.dim() == 2 else 1
        shape = (w.shape[0], groups, -1)
        s3, z3 = s.reshape(w.shape[0], groups, 1), zp.reshape(w.shape[0], groups, 1).float()
        u = w.float().reshape(shape) / s3
        g3 = g.reshape(shape)
        lsq = ctx.needs_input_grad[1]
        inside, below = _masks(u, z3, qmin, qmax, lsq)
        grad_w = torch.where(inside, g3, 0.0).reshape(w.shape)
        grad_s = None
        if lsq:
            d = _lsq_step_grad(g3, u, z3, inside, below, qmin, qmax)
            grad_s = (d.sum(dim=2) * ctx.grad_scale).reshape(s.shape)
        return grad_w, grad_s, None, None, None, None, None


class _FakeQuantAct(Function):
    """Per-tensor activation fake quantization, exactly `ops.fake_quant_activation` (x * (1 / s),
    rounded half to even, clamped; the decomposed ops' expressions, written out so that the STE mask
    comes from the same pass); STE for x, LSQ for a 0-d `scale` that requires grad."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, dtype, grad_scale):
        s = float(scale)  # the float32 value as a Python number: what the converted layer's ActQuant holds
        lsq = ctx.needs_input_grad[1]
        # torch.ops.quantized_decomposed.quantize_per_tensor, then dequantize_per_tensor (the cast to
        # the integer dtype and back is exact for values clamped into its range):
        r = torch.round(x.detach() * (1.0 / s)) + zero_point
        out = (torch.clamp(r, qmin, qmax) - zero_point) * s
        if lsq:
            ctx.save_for_backward(x.detach())
        else:
            ctx.save_for_backward((r >= qmin) & (r <= qmax))  # STE: only the mask is needed, 1 byte a value
        ctx.params = (s, zero_point, qmin, qmax, grad_scale, lsq)
        return out

    @staticmethod
    def backward(ctx, g):
        (saved,) = ctx.saved_tensors
        s, zp, qmin, qmax, grad_scale, lsq = ctx.params
        if not lsq:
            return torch.where(saved, g, 0.0), None, None, None, None, None, None
        u = saved * (1.0 / s)
        z = torch.tensor(float(zp))
        inside, below = _masks(u, z, qmin, qmax, True)
        d = _lsq_step_grad(g, u, z, inside, below, qmin, qmax)
        grad_s = (d.sum() * grad_scale).reshape(()).to(torch.float32)
        return torch.where(inside, g, 0.0), grad_s, None, None, None, None, None


def fake_quant_weight(w, scale, zero_point, qmin: int, qmax: int, dtype: torch.dtype, grad_scale: float = 1.0):
    """Fake-quantized weight (what `QuantizedLayer.dequantized_weight` returns for the same integers);
    STE gradient to `w`; LSQ gradient (times `grad_scale`) to `scale` when it requires grad."""
    return _FakeQuantWeight.apply(w, scale, zero_point, qmin, qmax, dtype, grad_scale)


def fake_quant_act(x, scale, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype, grad_scale: float = 1.0):
    """Fake-quantized activation (what `ActQuant` computes for the same scale); STE gradient to `x`;
    LSQ gradient (times `grad_scale`) to a 0-d `scale` tensor that requires grad."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32)
    return _FakeQuantAct.apply(x, scale, zero_point, qmin, qmax, dtype, grad_scale)


# -- binary and ternary ------------------------------------------------------------------------

def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1 (BNN's convention: two levels, never zero), in x's dtype."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def ternary_levels(w: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1}: sign(w) where |w| > threshold (broadcast), else +0."""
    return torch.where(w.abs() > threshold, sign_pm(w), torch.zeros_like(w))


class _SignSTE(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign_pm(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where(x.abs() <= 1, g, 0.0)  # d/dx max(-1, min(1, x))


class _TernarySTE(Function):
    @staticmethod
    def forward(ctx, x, threshold):
        ctx.save_for_backward(x)
        return ternary_levels(x, threshold)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where(x.abs() <= 1, g, 0.0), None


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} forward; the clipped identity's derivative, 1 where |x| <= 1, backward."""
    return _SignSTE.apply(x)


def ternary_ste(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`ternary_levels(x, threshold)` forward; the clipped identity's derivative backward."""
    return _TernarySTE.apply(x, threshold.detach())

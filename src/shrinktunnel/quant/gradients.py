"""Quantized gradients for 8-bit training (`qat: {gradients: int8 | fp8_e5m2}`).

The backward pass of every fake-quantized layer runs on 8-bit gradients: the gradient of the layer's
output (the error signal that reaches its input and its weight, Banner et al. 2018's "gradients of the
layer outputs") and the weight gradient (Wang et al. 2018 keep it in FP8 too) are each quantized per
tensor before they are used or reach the optimizer:

- `int8` (Banner et al. 2018, "Scalable Methods for 8-bit Training of Neural Networks"; Zhu et al. 2020,
  "Towards Unified INT8 Training"): scale s = max |g| / 127 per tensor, then stochastic rounding
  q = floor(g / s + u), u ~ U[0, 1), so E[q s] = g exactly: no gradient is systematically lost, which is
  what makes 8-bit gradients train (nearest rounding sends every |g| < s / 2 to zero, and most
  gradients are that small).
- `fp8_e5m2` (Wang et al. 2018, "Training Deep Neural Networks with 8-bit Floating Point Numbers";
  e5m2 as NVIDIA's FP8 recipe uses for gradients): a power-of-two per-tensor scale puts max |g| in
  [2^14, 2^15) (rounded up it stays below e5m2's largest value, 57344), then each value is rounded stochastically to its 2 mantissa bits: random
  bits are added below the kept mantissa of the float32 value, which is then truncated (the standard
  bit-level stochastic rounding; unbiased where e5m2 is normal; the few values that fall below e5m2's
  normal range are rounded to nearest by the cast).

`rounding: nearest` rounds deterministically instead (the baseline the papers show diverging or
stalling). The forward pass is untouched: the trained model converts exactly as without it.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

__all__ = ["GRADIENT_FORMATS", "quantize_gradient", "grad_quant"]

GRADIENT_FORMATS = ("int8", "fp8_e5m2")
_E5M2_TOP = 14  # max |g| lands in [2^14, 2^15): rounded up it is at most 2^15, below e5m2's max 57344
_DROP = 21  # float32's 23 mantissa bits less e5m2's 2


def _stochastic_int8(g: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    amax = g.abs().amax()
    if not bool(amax > 0) or not bool(torch.isfinite(amax)):
        return g
    s = amax / 127.0
    u = g / s
    if stochastic:
        u = torch.floor(u + torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device))
    else:
        u = torch.round(u)
    return u.clamp(-127, 127) * s


def _stochastic_e5m2(g: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    amax = g.abs().amax()
    if not bool(amax > 0) or not bool(torch.isfinite(amax)):
        return g
    _, e = torch.frexp(amax)  # amax in [2^(e-1), 2^e)
    shift = (_E5M2_TOP + 1 - e).to(torch.int32)  # amax * 2^shift in [2^14, 2^15)
    x = torch.ldexp(g.float(), shift)
    if stochastic:
        bits = x.view(torch.int32)
        noise = torch.randint(0, 1 << _DROP, x.shape, generator=generator, dtype=torch.int32, device=x.device)
        # Adding below the kept bits of |x| (sign-magnitude: the same add works for negative values) and
        # truncating rounds up with probability (dropped part) / 2^21: unbiased. A carry into the exponent
        # is the next binade's first value, as it should be.
        mag = (bits & 0x7FFFFFFF) + noise
        x = (((mag >> _DROP) << _DROP) | (bits & -0x80000000)).view(torch.float32)
    y = x.to(torch.float8_e5m2).float()  # exact for the truncated values in e5m2's normal range
    return torch.ldexp(y, -shift).to(g.dtype)


def quantize_gradient(g: torch.Tensor, fmt: str, stochastic: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """`g` on an 8-bit grid with one scale per tensor (`fmt`: int8 or fp8_e5m2), returned in float."""
    if fmt == "int8":
        return _stochastic_int8(g.float(), stochastic, generator).to(g.dtype)
    if fmt == "fp8_e5m2":
        return _stochastic_e5m2(g.float(), stochastic, generator)
    raise ValueError(f"gradient format {fmt!r}; use one of {GRADIENT_FORMATS}")


class _GradQuant(Function):
    @staticmethod
    def forward(ctx, x, fmt, stochastic):
        ctx.fmt, ctx.stochastic = fmt, stochastic
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return quantize_gradient(g, ctx.fmt, ctx.stochastic), None, None


def grad_quant(x: torch.Tensor, fmt: str | None, stochastic: bool = True) -> torch.Tensor:
    """Identity forward; the gradient reaching `x` is quantized (`quantize_gradient`) in the backward."""
    if fmt is None or fmt == "float" or not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _GradQuant.apply(x, fmt, stochastic)

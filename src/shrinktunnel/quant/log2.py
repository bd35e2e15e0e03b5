"""Logarithmic (power-of-two) weights and power-of-two scales.

- `format: log2` (Miyashita et al. 2016, "Convolutional Neural Networks using Logarithmic Data
  Representation"; INQ, Zhou et al. 2017): every weight is 0 or +-2^e, so a multiply becomes a shift.
  With `bits` b there are n = 2^(b-1) - 1 magnitudes per output channel (or tensor): the code q is an
  integer in [-n, n], 0 is the zero code, and q != 0 stands for sign(q) * 2^(e_max + |q| - n), where
  2^e_max is the channel's largest level (stored as the layer's float32 `weight_scale`, an exact power
  of two). 4 bits: 7 levels spanning 2^e_max down to 2^(e_max - 6), and zero.
  Rounding is to the nearest level in the linear domain (INQ's rule: between 2^k and 2^(k+1) the midpoint
  is 1.5 * 2^k; below half the smallest level, zero), which minimises the squared error; Miyashita et al.
  round in the log domain, which sends everything in [2^(k+0.5), 2^(k+1)) up. e_max is the nearest power
  of two of max |w| by the same rule (INQ's n1 = floor(log2(4 s / 3))), so the largest weights may round down.
- `scale: pow2` for integer weights (what fixed-point accelerators require; Brevitas'
  `RestrictValueType.POWER_OF_TWO`): each scale is a power of two, the one of 2^floor(log2 s) and
  2^ceil(log2 s) with the smaller squared weight error on that channel or group (ceil alone, Brevitas'
  choice, never clips but can waste half the grid).

Both keep the integer-layer layout (docs/artifact-format.md): log2 codes are stored as signed b-bit
integers (packed below 8 bits) and the layer dequantizes them with `dequantize` below.

Export (ONNX has no shift operator): up to 4 bits the levels 2^(e_max - 6) .. 2^e_max are the int8
integers +-1, 2, 4, ..., 64 times the scale 2^(e_max - 6), so the layer exports as an ordinary int8
DequantizeLinear of those integers, exactly (and fuses into ONNX Runtime's int8 kernels with quantized
activations). From 5 bits the levels span more than int8 (2^14 and beyond): the weight exports dequantized, in float.
"""

from __future__ import annotations

from typing import Any

import torch

from .ops import dequantize_weight, quantize_weight, weight_groups

__all__ = ["levels", "pow2_exponent", "log2_meta", "log2_qparams", "quantize", "dequantize", "int8_form",
           "exports_as_int8", "pow2_scales", "is_pow2", "fake_log2_weight"]

MAX_INT8_BITS = 4  # up to 4 bits the levels are int8 integers (+-64 at most) times one scale: exact QDQ export


def levels(bits: int) -> int:
    """n: the number of magnitudes of a b-bit log2 code (one sign bit, and the zero code)."""
    return (1 << (bits - 1)) - 1


def pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """The integer k of the power of two 2^k nearest to each x > 0 in the linear domain (INQ's rule):
    for x in [2^j, 2^(j+1)), k = j + 1 from 1.5 * 2^j up, else j. Exact (frexp), int32."""
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    return (exponent - (mantissa < 0.75).to(exponent.dtype)).to(torch.int32)


def _exp2(k: torch.Tensor) -> torch.Tensor:
    """2^k for integer k, exact in float32 (subnormal down to 2^-149)."""
    return torch.ldexp(torch.ones(k.shape, dtype=torch.float32), k.to(torch.int32))


def is_pow2(t: torch.Tensor) -> bool:
    """Every value a positive power of two (a normal or subnormal float32 with a zero mantissa)."""
    t = t.float()
    mantissa, _ = torch.frexp(t)
    return bool(((t > 0) & (mantissa == 0.5)).all())


def log2_meta(bits: int, granularity: str) -> dict[str, Any]:
    """The spec's `weight` entry of a log2 layer (docs/artifact-format.md)."""
    n = levels(bits)
    return {"bits": bits, "dtype": "int8", "qmin": -n, "qmax": n, "granularity": granularity, "symmetric": True,
            "group_size": None, "packed": bits < 8, "zero_point_dtype": "int32", "format": "log2"}


def log2_qparams(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (out,) float32 = 2^e_max, zero point (out,) int32 zeros). e_max: the nearest power of two
    of max |w| per channel (or tensor); an all-zero channel gets 2^0."""
    w = w.detach().float()
    a = w.abs().reshape(w.shape[0], -1)
    amax = a.amax(dim=1) if granularity != "per_tensor" else a.amax().expand(w.shape[0])
    e_max = torch.where(amax > 0, pow2_exponent(amax.clamp_min(torch.finfo(torch.float32).tiny)), 0)
    scale = _exp2(e_max)
    return scale.contiguous(), torch.zeros(scale.shape, dtype=torch.int32)


def _per_channel(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.view((-1,) + (1,) * (w.dim() - 1))


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes in [-n, n]: 0 where |w| is below half the smallest level 2^(e_max - n + 1), else
    sign(w) * (n + k), 2^(e_max + k) the level nearest to |w| (k in [1 - n, 0], clamped)."""
    n = levels(bits)
    a = w.detach().float().abs() / _per_channel(scale.float(), w)  # exact: the scale is a power of two
    k = pow2_exponent(a.clamp_min(torch.finfo(torch.float32).tiny)).clamp(1 - n, 0)
    code = torch.where(a < 2.0 ** -n, 0, n + k)  # 2^-n: half the smallest level, relative to 2^e_max
    return torch.where(w < 0, -code, code).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """sign(q) * scale * 2^(|q| - n), 0 for q = 0: every weight an exact power of two (float32)."""
    n = levels(bits)
    q32 = q.to(torch.int32)
    mag = torch.ldexp(_per_channel(scale.float(), q).expand(q.shape), (q32.abs() - n).to(torch.int32))
    return torch.where(q32 == 0, torch.zeros_like(mag), torch.where(q32 < 0, -mag, mag))


def exports_as_int8(bits: int) -> bool:
    return bits <= MAX_INT8_BITS


def int8_form(q: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 integers sign(q) * 2^(|q| - 1), 0 for q = 0; scale * 2^(1 - n)): the same weight as an
    ordinary symmetric int8 layer, exactly, for bits <= 4 (|integers| <= 64)."""
    n = levels(bits)
    q32 = q.to(torch.int32)
    mag = torch.bitwise_left_shift(torch.ones_like(q32), (q32.abs() - 1).clamp_min(0))
    lin = torch.where(q32 == 0, 0, torch.where(q32 < 0, -mag, mag))
    return lin.to(torch.int8), torch.ldexp(scale.float(), torch.full(scale.shape, 1 - n, dtype=torch.int32))


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`dequantize` computed as int8 DequantizeLinear (bits <= 4): the same values, bit for bit."""
    lin, s = int8_form(q, scale, bits)
    return dequantize_weight(lin, s, torch.zeros(s.shape, dtype=torch.int32), -127, 127)


class _FakeLog2(torch.autograd.Function):
    """w -> dequantize(quantize(w)); STE: the gradient passes where |w| <= the largest level (what a
    clamped integer fake quantizer passes), zero above it."""

    @staticmethod
    def forward(ctx, w, scale, bits):
        q = quantize(w, scale, bits)
        ctx.save_for_backward(w.detach().abs() <= _per_channel(scale, w))
        return dequantize(q, scale, bits)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, 0.0), None, None


def fake_log2_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The log2 weight the converted layer computes with (bit for bit), straight-through gradient."""
    return _FakeLog2.apply(w, scale.detach().float(), bits)


def pow2_scales(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                granularity: str, group_size: int | None) -> torch.Tensor:
    """Each scale replaced by 2^floor(log2 s) or 2^ceil(log2 s), whichever gives that channel (or
    group; per tensor: the whole weight) the smaller squared error after quantizing."""
    w = w.detach().float()
    _, e = torch.frexp(scale.float())  # s = m * 2^e, m in [0.5, 1): floor(log2 s) = e - 1
    lo = _exp2(e - 1)
    hi = torch.where(lo == scale, lo, _exp2(e))  # already a power of two: keep it
    dtype = torch.int8 if qmin < 0 else torch.uint8

    def err(s):
        d = dequantize_weight(quantize_weight(w, s, zero_point, qmin, qmax, dtype), s, zero_point, qmin, qmax) - w
        g = weight_groups(d, group_size)  # (out, G, size)
        e2 = g.pow(2).sum(dim=2)
        if granularity == "per_tensor":
            return e2.sum().expand(s.shape)
        return e2 if s.dim() == 2 else e2[:, 0]

    return torch.where(err(lo) < err(hi), lo, hi).contiguous()


def layer_weight(layer) -> torch.Tensor:
    """The float weight of a log2 `QuantizedLayer`. Up to 4 bits it is computed as the int8
    DequantizeLinear of `int8_form` (the buffers `prepare_export` leaves are what the export traces), so
    PyTorch and the exported graph multiply the same integers by the same scales; above 4 bits, `dequantize`."""
    bits = layer._format["bits"]
    if torch.compiler.is_exporting():
        if hasattr(layer, "log2_int8"):
            return dequantize_weight(layer.log2_int8, layer.log2_int8_scale, layer.log2_int8_zero_point, -127, 127)
        return layer.log2_float  # from 5 bits: the dequantized weight, a float constant
    if not is_pow2(layer.weight_scale):
        from ..errors import ArtifactError

        raise ArtifactError("a log2 layer's weight_scale holds a value that is not a power of two; the artifact "
                            "is corrupted (log2 scales are 2^e_max, docs/artifact-format.md)")
    q = layer.integer_weight()
    return dequantize_int8(q, layer.weight_scale, bits) if exports_as_int8(bits) else dequantize(q, layer.weight_scale, bits)


def prepare_export(layer) -> str | None:
    """Before tracing a log2 layer: the int8 integers and scales it exports with (bits <= 4, exact) or its
    float weight (bits > 4), as non-persistent buffers; the note for the export's warnings."""
    bits = layer._format["bits"]
    weight = layer_weight(layer)  # checks the scales
    if exports_as_int8(bits):
        lin, s = int8_form(layer.integer_weight(), layer.weight_scale, bits)
        for name, t in (("log2_int8", lin), ("log2_int8_scale", s), ("log2_int8_zero_point", torch.zeros(s.shape, dtype=torch.int32))):
            layer.register_buffer(name, t, persistent=False)
        return None  # an ordinary int8 QDQ weight, exactly
    layer.register_buffer("log2_float", weight.detach().clone(), persistent=False)
    return (f"{bits}-bit log2 weights span more than int8 (levels 2^0 .. 2^{levels(bits) - 1} times the smallest): "
            "exported dequantized, as float weights (ONNX has no shift operator); up to 4 bits they export as "
            "exact int8 QuantizeLinear/DequantizeLinear")


# -- INQ: incremental network quantization (Zhou et al. 2017) -----------------------------------

def inq_freeze(layer, fraction: float) -> int:
    """Grow a log2 training layer's frozen set to `fraction` of its weights, largest |w| first among those
    not frozen yet (INQ's pruning-inspired partition): each newly frozen weight is set to its power of
    two and stays there (no gradient; `inq_restore` puts it back after every optimiser step); the others
    train in float. The largest level 2^e_max is fixed at the first call. Returns the number now frozen."""
    w = layer.weight
    bits = layer._spec["weight"]["bits"]
    if not hasattr(layer, "inq_mask"):
        scale, _ = log2_qparams(w, layer._spec["weight"]["granularity"])
        layer.register_buffer("inq_scale", scale)
        layer.register_buffer("inq_mask", torch.zeros(w.shape, dtype=torch.bool))
    with torch.no_grad():
        target = w.numel() if fraction >= 1 else int(round(fraction * w.numel()))
        todo = target - int(layer.inq_mask.sum())
        if todo > 0:
            free = torch.where(layer.inq_mask, -1.0, w.detach().abs()).reshape(-1)
            chosen = torch.topk(free, todo, sorted=False).indices
            layer.inq_mask.view(-1)[chosen] = True
        snapped = dequantize(quantize(w.detach(), layer.inq_scale, bits), layer.inq_scale, bits)
        w.copy_(torch.where(layer.inq_mask, snapped, w.detach()))
        layer.register_buffer("inq_values", w.detach().clone())  # what inq_restore puts back
    return int(layer.inq_mask.sum())


def inq_restore(layer) -> None:
    """After an optimiser step: the frozen weights back on their powers of two (momentum may have moved them)."""
    if hasattr(layer, "inq_mask"):
        layer.weight.copy_(torch.where(layer.inq_mask, layer.inq_values, layer.weight.detach()))


def inq_weight(layer, fake: torch.Tensor) -> torch.Tensor:
    """The training forward's weight under INQ: frozen weights quantized (no gradient), the rest float."""
    if not hasattr(layer, "inq_mask"):
        return fake
    return torch.where(layer.inq_mask, fake.detach(), layer.weight)

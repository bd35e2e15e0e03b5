"""Dynamic activation quantization: the input's scale is computed from the input itself at run time,
one per token (row) by default, so no calibration data is needed and no range is ever stale.

The arithmetic is the integer one a runtime runs, not a float simulation of it:

    x (..., K) float -> per row: scale = (max(x, 0) - min(x, 0)) / 255, zp = round(-min / scale)
    q = clamp(round(x / scale) + zp, 0, 255)                          uint8 (..., K)
    acc = q @ Wq^T                                                    int32 (..., N), exact
    y = (acc - zp * colsum(Wq)) * scale * w_scale + bias               float (..., N)

`acc` comes from `shrinktunnel::matmul_integer`, a custom operator that PyTorch computes exactly (in
float64, exact for these magnitudes) and that ONNX export writes as `MatMulInteger` (uint8 x int8):
ONNX Runtime then computes the same integers with its u8s8 GEMM, about twice as fast as its float GEMM
on this AVX2 machine. Everything else is plain elementwise ONNX (ReduceMin/Max, Div, Round, Clip, Cast),
so simulated and exported outputs agree to float rounding.

Per-token scales are what keeps transformers accurate: one scale for a whole (batch x tokens x hidden)
tensor is stretched by a few outlier tokens (ONNX Runtime's `quantize_dynamic`, per tensor, loses
~0.04 cosine on all-MiniLM-L6-v2; per token loses ~0.003). `per_token: false` gives that per-tensor
variant, for comparison.
"""

from __future__ import annotations

import torch

from ..core.registry import register_onnx_translations

__all__ = ["matmul_integer", "dynamic_quantize_matmul", "quantize_dynamic_u8", "dynamic_linear", "onnx_translations"]

_TINY = torch.finfo(torch.float32).tiny
_EXACT_K = 512  # inputs per float32 slice of matmul_integer: 255 * 128 * 512 < 2^24


@torch.library.custom_op("shrinktunnel::matmul_integer", mutates_args=())
def matmul_integer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K) @ int8 (K, N) -> int32 (..., N), exactly (ONNX MatMulInteger)."""
    # In float32, in slices of _EXACT_K inputs: every partial sum of a slice is an integer of magnitude
    # <= 255 * 128 * 512 < 2^24, which float32 holds exactly whatever the order of the additions, so
    # each slice's product is exact; the slices are summed in int32. Twice the speed of one float64
    # product (which holds any K exactly, |sum| < 2^53) on CPUs whose float32 GEMM is twice as wide.
    k = a.shape[-1]
    if k <= _EXACT_K:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int32)
    af, bf = a.to(torch.float32), b.to(torch.float32)
    out = None
    for i in range(0, k, _EXACT_K):
        part = torch.matmul(af[..., i:i + _EXACT_K], bf[i:i + _EXACT_K]).to(torch.int32)
        out = part if out is None else out + part
    return out


@matmul_integer.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


@torch.library.custom_op("shrinktunnel::dynamic_quantize_matmul", mutates_args=())
def dynamic_quantize_matmul(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x float (..., K) quantized per tensor to uint8 at run time, times int8 `b` (K, N) scaled per
    column by `b_scale` (N,), plus `bias` (N,): ONNX Runtime's `com.microsoft` DynamicQuantizeMatMul,
    which runs the quantization, the u8s8 GEMM and the rescale in one kernel."""
    q, scale, zero_point = quantize_dynamic_u8(x, per_token=False)
    acc = matmul_integer(q, b) - zero_point * b.to(torch.int32).sum(dim=0)
    return acc.to(torch.float32) * (scale * b_scale) + bias


@dynamic_quantize_matmul.register_fake
def _(x, b, b_scale, bias):
    return x.new_empty((*x.shape[:-1], b.shape[-1]))


def quantize_dynamic_u8(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8, scale float32, zero_point int32) of `x`; scale and zero point per row (shape (..., 1))
    or one for the whole tensor. The range always contains 0; an all-zero row gets the tiniest scale
    and quantizes to zeros."""
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.min(), x.max()  # full reductions: aten.amin without dims does not export
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=_TINY)
    zero_point = torch.round(-lo / scale).clamp(0, 255)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255).to(torch.uint8)
    return q, scale, zero_point.to(torch.int32)


def dynamic_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: bool = True,
) -> torch.Tensor:
    """Linear with int8 weights `qweight` (out, in; zero point 0) scaled per output channel by
    `weight_scale` (out,), and the input quantized dynamically to uint8."""
    wt = qweight.t()  # (in, out): a constant the exporter folds
    if not per_token:
        zeros = torch.zeros(wt.shape[1], dtype=torch.float32, device=x.device)
        return dynamic_quantize_matmul(x, wt, weight_scale, zeros if bias is None else bias)
    q, scale, zero_point = quantize_dynamic_u8(x, per_token)
    acc = matmul_integer(q, wt)  # (..., out) int32
    # The input's zero point times each weight column's sum: what acc counted too much.
    acc = acc - zero_point * wt.to(torch.int32).sum(dim=0)
    y = acc.to(torch.float32) * scale * weight_scale
    return y if bias is None else y + bias


@register_onnx_translations
def onnx_translations() -> dict:
    """{torch op: onnxscript function}: how the exporter writes this module's custom operators."""
    from onnxscript import opset18 as op

    def _matmul_integer(a, b):
        return op.MatMulInteger(a, b)

    from onnx.defs import OpSchema
    from onnxscript import values

    # onnx ships no schema for ONNX Runtime's contrib operators and the exporter needs one: the part
    # of MatMulIntegerToFloat's that we use (A uint8 with its scale and zero point, B int8 with
    # per-column scales and no zero point, bias).
    P = OpSchema.FormalParameter
    schema = OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("a_scale", "T3"), P("b_scale", "T3"), P("a_zero_point", "T1"),
                P("b_zero_point", "T2"), P("bias", "T3")],
        outputs=[P("Y", "T3")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(int8)"], ""), ("T3", ["tensor(float)"], "")],
    )
    mmitf = values.Op(values.Opset("com.microsoft", 1), "MatMulIntegerToFloat", schema)

    def _dynamic_quantize_matmul(x, b, b_scale, bias):
        # The input is quantized by its own node, so Linears that read the same tensor (a transformer's
        # q, k and v) share it: ONNX Runtime merges identical nodes (common subexpression elimination),
        # and fuses a quantization read by one Linear alone into DynamicQuantizeMatMul. Its
        # quantize_dynamic writes the same pattern.
        q, scale, zero_point = op.DynamicQuantizeLinear(x)
        return mmitf(q, b, scale, b_scale, zero_point, None, bias)

    return {torch.ops.shrinktunnel.matmul_integer.default: _matmul_integer,
            torch.ops.shrinktunnel.dynamic_quantize_matmul.default: _dynamic_quantize_matmul}

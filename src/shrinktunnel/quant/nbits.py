"""4-bit per-group weights as ONNX Runtime runs them: the `com.microsoft` MatMulNBits operator.

ONNX's standard operators have no 4-bit matmul that runtimes execute (an int4 DequantizeLinear folds
into float weights), but ONNX Runtime has MatMulNBits: B stored as 4-bit codes in blocks along the
input dimension, one scale (and zero point) per block, dequantized inside its GEMM. That is exactly our
per-group layout, so a 4-bit per-group Linear exports with its integers and scales unchanged:

    B            uint8 (N, K / block, block / 2)  two codes per byte, the lower nibble first
    scales       float32 (N * K / block,)
    zero_points  uint8 (N * ceil(K / block / 2),) two per byte, the lower nibble first
    y = x @ ((code - zero_point) * scale)^T

Symmetric int4 weights q in [-7, 7] become codes q + 8 with zero point 8; asymmetric uint4 weights keep
their codes and zero points. ONNX Runtime requires the block (our group size) to be a power of two of
at least 16; other groups export dequantized, with a note.
"""

from __future__ import annotations

import torch

from ..core.registry import register_onnx_translations

__all__ = ["matmul_nbits", "nbits_layout", "exports_as_nbits", "onnx_translations"]


def exports_as_nbits(kind: str, bits: int, granularity: str, group_size: int | None) -> bool:
    """Whether a layer of this format exports as MatMulNBits."""
    return (kind == "linear" and bits == 4 and granularity == "per_group" and group_size is not None
            and group_size >= 16 and group_size & (group_size - 1) == 0)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15, last dimension even -> bytes, the first code of each pair in the lower nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def nbits_layout(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, signed: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, scales, zero_points) of MatMulNBits from a per-group 4-bit weight: integers `q` (N, K),
    `scale` and `zero_point` (N, n_groups)."""
    n, groups = scale.shape
    block = q.shape[1] // groups
    codes = (q.to(torch.int16) + (8 if signed else 0)).to(torch.uint8).reshape(n, groups, block)
    zp = torch.full((n, groups), 8, dtype=torch.uint8) if signed else zero_point.to(torch.uint8)
    if groups % 2:
        zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)  # pad each row to whole bytes
    return _pack_nibbles(codes), scale.reshape(-1).float().contiguous(), _pack_nibbles(zp).reshape(-1)


@torch.library.custom_op("shrinktunnel::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, block_size: int) -> torch.Tensor:
    """x (..., K) @ the 4-bit weight in MatMulNBits layout -> (..., N), in float32."""
    groups = k // block_size
    codes = _unpack_nibbles(b).reshape(n, groups, block_size).float()
    zp = _unpack_nibbles(zero_points.reshape(n, -1))[:, :groups].float()
    w = ((codes - zp.unsqueeze(2)) * scales.reshape(n, groups, 1)).reshape(n, k)
    return x @ w.t()


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, k, n, block_size):
    return x.new_empty((*x.shape[:-1], n))


@register_onnx_translations
def onnx_translations() -> dict:
    """{torch op: onnxscript function}: MatMulNBits in ONNX Runtime's com.microsoft domain."""
    from onnx.defs import OpSchema
    from onnxscript import values

    # onnx ships no schema for ONNX Runtime's contrib operators and the exporter needs one: this is the
    # part of MatMulNBits' schema that we use.
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T2")],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[A(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )
    matmul_nbits_op = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", schema)

    def _matmul_nbits(x, b, scales, zero_points, k: int, n: int, block_size: int):
        return matmul_nbits_op(x, b, scales, zero_points, K=k, N=n, bits=4, block_size=block_size)

    return {torch.ops.shrinktunnel.matmul_nbits.default: _matmul_nbits}

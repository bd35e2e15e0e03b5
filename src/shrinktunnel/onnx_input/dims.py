"""Shape arithmetic kept symbolic.

ONNX graphs compute shapes with tensors: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`. Run as
torch tensors, a dynamic batch or sequence length would become data (`tensor.tolist()` under
torch.export gives unbacked symbols, and the export fails or fixes the size). So a small integer
vector (a Shape output, or an int constant of at most MAX_DIMS elements) is held as `Dims`: a Python
list of ints (SymInts while torch.export traces), with `scalar` for a 0-d value. Ops that understand
shapes (Gather, Slice, Concat, Unsqueeze, Squeeze, Cast, arithmetic, Equal, Where, Reshape, Expand,
ConstantOfShape, Range, Tile, Resize) compute on the list; any other op gets a tensor (`tensor(v)`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = ["Dims", "tensor", "is_dims", "as_list", "from_tensor", "MAX_DIMS", "binary"]

MAX_DIMS = 64


class Dims:
    __slots__ = ("v", "scalar", "dtype")

    def __init__(self, v, scalar: bool = False, dtype: torch.dtype = torch.int64) -> None:
        self.v = list(v)
        self.scalar = scalar
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"Dims({self.v}{', scalar' if self.scalar else ''})"

    def __deepcopy__(self, memo) -> "Dims":
        return Dims(self.v, self.scalar, self.dtype)


def is_dims(v: Any) -> bool:
    return isinstance(v, Dims)


def tensor(v: Any) -> Any:
    """`v` as a torch tensor (a Dims materialized; None and tensors as they are)."""
    if not isinstance(v, Dims):
        return v
    if v.scalar:
        x = v.v[0]
        if isinstance(x, torch.SymInt):
            return torch.zeros((), dtype=v.dtype) + x
        return torch.tensor(x, dtype=v.dtype)
    if any(isinstance(x, (torch.SymInt, torch.SymBool, torch.SymFloat)) for x in v.v):
        return torch.stack([torch.zeros((), dtype=v.dtype) + x for x in v.v]) if v.v else torch.zeros(0, dtype=v.dtype)
    return torch.tensor(v.v, dtype=v.dtype)


def from_tensor(t: torch.Tensor) -> Dims | torch.Tensor:
    """A constant integer or bool tensor of rank <= 1 and at most MAX_DIMS elements as Dims."""
    if t.dim() <= 1 and t.numel() <= MAX_DIMS and (t.dtype in (torch.int64, torch.int32, torch.bool)):
        return Dims(t.reshape(-1).tolist(), scalar=t.dim() == 0, dtype=t.dtype)
    return t


def as_list(v: Any) -> list:
    """A 1-D integer value (Dims or a constant tensor) as a Python list."""
    if isinstance(v, Dims):
        return list(v.v)
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).tolist()
    return list(v)


_OPS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.floordiv,
        "Equal": operator.eq, "Less": operator.lt, "Greater": operator.gt, "Max": max, "Min": min, "Mod": operator.mod,
        "And": lambda a, b: bool(a) and bool(b), "Or": lambda a, b: bool(a) or bool(b)}
_BOOL = {"Equal", "Less", "Greater", "And", "Or"}


def binary(op: str, a: Dims, b: Dims) -> Dims | None:
    """Elementwise `op` on two Dims with broadcasting (None when the op or the shapes do not fit)."""
    fn = _OPS.get(op)
    if fn is None:
        return None
    av, bv = a.v, b.v
    if len(av) != len(bv) and len(av) != 1 and len(bv) != 1:
        return None
    n = max(len(av), len(bv))
    out = [fn(av[i if len(av) > 1 else 0], bv[i if len(bv) > 1 else 0]) for i in range(n)]
    if op == "Div" and not any(isinstance(x, torch.SymInt) for x in av + bv):
        out = [int(x / y) for x, y in zip(av * (n if len(av) == 1 else 1), bv * (n if len(bv) == 1 else 1))]  # truncating, as ONNX
    return Dims(out, scalar=a.scalar and b.scalar, dtype=torch.bool if op in _BOOL else a.dtype)

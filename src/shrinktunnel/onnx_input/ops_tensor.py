"""ONNX operators on tensors and shapes (elementwise, shape, indexing, reductions), as torch calls.

Each handler is `fn(module, node, inputs) -> list of outputs`; `inputs` holds torch tensors, `Dims`
(dims.py: shape vectors kept symbolic) or None for an omitted optional input. Semantics follow the
ONNX operator specification for opsets 11..21 (where an opset moved an attribute to an input, both are
read). ops_nn.py has the operators with weights and windows.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .dims import Dims, as_list, binary, tensor

__all__ = ["OPS", "op", "DTYPES"]

OPS: dict[str, Callable] = {}

# ONNX TensorProto data types -> torch
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16}


def op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return register


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# -- elementwise ---------------------------------------------------------------------------------------

_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
          "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Floor": torch.floor,
          "Ceil": torch.ceil, "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
          "Softplus": F.softplus, "Round": torch.round, "Sign": torch.sign, "HardSwish": F.hardswish, "Mish": F.mish,
          "IsNaN": torch.isnan, "Softsign": F.softsign}


@op(*_UNARY)
def _unary(m, node, ins):
    return [_UNARY[node.op](tensor(ins[0]))]


@op("Identity", "Dropout")
def _identity(m, node, ins):
    return [ins[0]] + ([torch.ones_like(tensor(ins[0]), dtype=torch.bool)] if len(node.outputs) > 1 else [])


@op("HardSigmoid")
def _hard_sigmoid(m, node, ins):
    a, b = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return [torch.clamp(tensor(ins[0]) * a + b, 0, 1)]


@op("LeakyRelu")
def _leaky(m, node, ins):
    return [F.leaky_relu(tensor(ins[0]), node.attrs.get("alpha", 0.01))]


@op("Elu")
def _elu(m, node, ins):
    return [F.elu(tensor(ins[0]), node.attrs.get("alpha", 1.0))]


@op("Selu")
def _selu(m, node, ins):
    a, g = node.attrs.get("alpha", 1.67326319217681884765625), node.attrs.get("gamma", 1.05070102214813232421875)
    x = tensor(ins[0])
    return [g * torch.where(x > 0, x, a * (torch.exp(x) - 1))]


@op("Gelu")
def _gelu(m, node, ins):
    return [F.gelu(tensor(ins[0]), approximate=node.attrs.get("approximate", "none"))]


@op("PRelu")
def _prelu(m, node, ins):
    x, slope = tensor(ins[0]), tensor(ins[1])
    return [torch.where(x >= 0, x, x * slope)]


@op("Clip")
def _clip(m, node, ins):
    x = tensor(ins[0])
    lo = tensor(ins[1]) if len(ins) > 1 and ins[1] is not None else node.attrs.get("min")
    hi = tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else node.attrs.get("max")
    if isinstance(lo, torch.Tensor):
        lo = lo.to(x.dtype)
    if isinstance(hi, torch.Tensor):
        hi = hi.to(x.dtype)
    return [torch.clamp(x, lo, hi)]


def _int_div(a, b):
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div, "Pow": torch.pow,
           "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
           "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor, "BitShift": None}


@op("Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
def _binary(m, node, ins):
    a, b = ins[0], ins[1]
    if isinstance(a, Dims) and isinstance(b, Dims):
        out = binary(node.op, a, b)
        if out is not None:
            return [out]
    a, b = tensor(a), tensor(b)
    if node.op == "Pow":
        return [torch.pow(a, b.to(a.dtype) if b.dtype.is_floating_point else b).to(a.dtype)]
    return [_BINARY[node.op](a, b)]


@op("Mod")
def _mod(m, node, ins):
    a, b = tensor(ins[0]), tensor(ins[1])
    return [torch.fmod(a, b) if node.attrs.get("fmod", 0) else torch.remainder(a, b)]


@op("Max", "Min", "Sum", "Mean")
def _variadic(m, node, ins):
    if node.op in ("Max", "Min") and all(isinstance(v, Dims) for v in ins):
        out = ins[0]
        for v in ins[1:]:
            out = binary(node.op, out, v) or out
        return [out]
    ts = [tensor(v) for v in ins]
    out = ts[0]
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op]
    for t in ts[1:]:
        out = fn(out, t)
    return [out / len(ts) if node.op == "Mean" else out]


@op("Where")
def _where(m, node, ins):
    c, a, b = ins
    if all(isinstance(v, Dims) for v in ins) and len(c.v) in (len(a.v), 1) and len(a.v) == len(b.v):
        return [Dims([x if c.v[i if len(c.v) > 1 else 0] else y for i, (x, y) in enumerate(zip(a.v, b.v))], a.scalar, a.dtype)]
    return [torch.where(tensor(c), tensor(a), tensor(b))]


@op("Cast", "CastLike")
def _cast(m, node, ins):
    x = ins[0]
    dtype = tensor(ins[1]).dtype if node.op == "CastLike" else DTYPES[node.attrs["to"]]
    if isinstance(x, Dims) and not dtype.is_floating_point:
        return [Dims([bool(v) for v in x.v] if dtype == torch.bool else x.v, x.scalar, dtype)]
    return [tensor(x).to(dtype)]


# -- shapes ----------------------------------------------------------------------------------------------

@op("Shape")
def _shape(m, node, ins):
    shape = list(tensor(ins[0]).shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
    return [Dims(shape[start:end])]


@op("Size")
def _size(m, node, ins):
    return [Dims([tensor(ins[0]).numel()], scalar=True)]


def _target_shape(x: torch.Tensor, shape: list, allowzero: int) -> list:
    return [x.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]


@op("Reshape")
def _reshape(m, node, ins):
    x = tensor(ins[0])
    return [x.reshape(_target_shape(x, as_list(ins[1]), node.attrs.get("allowzero", 0)))]


@op("Flatten")
def _flatten(m, node, ins):
    x = tensor(ins[0])
    axis = _axis(node.attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1)]


@op("Transpose")
def _transpose(m, node, ins):
    x = tensor(ins[0])
    perm = node.attrs.get("perm") or list(range(x.dim()))[::-1]
    return [x.permute(*perm)]


def _axes(node, ins, index: int = 1) -> list | None:
    if len(ins) > index and ins[index] is not None:
        return as_list(ins[index])
    return node.attrs.get("axes")


@op("Unsqueeze")
def _unsqueeze(m, node, ins):
    x, axes = ins[0], _axes(node, ins)
    if isinstance(x, Dims) and x.scalar and axes in ([0], [-1]):
        return [Dims(x.v, dtype=x.dtype)]
    x = tensor(x)
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@op("Squeeze")
def _squeeze(m, node, ins):
    x, axes = ins[0], _axes(node, ins)
    if isinstance(x, Dims) and not x.scalar and len(x.v) == 1 and axes in (None, [0], [-1]):
        return [Dims(x.v, scalar=True, dtype=x.dtype)]
    x = tensor(x)
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


@op("Concat")
def _concat(m, node, ins):
    ins = [v for v in ins if v is not None]
    if all(isinstance(v, Dims) for v in ins):
        return [Dims([x for v in ins for x in v.v], dtype=ins[0].dtype)]
    ts = [tensor(v) for v in ins]
    ts = [t for t in ts if not (t.dim() == 1 and t.shape[0] == 0)] or ts[:1]
    return [torch.cat(ts, dim=node.attrs["axis"])]


@op("Split")
def _split(m, node, ins):
    x = tensor(ins[0])
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    split = as_list(ins[1]) if len(ins) > 1 and ins[1] is not None else node.attrs.get("split")
    n = len(node.outputs)
    if split is None:
        size = x.shape[axis]
        chunk = -(-size // n) if "num_outputs" in node.attrs else size // n
        return list(torch.split(x, chunk, dim=axis))
    return list(torch.split(x, split, dim=axis))


_BIG = 1 << 62


def _py_slice(s, e, st):
    """ONNX Slice bounds as a Python slice (Python's own clamping matches ONNX's for these bounds)."""
    if isinstance(e, int) and (e >= _BIG or (st < 0 and e <= -_BIG)):
        e = None
    if isinstance(s, int) and (s <= -_BIG or (st < 0 and s >= _BIG)):
        s = None if st < 0 or s <= -_BIG else s
    return slice(s, e, st)


@op("Slice")
def _slice(m, node, ins):
    x = ins[0]
    if len(ins) > 1:
        starts, ends = as_list(ins[1]), as_list(ins[2])
        axes = as_list(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = as_list(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    else:  # opset < 10 form
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    if isinstance(x, Dims):
        return [Dims(x.v[_py_slice(starts[0], ends[0], steps[0])], dtype=x.dtype)]
    x = tensor(x)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(a, x.dim())
        if st < 0:  # torch has no negative steps: pick the indices
            picked = list(range(int(x.shape[a])))[_py_slice(s, e, st)]
            x = x.index_select(a, torch.tensor(picked, dtype=torch.long))
            continue
        index[a] = _py_slice(s, e, st)
    return [x[tuple(index)]]


@op("Gather")
def _gather(m, node, ins):
    x, idx = ins
    axis = node.attrs.get("axis", 0)
    if isinstance(x, Dims) and isinstance(idx, Dims):
        picked = [x.v[i] for i in idx.v]
        return [Dims(picked, scalar=idx.scalar, dtype=x.dtype)]
    x = tensor(x)
    axis = _axis(axis, x.dim())
    if isinstance(idx, Dims) and idx.scalar and isinstance(idx.v[0], int):
        return [x.select(axis, idx.v[0])]
    idx = tensor(idx).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


@op("GatherElements")
def _gather_elements(m, node, ins):
    x, idx = tensor(ins[0]), tensor(ins[1]).long()
    axis = _axis(node.attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


@op("Expand")
def _expand(m, node, ins):
    x, shape = tensor(ins[0]), as_list(ins[1])
    n = max(len(shape), x.dim())
    xs, ts = [1] * (n - x.dim()) + list(x.shape), [1] * (n - len(shape)) + shape
    out = [a if (isinstance(b, int) and b == 1) else b for a, b in zip(xs, ts)]
    return [x.reshape(xs).expand(out)]


@op("Tile")
def _tile(m, node, ins):
    return [tensor(ins[0]).repeat(*as_list(ins[1]))]


@op("ConstantOfShape")
def _constant_of_shape(m, node, ins):
    value = node.attrs.get("value")
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1)
    shape = as_list(ins[0])
    return [torch.full(shape, fill.reshape(-1)[0].item(), dtype=fill.dtype)]


@op("Range")
def _range(m, node, ins):
    s, e, d = ins
    if all(isinstance(v, Dims) for v in ins):
        return [Dims(list(range(s.v[0], e.v[0], d.v[0])), dtype=s.dtype)] if all(isinstance(v.v[0], int) for v in ins) \
            else [torch.arange(s.v[0], e.v[0], d.v[0], dtype=s.dtype)]
    s, e, d = tensor(s), tensor(e), tensor(d)
    return [torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype)]


@op("NonZero")
def _nonzero(m, node, ins):
    return [torch.nonzero(tensor(ins[0])).T]


@op("CumSum")
def _cumsum(m, node, ins):
    x, axis = tensor(ins[0]), int(as_list(ins[1])[0])
    if node.attrs.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if node.attrs.get("exclusive", 0):
        out = out - x
    return [out.flip(axis) if node.attrs.get("reverse", 0) else out]


@op("DepthToSpace")
def _depth_to_space(m, node, ins):
    x, b = tensor(ins[0]), node.attrs["blocksize"]
    if node.attrs.get("mode", "DCR") == "CRD":
        return [F.pixel_shuffle(x, b)]
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@op("SpaceToDepth")
def _space_to_depth(m, node, ins):
    x, b = tensor(ins[0]), node.attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


# -- reductions -------------------------------------------------------------------------------------------

_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
           "ReduceProd": None, "ReduceL2": None, "ReduceSumSquare": None, "ReduceL1": None, "ReduceLogSumExp": None}


@op(*_REDUCE)
def _reduce(m, node, ins):
    x = tensor(ins[0])
    axes = _axes(node, ins)
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0) and axes is not None:
            return [x]
        axes = list(range(x.dim()))
    dims = tuple(_axis(a, x.dim()) for a in axes)
    name = node.op
    if name == "ReduceProd":
        out = x
        for d in sorted(dims, reverse=True):
            out = torch.prod(out, d, keepdim=keep)
        return [out]
    if name == "ReduceL2":
        return [torch.sqrt(torch.sum(x * x, dims, keepdim=keep))]
    if name == "ReduceL1":
        return [torch.sum(x.abs(), dims, keepdim=keep)]
    if name == "ReduceSumSquare":
        return [torch.sum(x * x, dims, keepdim=keep)]
    if name == "ReduceLogSumExp":
        return [torch.logsumexp(x, dims, keepdim=keep)]
    return [_REDUCE[name](x, dims, keepdim=keep)]


@op("ArgMax", "ArgMin")
def _argmax(m, node, ins):
    x = tensor(ins[0])
    axis, keep = node.attrs.get("axis", 0), bool(node.attrs.get("keepdims", 1))
    if node.attrs.get("select_last_index", 0):
        x = x.flip(axis)
    fn = torch.argmax if node.op == "ArgMax" else torch.argmin
    out = fn(x, dim=axis, keepdim=keep)
    return [x.shape[axis] - 1 - out if node.attrs.get("select_last_index", 0) else out]


@op("TopK")
def _topk(m, node, ins):
    x, k = tensor(ins[0]), as_list(ins[1])[0]
    values, index = torch.topk(x, k, dim=node.attrs.get("axis", -1), largest=bool(node.attrs.get("largest", 1)),
                               sorted=bool(node.attrs.get("sorted", 1)))
    return [values, index]


def _softmax_like(fn: Callable) -> Callable:
    def run(m, node, ins) -> list[Any]:
        x = tensor(ins[0])
        if node.opset >= 13:
            return [fn(x, dim=node.attrs.get("axis", -1))]
        axis = _axis(node.attrs.get("axis", 1), x.dim())  # before 13: coerced to 2-D at axis
        flat = x.reshape(math.prod(x.shape[:axis]) if axis else 1, -1)
        return [fn(flat, dim=1).reshape(x.shape)]
    return run


OPS["Softmax"] = _softmax_like(torch.softmax)
OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


@op("Einsum")
def _einsum(m, node, ins):
    return [torch.einsum(node.attrs["equation"], *[tensor(v) for v in ins])]

"""Rewrites of the exported ONNX graph that ONNX Runtime's own optimizer does not make.

`fold_constant_scales`: a constant per-channel scale applied to a product whose chain already holds a
constant factor is merged into that factor, so the Mul disappears. The case it was written for:
SmoothQuant's 1 / s on the input of a transformer's second FFN Linear (quant/smooth.py) follows the
exact GELU, which opset 18 spells

    gelu = x * (0.5 * (1 + erf(x / sqrt 2)))      then      gelu * (1 / s)

and which becomes x * ((0.5 / s) * (1 + erf(x / sqrt 2))): one elementwise pass over a batch x tokens
x 1536 tensor less per layer. The default export (opset 20) has one Gelu node there instead, faster
than the fold saves (docs/quantization.md), so nothing folds; exports at opset 18 still gain.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["fold_constant_scales", "name_readers"]


def fold_constant_scales(model: onnx.ModelProto) -> int:
    """Fold `Mul(X, v)` (v constant) into X's chain when X = Mul(P, Q), Q = Mul(R, c) (c constant), each
    intermediate read by nothing else, and v's dimensions already present at the end of R's shape (so
    no broadcast grows). The Mul node goes, c becomes a new constant c * v. Returns the count folded;
    `model` is changed in place. Float32 constants only; the result is exact up to one rounding of c * v."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    shapes: dict[str, list[int | None]] | None = None  # shape inference only once a pattern is found
    outputs = {o.name for o in graph.output}
    readers = name_readers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    folded, removed = 0, []
    for node in list(graph.node):
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        x_name, v = _split_const(node, consts)
        if v is None or not _single_reader(x_name, readers, outputs):
            continue
        outer = producer.get(x_name)
        if outer is None or outer.op_type != "Mul" or len(outer.input) != 2:
            continue
        for q_name in outer.input:
            inner = producer.get(q_name)
            if inner is None or inner.op_type != "Mul" or not _single_reader(q_name, readers, outputs):
                continue
            r_name, c = _split_const(inner, consts)
            if c is None:
                continue
            shapes = _shapes(model) if shapes is None else shapes
            if not _fits(shapes.get(r_name), v.shape):
                continue
            merged = numpy_helper.from_array((c * v).astype(np.float32), f"{inner.name or q_name}_scaled_{folded}")
            graph.initializer.append(merged)
            consts[merged.name] = merged
            inner.input[list(inner.input).index(_const_name(inner, consts, exclude=merged.name))] = merged.name
            outer.output[0] = node.output[0]  # the product now is what the removed Mul produced
            removed.append(node)
            folded += 1
            break
    for node in removed:
        graph.node.remove(node)
    if folded:
        _drop_unused_initializers(graph)
    return folded


def name_readers(graph: onnx.GraphProto) -> Counter:
    """How many nodes read each name, subgraphs (If, Loop, Scan bodies) included."""
    count: Counter = Counter()
    for node in graph.node:
        count.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                count.update(name_readers(sub))
    return count


def _split_const(node: onnx.NodeProto, consts: dict) -> tuple[str, np.ndarray | None]:
    """(the non-constant input, the float32 constant) of a binary node, or (_, None)."""
    a, b = node.input
    for var, const in ((a, b), (b, a)):
        if const in consts and var not in consts:
            value = numpy_helper.to_array(consts[const])
            if value.dtype == np.float32:
                return var, value
    return "", None


def _const_name(node: onnx.NodeProto, consts: dict, exclude: str) -> str:
    return next(name for name in node.input if name in consts and name != exclude)


def _single_reader(name: str, readers: Counter, outputs: set[str]) -> bool:
    return readers[name] == 1 and name not in outputs


def _fits(shape: list[int | None] | None, v_shape: tuple[int, ...]) -> bool:
    """v's dims are the trailing static dims of R's shape (or v is a scalar): R * c * v keeps R's shape."""
    if not v_shape or int(np.prod(v_shape)) == 1:
        return True
    if shape is None or len(shape) < len(v_shape):
        return False
    return all(d == n for d, n in zip(shape[-len(v_shape):], v_shape))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every value's shape that ONNX's shape inference knows (None for a symbolic dimension)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no shapes, no fold: the pass is an optimisation
        return {}
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = set(name_readers(graph)) | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)

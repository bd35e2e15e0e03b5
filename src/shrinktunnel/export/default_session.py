"""Rewrites that make the exported file fast in a default ONNX Runtime session.

Users load the `.onnx` file with `ort.InferenceSession(path)`, in Python, C++ or C#, and set no session
option. Two things a tuned session did for speed are therefore written into the graph itself:

- `keep_layernorm_unfused`: ONNX Runtime fuses `Add -> LayerNormalization` into its contrib kernel
  SkipLayerNormalization, which on the CPUs we run on is slower than the two ops it replaces
  (0.91 ms against 0.12 ms on a 32 x 32 x 384 tensor, 2 threads, ONNX Runtime 1.32; 13 % of
  all-MiniLM-L6-v2's fp32 time, 15 % of its int8 time). The fusion matches the op type `Add` only
  (onnxruntime/core/optimizer/skip_layer_norm_fusion.cc), so the residual Add that feeds a
  LayerNormalization is written as `Sum`, the same function with a kernel as fast as Add's.
- `fold_weight_dequantize`: a convolution whose weight is `DequantizeLinear(int8 constant)` and whose
  input is float (weight-only int8, or a conv left float beside quantized Linears) has nothing to fuse
  into an integer kernel, but ONNX Runtime keeps every DequantizeLinear out of constant folding for QDQ
  fusion: the conv then repacks its weight on every run (the MNIST CNN's weight-only convs ran 2.6x
  slower than fp32). The dequantized weight is written as a float initializer instead (exact: the same
  arithmetic, once). The file holds such weights in float (4 bytes a value, not 1); the artifact keeps them int8.

Both are exact rewrites: outputs are unchanged bit for bit (tests/export/test_default_session.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph_passes import name_readers

__all__ = ["keep_layernorm_unfused", "fold_weight_dequantize", "for_default_session"]

_ONNX = ("", "ai.onnx")
_INT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)


def for_default_session(model: onnx.ModelProto) -> dict[str, int]:
    """Apply both rewrites in place; return how many nodes each changed."""
    return {"layernorm_adds": keep_layernorm_unfused(model), "folded_conv_weights": fold_weight_dequantize(model)}


def keep_layernorm_unfused(model: onnx.ModelProto) -> int:
    """Every `Add` read only by a LayerNormalization's input 0 becomes `Sum` (in place); returns the count.
    Sum broadcasts like Add (multidirectional, opset 8 on), so the function is the same."""
    graph = model.graph
    readers = name_readers(graph)
    outputs = {o.name for o in graph.output}
    ln_inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization" and n.domain in _ONNX and n.input}
    count = 0
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if (node.op_type == "Add" and node.domain in _ONNX and len(node.input) == 2 and out in ln_inputs
                and readers[out] == 1 and out not in outputs):
            node.op_type = "Sum"
            count += 1
    return count


def fold_weight_dequantize(model: onnx.ModelProto) -> int:
    """Each `DequantizeLinear` of a constant integer tensor read only as the weight (input 1) of `Conv`
    nodes whose input 0 is not itself dequantized becomes a float32 initializer (in place); returns
    the count. Blocked (opset 21 `block_size`) and non-8-bit types are left as they are."""
    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, k))
    outputs = {o.name for o in graph.output}
    folded, removed = 0, []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in _ONNX or not node.input:
            continue
        out = node.output[0]
        readers = uses.get(out, [])
        if not readers or out in outputs or not all(_float_conv_weight(r, k, producer) for r, k in readers):
            continue
        weight = _dequantized(node, consts)
        if weight is None:
            continue
        graph.initializer.append(numpy_helper.from_array(weight, out))
        removed.append(node)
        folded += 1
    for node in removed:
        graph.node.remove(node)
    if folded:
        used = set(name_readers(graph)) | outputs
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return folded


def _float_conv_weight(reader: onnx.NodeProto, index: int, producer: dict) -> bool:
    if reader.op_type not in ("Conv", "ConvTranspose") or reader.domain not in _ONNX or index != 1:
        return False
    source = producer.get(reader.input[0])
    return source is None or source.op_type != "DequantizeLinear"  # a QDQ conv: ORT makes it QLinearConv


def _dequantized(node: onnx.NodeProto, consts: dict) -> np.ndarray | None:
    """(q - zero_point) * scale in float32, per tensor or along `axis`; None if not foldable."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size", 0):
        return None
    names = list(node.input) + [""] * (3 - len(node.input))
    if names[0] not in consts or names[1] not in consts or (names[2] and names[2] not in consts):
        return None
    if consts[names[0]].data_type not in _INT_TYPES:
        return None
    q = numpy_helper.to_array(consts[names[0]]).astype(np.float32)
    scale = numpy_helper.to_array(consts[names[1]]).astype(np.float32)
    zero = numpy_helper.to_array(consts[names[2]]).astype(np.float32) if names[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:  # per channel along `axis`
        shape = [1] * q.ndim
        shape[attrs.get("axis", 1) % q.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)

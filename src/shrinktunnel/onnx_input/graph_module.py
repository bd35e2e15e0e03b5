"""An ONNX graph as a PyTorch module (`OnnxModule`), built from the graph's data alone.

The module holds its layers as real torch modules (ops_nn.make_layer: constant-weight Conv / Gemm /
MatMul / LSTM), every other constant as a buffer (small integer vectors as `Dims`, dims.py), and the
node list as plain data; `forward` runs the nodes in order with the handlers of ops_tensor / ops_nn.
At build time it folds constant subgraphs (nodes whose inputs are all constants), folds a
BatchNormalization into the Conv before it (what ONNX Runtime does when it loads the graph, and
what lets int8 quantize the folded weight), and moves a MatMul's following bias Add into its Linear.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import DataError, ModelError
from . import ops_nn  # noqa: F401  (registers the layer operators in OPS)
from .dims import Dims, from_tensor, tensor
from .ops_nn import LAYER_OPS, make_layer
from .ops_tensor import OPS

__all__ = ["OnnxModule", "UnsupportedOpError", "build_module", "Node"]

_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


class UnsupportedOpError(ModelError):
    """The graph has operators the importer cannot turn into PyTorch; `ops` names them."""

    def __init__(self, message: str, ops: list[str]) -> None:
        super().__init__(message)
        self.ops = ops


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    layer: str | None = None


@dataclass
class OriginalIO:
    """What the original graph looked like from outside: input / output names, shapes with their dim
    names (str: dynamic, int: fixed), element types; and the file it came from (sha256)."""
    inputs: list[tuple[str, list, int]]
    outputs: list[tuple[str, list, int]]
    opset: int
    sha256: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _, _ in self.outputs]


class OnnxModule(nn.Module):
    """An ONNX graph run by PyTorch. Call it with the graph's inputs, positionally in the graph's order
    or by their ONNX names; it returns one tensor, or a tuple in the graph's output order."""

    def __init__(self, nodes: list[Node], io: OriginalIO, dims: dict[str, Dims], buffers: dict[str, str]) -> None:
        super().__init__()
        self.onnx_nodes = nodes
        self.onnx_original = io
        self.onnx_dims = dims
        self.onnx_buffers = buffers  # ONNX value name -> buffer attribute

    def export_onnx_as_original(self, path, example_inputs: Any, *, opset: int | None = None):
        """What st.export_onnx calls for this module: the original's input / output names and dynamic dims."""
        from .export_back import export_like_original

        return export_like_original(self, path, example_inputs, opset=opset)

    def extra_repr(self) -> str:
        # the source graph in the repr: caches keyed by the module tree (search/cache.py) tell two graphs apart
        io = self.onnx_original
        return f"inputs={io.input_names}, outputs={io.output_names}, nodes={len(self.onnx_nodes)}, sha256={io.sha256[:16]}"

    def forward(self, *inputs: Any, **named: Any):
        names = self.onnx_original.input_names
        if len(inputs) > len(names):
            raise DataError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
        env: dict[str, Any] = dict(zip(names, inputs))
        for k, v in named.items():
            if k not in names:
                raise DataError(f"the ONNX model has no input {k!r}; its inputs are {names}")
            env[k] = v
        missing = [n for n in names if n not in env]
        if missing:
            raise DataError(f"the ONNX model needs inputs {missing} (its inputs are {names}); pass a dict batch keyed by them")
        env.update(self.onnx_dims)
        for name, attr in self.onnx_buffers.items():
            env[name] = getattr(self, attr)
        for node in self.onnx_nodes:
            outs = OPS[node.op](self, node, [env[i] if i else None for i in node.inputs])
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        results = tuple(tensor(env[n]) for n in self.onnx_original.output_names)
        return results[0] if len(results) == 1 else results


# -- building ------------------------------------------------------------------------------------------

def _attrs(node, opset: int) -> dict[str, Any]:
    from onnx import AttributeProto, helper, numpy_helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            out[a.name] = "<graph>"
            continue
        v = helper.get_attribute_value(a)
        if a.type == AttributeProto.TENSOR:
            v = torch.from_numpy(numpy_helper.to_array(v).copy())
        elif isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode("utf-8", "replace") for x in v]
        out[a.name] = v
    return out


def _constant_value(attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ModelError(f"Constant node has an unsupported value attribute ({sorted(attrs)})")


def _value_info(v) -> tuple[str, list, int]:
    t = v.type.tensor_type
    dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else "?")
            for d in t.shape.dim]
    return v.name, dims, int(t.elem_type)


def unsupported_ops(model) -> list[str]:
    """The operators of `model` (its main graph) that the importer has no handler for, as
    `domain.Op` for non-default domains; If / Loop / Scan (control flow) count as unsupported."""
    bad = []
    for n in model.graph.node:
        name = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        known = n.op_type in OPS or n.op_type == "Constant"
        if (n.domain not in ("", "ai.onnx") or not known) and name not in bad:
            bad.append(name)
    return bad


def _sanitize(name: str, taken: set[str], fallback: str) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or fallback
    if base[0].isdigit():
        base = "n_" + base
    if hasattr(nn.Module, base) or base.startswith("onnx_") or base == "training":
        base = "m_" + base
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


def build_module(model, *, sha256: str = "") -> OnnxModule:
    """The OnnxModule for an onnx.ModelProto (external data already loaded, see reader.py)."""
    from onnx import numpy_helper

    from .reader import default_opset

    bad = unsupported_ops(model)
    if bad:
        raise UnsupportedOpError(f"the ONNX graph uses operator{'s' if len(bad) > 1 else ''} {', '.join(bad)}, which the "
                                 "PyTorch importer does not support; int8 quantization still works on the graph itself: python -m "
                                 "shrinktunnel.onnx_input MODEL.onnx --data DATA --out OUT.onnx (onnx_input.quantize_onnx)", bad)
    opset = default_opset(model) or 11
    graph = model.graph
    consts: dict[str, torch.Tensor] = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    io = OriginalIO([_value_info(v) for v in graph.input if v.name not in consts],
                    [_value_info(v) for v in graph.output], opset, sha256)
    nodes = []
    for i, n in enumerate(graph.node):
        attrs = _attrs(n, opset)
        if n.op_type == "Constant":
            consts[n.output[0]] = _constant_value(attrs)
            continue
        nodes.append(Node(n.op_type, n.name or f"{n.op_type.lower()}_{i}", list(n.input), list(n.output), attrs, opset))
    nodes = _fold_constants(nodes, consts, set(io.output_names))
    _static_arguments(nodes, consts)
    nodes = _fold_batch_norm(nodes, consts, set(io.output_names))
    layers = _make_layers(nodes, consts, set(io.output_names))
    return _assemble(nodes, consts, io, layers)


def _fold_constants(nodes: list[Node], consts: dict[str, torch.Tensor], outputs: set[str]) -> list[Node]:
    kept = []
    for node in nodes:
        ready = all((not i) or i in consts for i in node.inputs)
        if not ready or node.op in LAYER_OPS or node.op in _NO_FOLD or any(o in outputs for o in node.outputs):
            kept.append(node)
            continue
        try:
            values = OPS[node.op](None, node, [from_tensor(consts[i]) if i else None for i in node.inputs])
        except Exception:  # noqa: BLE001 - left to run at forward time, where its error surfaces
            kept.append(node)
            continue
        for name, v in zip(node.outputs, values):
            if name:
                consts[name] = tensor(v) if isinstance(v, Dims) else v
    return kept


def _static_arguments(nodes: list[Node], consts: dict[str, torch.Tensor]) -> None:
    """Constant float arguments that torch takes as Python numbers (Resize scales, Clip bounds) moved
    into the node's attributes: read from a tensor they would be data to torch.export."""
    for node in nodes:
        if node.op == "Resize" and len(node.inputs) > 2 and node.inputs[2] in consts and consts[node.inputs[2]].numel():
            node.attrs["_scales"] = [float(v) for v in consts[node.inputs[2]].reshape(-1).tolist()]
            node.inputs[2] = ""
        if node.op == "Clip":
            for k, key in ((1, "min"), (2, "max")):
                if len(node.inputs) > k and node.inputs[k] in consts and consts[node.inputs[k]].numel() == 1:
                    node.attrs[key] = consts[node.inputs[k]].reshape(-1)[0].item()
                    node.inputs[k] = ""


def _consumers(nodes: list[Node]) -> dict[str, list[Node]]:
    out: dict[str, list[Node]] = {}
    for node in nodes:
        for i in node.inputs:
            if i:
                out.setdefault(i, []).append(node)
    return out


def _fold_batch_norm(nodes: list[Node], consts: dict[str, torch.Tensor], outputs: set[str]) -> list[Node]:
    """Conv (constant weight) -> BatchNormalization (constant statistics) as one Conv."""
    users = _consumers(nodes)
    dropped: set[int] = set()
    for node in nodes:
        if node.op != "Conv" or len(node.inputs) < 2 or node.inputs[1] not in consts or node.outputs[0] in outputs:
            continue
        after = users.get(node.outputs[0], [])
        if len(after) != 1 or after[0].op != "BatchNormalization" or len(after[0].outputs) > 1 \
                or not all(i in consts for i in after[0].inputs[1:5]):
            continue
        bn = after[0]
        scale, beta, mean, var = (consts[i].double() for i in bn.inputs[1:5])
        w = consts[node.inputs[1]].double()
        b = consts[node.inputs[2]].double() if len(node.inputs) > 2 and node.inputs[2] else torch.zeros(w.shape[0], dtype=torch.float64)
        factor = scale / torch.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        wname, bname = node.name + "::bn_weight", node.name + "::bn_bias"
        consts[wname] = (w * factor.reshape(-1, *[1] * (w.dim() - 1))).float()
        consts[bname] = ((b - mean) * factor + beta).float()
        node.inputs = [node.inputs[0], wname, bname]
        node.outputs = list(bn.outputs)
        dropped.add(id(bn))
    return [n for n in nodes if id(n) not in dropped]


def _make_layers(nodes: list[Node], consts: dict[str, torch.Tensor], outputs: set[str]) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {}
    taken: set[str] = set()
    users = _consumers(nodes)
    dropped: set[int] = set()
    for node in nodes:
        if node.op not in LAYER_OPS:
            continue
        layer = make_layer(node, consts)
        if layer is None and node.op == "LSTM":
            raise UnsupportedOpError(f"LSTM node {node.name!r}: only constant weights, no peepholes, clip, reverse direction, "
                                     "sequence_lens input or custom activations convert to torch.nn.LSTM", ["LSTM"])
        if layer is None:
            continue
        node.layer = _sanitize(node.name, taken, node.op.lower())
        layers[node.layer] = layer
        owned = (1, 2, 3, 4, 7) if node.op == "LSTM" else (1, 2)  # the layer holds these (LSTM: sequence_lens ignored)
        node.inputs = ["" if k in owned else i for k, i in enumerate(node.inputs)]
        if node.op == "MatMul" and node.outputs[0] not in outputs:
            _take_bias(node, layer, users, consts, dropped)
    nodes[:] = [n for n in nodes if id(n) not in dropped]
    return layers


def _take_bias(node: Node, layer: nn.Linear, users, consts, dropped: set[int]) -> None:
    """MatMul -> Add(constant of the output width) becomes the Linear's bias."""
    after = users.get(node.outputs[0], [])
    if len(after) != 1 or after[0].op != "Add" or len(after[0].outputs) != 1:
        return
    add = after[0]
    other = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
    b = consts.get(other)
    if b is None or not b.dtype.is_floating_point or b.numel() != layer.out_features or b.dim() != 1:
        return
    layer.bias = nn.Parameter(b.float().clone())
    node.outputs = list(add.outputs)
    dropped.add(id(add))


def _assemble(nodes: list[Node], consts: dict[str, torch.Tensor], io: OriginalIO, layers: dict[str, nn.Module]) -> OnnxModule:
    used: list[str] = []
    seen = set()
    for node in nodes:
        for i in node.inputs:
            if i and i in consts and i not in seen:
                seen.add(i)
                used.append(i)
    for name in io.output_names:
        if name in consts and name not in seen:
            seen.add(name)
            used.append(name)
    dims: dict[str, Dims] = {}
    buffers: dict[str, str] = {}
    taken = set(layers)
    pending: list[tuple[str, torch.Tensor]] = []
    for name in used:
        value = from_tensor(consts[name])
        if isinstance(value, Dims):
            dims[name] = value
        else:
            attr = _sanitize("c_" + name, taken, "const")
            buffers[name] = attr
            pending.append((attr, consts[name]))
    module = OnnxModule(nodes, io, dims, buffers)
    for attr, layer in layers.items():
        module.add_module(attr, layer)
    for attr, value in pending:
        module.register_buffer(attr, value.contiguous())
    return module.eval()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


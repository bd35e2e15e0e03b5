"""Small ONNX graphs built with onnx.helper (no exporter: fast, and each op spelled as ONNX spells it)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

def _w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    # seeded by the name: the same graph, whatever was built before it
    rng = np.random.default_rng(sum(map(ord, name)) + 7 * len(shape))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 10
    return model


def cnn(opset: int = 13, nhwc: bool = False) -> onnx.ModelProto:
    """Conv + BN + Relu + MaxPool, a depthwise conv with asymmetric pads, GlobalAveragePool, a
    Shape / Gather / Concat / Reshape chain (dynamic batch), Gemm, Softmax. NHWC: a Transpose first."""
    c = "x_nchw" if nhwc else "x"
    nodes = ([helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2])] if nhwc else []) + [
        helper.make_node("Conv", [c, "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s", "beta", "mean", "var"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[0, 0, 1, 1], group=8, name="dw"),
        helper.make_node("HardSwish", ["c2"], ["h"]) if opset >= 14 else helper.make_node("Sigmoid", ["c2"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["gap"]),
        helper.make_node("Shape", ["gap"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]) if opset >= 13 else helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
        helper.make_node("Concat", ["n1", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["gap", "newshape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1 if opset >= 13 else 1),
    ]
    inits = [_w("w1", 8, 3, 3, 3), _w("b1", 8), _w("s", 8), _w("beta", 8),
             numpy_helper.from_array(np.zeros(8, np.float32), "mean"),
             numpy_helper.from_array(np.full(8, 0.5, np.float32), "var"), _w("w2", 8, 1, 3, 3),
             _i64("zero", 0), _i64("axes0", [0]), _i64("minus1", [-1]), _w("wfc", 5, 8), _w("bfc", 5)]
    shape = ["N", 16, 16, 3] if nhwc else ["N", 3, 16, 16]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 5])
    return _model(nodes, [x], [y], inits, opset)


def two_in_two_out(opset: int = 17) -> onnx.ModelProto:
    """Tokens + a mask in; MatMul + bias Add (-> one Linear), LayerNormalization, a masked mean, two outputs."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
        helper.make_node("MatMul", ["e", "wq"], ["mm"], name="proj"),
        helper.make_node("Add", ["mm", "bq"], ["lin"]),
        helper.make_node("Gelu", ["lin"], ["act"]) if opset >= 20 else helper.make_node("Tanh", ["lin"], ["act"]),
        helper.make_node("LayerNormalization", ["act", "g", "bt"], ["hidden"], axis=-1, epsilon=1e-5),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes2"], ["m3"]),
        helper.make_node("Mul", ["hidden", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axes1"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["pooled"]),
    ]
    inits = [_w("emb", 50, 16), _w("wq", 16, 24), _w("bq", 24), _w("g", 24), _w("bt", 24), _i64("axes2", [2]), _i64("axes1", [1])]
    ins = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
           helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])]
    outs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", 24]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 24])]
    return _model(nodes, ins, outs, inits, opset)


def with_op(op_type: str, domain: str = "") -> onnx.ModelProto:
    """x -> Relu -> <op_type> (of `domain`) -> y: a graph with one operator the importer may lack."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op_type, ["r"], ["y"], domain=domain)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else []))
    model.ir_version = 8
    return model


def misc(opset: int) -> onnx.ModelProto:
    """Operators whose signature moved between opsets 11 and 21: Clip bounds, Split sizes, Squeeze /
    Unsqueeze / Reduce axes (attribute or input), Pad, Resize, Slice."""
    axes_in = opset >= 13
    red_in = opset >= 18
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["cl"]),
        helper.make_node("Pad", ["cl", "pads"], ["pd"], mode="reflect"),
        helper.make_node("Resize", ["pd", "roi", "scales"], ["rs"], mode="nearest", coordinate_transformation_mode="asymmetric",
                         nearest_mode="floor"),
        helper.make_node("Split", ["rs", "split"] if axes_in else ["rs"], ["s1", "s2"], axis=1,
                         **({} if axes_in else {"split": [1, 2]})),
        helper.make_node("ReduceMean", ["s2", "axes1"] if red_in else ["s2"], ["mean"], keepdims=1, **({} if red_in else {"axes": [1]})),
        helper.make_node("Add", ["s1", "mean"], ["sum"]),
        helper.make_node("Slice", ["sum", "starts", "ends", "sl_axes", "steps"], ["sl"]),
        helper.make_node("Squeeze", ["sl", "axes1"] if axes_in else ["sl"], ["y"], **({} if axes_in else {"axes": [1]})),
    ]
    inits = [numpy_helper.from_array(np.float32(-0.5), "lo"), numpy_helper.from_array(np.float32(0.8), "hi"),
             _i64("pads", [0, 0, 1, 2, 0, 0, 2, 1]), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
             _i64("split", [1, 2]), _i64("axes1", [1]), _i64("starts", [1, -1]), _i64("ends", [1 << 62, -100]),
             _i64("sl_axes", [2, 3]), _i64("steps", [2, -1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "h", "w"])
    return _model(nodes, [x], [y], inits, opset)

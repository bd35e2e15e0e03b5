"""The exported file is fast in a DEFAULT ONNX Runtime session: the graph a plain `ort.InferenceSession`
runs has no SkipLayerNormalization and no DequantizeLinear before a float conv (export.default_session)."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import shrinktunnel as st
from shrinktunnel.export.default_session import fold_weight_dequantize, keep_layernorm_unfused


def _plain_run_graph(path, tmp_path) -> Counter:
    """Node types of the graph a user's session runs: default options, only the optimized graph written out."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "run.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "run.onnx")).graph.node)


def _residual_layernorm() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 16])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", 4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random(16, dtype=np.float32) + 0.5, "g"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "s"], ["t"]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
    model = helper.make_model(helper.make_graph(nodes, "ln", [x, s], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def test_residual_add_before_layernorm_is_not_fused_and_outputs_are_bit_identical(tmp_path):
    model = _residual_layernorm()
    onnx.save(model, str(tmp_path / "add.onnx"))
    assert _plain_run_graph(tmp_path / "add.onnx", tmp_path)["SkipLayerNormalization"] == 1  # what ORT does to Add
    assert keep_layernorm_unfused(model) == 1
    onnx.save(model, str(tmp_path / "sum.onnx"))
    run = _plain_run_graph(tmp_path / "sum.onnx", tmp_path)
    assert run["SkipLayerNormalization"] == 0 and run["LayerNormalization"] == 1 and run["Sum"] == 1
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal((3, 4, 16), dtype=np.float32) for k in ("x", "s")}
    a = ort.InferenceSession(str(tmp_path / "add.onnx"), providers=["CPUExecutionProvider"],
                             disabled_optimizers=["SkipLayerNormFusion"]).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "sum.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(a, b)


def test_an_add_read_elsewhere_too_stays_add():
    model = _residual_layernorm()
    model.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))
    assert keep_layernorm_unfused(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Add", "LayerNormalization"]


def test_exported_int8_encoder_runs_its_fast_graph_in_a_plain_session(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids, mask = torch.randint(1, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    q = st.quantize(Encoder().eval(), {"activations": {"dynamic": True, "per_token": False}}, progress=False)
    path = st.export_onnx(q, tmp_path / "enc.onnx", batch)
    run = _plain_run_graph(path, tmp_path)
    # 1 layer x 2 residual LayerNorms + the embeddings' one, none fused into the slow kernel
    assert run["SkipLayerNormalization"] == 0 and run["LayerNormalization"] == 3
    assert run["MatMulIntegerToFloat"] + run["DynamicQuantizeMatMul"] == 6  # every Linear an integer kernel
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, q(**batch).numpy(), rtol=1e-3, atol=1e-3)


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_weight_only_conv_weights_are_float_in_the_file_and_static_convs_stay_integer(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic: "activations apply to Linear layers only" for the conv
        weight_only = st.quantize(_ConvNet().eval(), {"activations": None}, progress=False)
        static = st.quantize(_ConvNet().eval(), {}, data=[x], progress=False)
    path = st.export_onnx(weight_only, tmp_path / "wo.onnx", x)
    file_ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    run = _plain_run_graph(path, tmp_path)
    assert run["DequantizeLinear"] == file_ops["DequantizeLinear"]  # only the fc's, which ORT keeps cheaply
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    weight = next(i for i in onnx.load(str(path)).graph.initializer if i.name == conv.input[1])
    assert weight.data_type == TensorProto.FLOAT
    # the float weight is exactly the layer's dequantized int8 weight
    layer = weight_only.conv
    with torch.no_grad():
        np.testing.assert_array_equal(numpy_helper.to_array(weight), layer.dequantized_weight().numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                                   weight_only(x).numpy(), rtol=1e-4, atol=1e-4)
    static_path = st.export_onnx(static, tmp_path / "static.onnx", x)
    assert _plain_run_graph(static_path, tmp_path)["QLinearConv"] == 1


def test_fold_leaves_blocked_and_activation_dequantize_alone():
    q = numpy_helper.from_array(np.ones((4, 2, 1, 1), dtype=np.int8), "q")
    s = numpy_helper.from_array(np.full(4, 0.5, dtype=np.float32), "s")
    xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "c", [xin], [y], [q, s]))
    blocked = onnx.ModelProto()
    blocked.CopyFrom(model)
    blocked.graph.node[0].attribute.append(helper.make_attribute("block_size", 2))
    assert fold_weight_dequantize(blocked) == 0
    assert fold_weight_dequantize(model) == 1
    (w,) = [i for i in model.graph.initializer if i.name == "w"]
    np.testing.assert_array_equal(numpy_helper.to_array(w), np.full((4, 2, 1, 1), 0.5, dtype=np.float32))

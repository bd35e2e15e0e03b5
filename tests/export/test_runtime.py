"""ort_session: the graph ONNX Runtime runs, and the fusions it leaves out."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import shrinktunnel as st
from shrinktunnel.export import SLOW_FUSIONS, OrtModel, ort_session


def _residual_layernorm(path) -> tuple[np.ndarray, np.ndarray]:
    """Add + LayerNormalization, the pattern ONNX Runtime fuses into SkipLayerNormalization."""
    rng = np.random.default_rng(0)
    gamma, beta = rng.random(16, dtype=np.float32) + 0.5, rng.standard_normal(16).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 16])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["b", 4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Add", ["x", "s"], ["t"]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "ln", [x, s], [y], [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return gamma, beta


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_ort_session_is_a_plain_session_and_slow_fusions_can_be_left_out(tmp_path):
    gamma, beta = _residual_layernorm(tmp_path / "m.onnx")
    assert "SkipLayerNormFusion" in SLOW_FUSIONS
    plain = ort_session(tmp_path / "m.onnx", optimized_model_path=tmp_path / "plain.onnx")
    unfused = ort_session(tmp_path / "m.onnx", disabled_optimizers=SLOW_FUSIONS, optimized_model_path=tmp_path / "u.onnx")
    assert "SkipLayerNormalization" in _ops(tmp_path / "plain.onnx")  # what a user's default session does
    assert "SkipLayerNormalization" not in _ops(tmp_path / "u.onnx")
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((3, 4, 16), dtype=np.float32), "s": rng.standard_normal((3, 4, 16), dtype=np.float32)}
    expected = torch.nn.functional.layer_norm(torch.from_numpy(feed["x"] + feed["s"]), (16,), torch.from_numpy(gamma),
                                              torch.from_numpy(beta), eps=1e-12).numpy()
    for session in (plain, unfused):
        np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_ort_model_passes_session_options_through(tmp_path):
    _residual_layernorm(tmp_path / "m.onnx")
    OrtModel(tmp_path / "m.onnx", threads=1, disabled_optimizers=SLOW_FUSIONS, optimized_model_path=tmp_path / "o.onnx")
    assert "SkipLayerNormalization" not in _ops(tmp_path / "o.onnx")


def test_fold_weights_folds_dequantized_conv_weights_of_files_from_other_tools(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from shrinktunnel.export.runtime import weights_only_qdq

    q = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4, 1, 1), "q")
    sc = numpy_helper.from_array(np.full(4, 0.25, dtype=np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0), helper.make_node("Conv", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [q, sc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert weights_only_qdq(tmp_path / "m.onnx")
    ort_session(tmp_path / "m.onnx", threads=1, optimized_model_path=tmp_path / "plain.onnx")
    ort_session(tmp_path / "m.onnx", threads=1, fold_weights=True, optimized_model_path=tmp_path / "folded.onnx")
    assert "DequantizeLinear" in _ops(tmp_path / "plain.onnx")
    assert "DequantizeLinear" not in _ops(tmp_path / "folded.onnx")

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


def test_slow_skip_layernorm_fusion_is_left_out_by_default_and_outputs_are_unchanged(tmp_path):
    gamma, beta = _residual_layernorm(tmp_path / "m.onnx")
    assert "SkipLayerNormFusion" in SLOW_FUSIONS
    ours = ort_session(tmp_path / "m.onnx", optimized_model_path=tmp_path / "ours.onnx")
    fused = ort_session(tmp_path / "m.onnx", disabled_optimizers=(), optimized_model_path=tmp_path / "fused.onnx")
    assert "SkipLayerNormalization" not in _ops(tmp_path / "ours.onnx")
    assert "SkipLayerNormalization" in _ops(tmp_path / "fused.onnx")  # what ORT does by default
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((3, 4, 16), dtype=np.float32), "s": rng.standard_normal((3, 4, 16), dtype=np.float32)}
    expected = torch.nn.functional.layer_norm(torch.from_numpy(feed["x"] + feed["s"]), (16,), torch.from_numpy(gamma),
                                              torch.from_numpy(beta), eps=1e-12).numpy()
    for session in (ours, fused):
        np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_ort_model_passes_session_options_through(tmp_path):
    _residual_layernorm(tmp_path / "m.onnx")
    OrtModel(tmp_path / "m.onnx", threads=1, disabled_optimizers=(), optimized_model_path=tmp_path / "o.onnx")
    assert "SkipLayerNormalization" in _ops(tmp_path / "o.onnx")


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("config, folded", [({"activations": None}, True),
                                            ({"activations": {"dynamic": True, "per_token": False}}, True),
                                            ({}, False)], ids=["weight-only", "dynamic", "static"])
def test_weight_only_conv_weights_are_folded_to_float_in_the_session(tmp_path, config, folded):
    import warnings

    import onnx

    from shrinktunnel.export import ort_session
    from shrinktunnel.export.runtime import weights_only_qdq

    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic: "activations apply to Linear layers only" for the conv
        q = st.quantize(_ConvNet().eval(), config, data=[x], progress=False)
    path = st.export_onnx(q, tmp_path / "m.onnx", x)
    assert weights_only_qdq(path) is folded
    ort_session(path, threads=1, optimized_model_path=tmp_path / "run.onnx")
    run_ops = [n.op_type for n in onnx.load(str(tmp_path / "run.onnx")).graph.node]
    if folded:  # a float weight for the conv: no DequantizeLinear runs (static keeps QDQ for integer kernels)
        assert "DequantizeLinear" not in run_ops
    else:
        assert "QLinearConv" in run_ops
    session = ort_session(path, threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], q(x).numpy(),
                                   rtol=1e-3, atol=1e-3)
    assert not weights_only_qdq(st.export_onnx(_ConvNet().eval(), tmp_path / "fp32.onnx", x))

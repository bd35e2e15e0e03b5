"""An imported graph through the tunnel and back out: export with the original names and dynamic dims,
the artifact round trip, and int8 on the ONNX graph itself (quantize_onnx) with our calibrators."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import shrinktunnel as st
from shrinktunnel.onnx_input import load_onnx
from shrinktunnel.onnx_input.ort_quant import quantize_onnx

import graphs


def _io(path) -> list[tuple[str, list]]:
    g = onnx.load(str(path), load_external_data=False).graph
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in list(g.input) + list(g.output)]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # torch.export + onnxscript (~10 s here); benchmarks/onnx_input.py exports every packaged model
def test_export_keeps_names_dynamic_dims_and_values(tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(graphs.two_in_two_out(17), str(src))
    m = load_onnx(src)
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.int64)
    out = st.export_onnx(m, tmp_path / "back.onnx", {"ids": ids, "mask": mask})
    assert _io(out) == _io(src) == [("ids", ["batch", "seq"]), ("mask", ["batch", "seq"]),
                                    ("hidden", ["batch", "seq", 24]), ("pooled", ["batch", 24])]
    feeds = {"ids": np.random.default_rng(0).integers(0, 50, (3, 9)), "mask": np.ones((3, 9), np.int64)}  # other sizes
    for a, b in zip(_session(src).run(None, feeds), _session(out).run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_artifact_round_trip_rebuilds_from_the_onnx_file(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(graphs.cnn(17), str(src))
    m = load_onnx(src)
    x = torch.randn(8, 3, 16, 16)
    result = st.compress(m, [{"quantize": {}}], data=[x])
    result.save(tmp_path / "art")
    back = st.load(tmp_path / "art", model=load_onnx(src))
    with torch.no_grad():
        assert torch.equal(back(x), result.model(x))


@pytest.mark.slow  # int8 export through torch.export (~20 s here); benchmarks/onnx_input.py runs it on every packaged model
def test_int8_export_keeps_names_and_runs_in_onnx_runtime(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(graphs.cnn(17, nhwc=True), str(src))
    x = torch.randn(8, 16, 16, 3)
    q = st.quantize(load_onnx(src), st.QuantConfig(), data=[x])
    out = st.export_onnx(q, tmp_path / "q.onnx", x)
    assert _io(out) == _io(src)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    got = _session(out).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(got - ref).max() < 0.05


def test_restore_io_renames_by_position_and_moves_a_clashing_value(tmp_path):
    from onnx import TensorProto, helper

    from shrinktunnel.onnx_input.export_back import restore_io
    from shrinktunnel.onnx_input.graph_module import OriginalIO

    nodes = [helper.make_node("Relu", ["inputs_0"], ["x"]), helper.make_node("Neg", ["x"], ["out0"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("inputs_0", TensorProto.FLOAT, ["s0", 4])],
                          [helper.make_tensor_value_info("out0", TensorProto.FLOAT, ["s0", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "e.onnx"))
    restore_io(tmp_path / "e.onnx", OriginalIO([("x", ["batch", 4], 1)], [("y:0", ["batch", 4], 1)], 17))
    assert _io(tmp_path / "e.onnx") == [("x", ["batch", 4]), ("y:0", ["batch", 4])]
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(_session(tmp_path / "e.onnx").run(None, {"x": x})[0], -np.maximum(x, 0))


def _heavy_tailed_batches(n: int = 2):
    torch.manual_seed(0)
    return [torch.distributions.StudentT(2.0).sample((8, 3, 16, 16)) for _ in range(n)]


def test_quantize_onnx_with_our_calibrators(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(graphs.cnn(17), str(src))
    data = _heavy_tailed_batches()
    feeds = {"x": data[0].numpy()}
    ref = _session(src).run(None, feeds)[0]
    for calibrator in ("minmax", "entropy"):
        info = quantize_onnx(src, tmp_path / f"{calibrator}.onnx", data, calibrator=calibrator, bins=256)
        assert info["quantized_tensors"] > 5 and info["left_float"] == []
        model = onnx.load(str(tmp_path / f"{calibrator}.onnx"))
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 4
        assert [i.name for i in model.graph.input] == ["x"]
        got = _session(tmp_path / f"{calibrator}.onnx").run(None, feeds)[0]
        cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
        assert cos > 0.98, (calibrator, cos)
    scales = {}
    for calibrator in ("minmax", "entropy"):
        g = onnx.load(str(tmp_path / f"{calibrator}.onnx")).graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
        first_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        scales[calibrator] = float(inits[first_q.input[1]])
    assert scales["entropy"] < 0.5 * scales["minmax"]  # the input's heavy tails clipped by the KL threshold, not kept


def test_quantize_onnx_refuses_bad_input(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    with pytest.raises(st.ModelError, match="not an ONNX model"):
        quantize_onnx(tmp_path / "bad.onnx", tmp_path / "q.onnx", [torch.zeros(1)])
    onnx.save(graphs.cnn(17), str(tmp_path / "cnn.onnx"))
    with pytest.raises(st.ConfigError, match="calibrator 'kl' is unknown"):
        quantize_onnx(tmp_path / "cnn.onnx", tmp_path / "q.onnx", [torch.zeros(1, 3, 16, 16)], calibrator="kl")
    with pytest.raises(st.DataError, match="cannot run"):
        quantize_onnx(tmp_path / "cnn.onnx", tmp_path / "q.onnx", [torch.zeros(1, 5)])
    assert not (tmp_path / "q.onnx").exists()
    from shrinktunnel.onnx_input.__main__ import main

    assert main([str(tmp_path / "bad.onnx"), "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "q.onnx")]) == 2

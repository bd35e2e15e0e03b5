"""ONNX export: fp32 matches PyTorch, QDQ graphs hold int8 weights with the layer's own scales, the QDQ
graph computes exactly what the PyTorch simulation computes, dynamic batch, atomic writes.

Exports take seconds each: every exported model is built once per module (module-scoped fixtures).
"""

import platform
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import shrinktunnel as st
from conftest import CASES, hidden_entries, quantized_layers
from shrinktunnel.export import OrtModel, ort_session
from shrinktunnel.errors import ExportError

QUANT_CASES = ["flatten", "residual", "conv1d", "grouped_conv", "attention"]


def _torch(model, x):
    with torch.no_grad():
        return model(x).numpy()


def _session(path, level):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _constants(graph) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _u8s8_kernels_may_saturate() -> bool:
    """x86-64 without VNNI: ONNX Runtime's u8 x s8 integer kernels sum pairs of products in int16
    (vpmaddubsw), which saturates for full-range int8 weights (ORT's docs advise reduce_range there)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "vnni" not in flags


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_exports(tmp_path_factory):
    out = {}
    for name in ("flatten", "attention"):
        case = CASES[name]
        model, data = case.model(), case.batches()
        path = tmp_path_factory.mktemp("fp32") / f"{name}.onnx"
        # Exported from a batch of ONE: the exporter must still keep the batch dimension dynamic.
        st.export_onnx(model, path, data[0][:1])
        out[name] = (model, data, path)
    return out


HAS_VNNI = any(flag in open("/proc/cpuinfo").read().split() for flag in ("avx512_vnni", "avx_vnni")) \
    if __import__("os").path.exists("/proc/cpuinfo") else True


@pytest.fixture(scope="module", params=QUANT_CASES)
def qdq(request, tmp_path_factory):
    case = CASES[request.param]
    model, data = case.model(), case.batches()
    path = tmp_path_factory.mktemp("qdq") / f"{case.name}.onnx"
    # Without VNNI, ONNX Runtime's u8s8 kernels sum pairs of products in 16 bits and saturate on
    # full-range int8 weights; 7-bit weights (reduce_range) cannot saturate, so the fused runtime then
    # follows the simulation on any x86 CPU.
    cfg = st.QuantConfig(weights={"reduce_range": not HAS_VNNI})
    if case.name == "flatten":  # one export goes through a Result, as the README shows
        result = st.compress(model, [cfg], data=data, progress=False)
        q = result.model
        st.export_onnx(result, path, example_inputs=data[0])
    else:
        q = st.quantize(model, cfg, data=data, progress=False)
        st.export_onnx(q, path, example_inputs=data[0])
    return case, q, data, path


# -- fp32 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flatten", "attention"])
@pytest.mark.parametrize("batch", [7, 1, 16])
def test_fp32_export_matches_pytorch_at_any_batch(fp32_exports, name, batch):
    model, data, path = fp32_exports[name]
    x = torch.cat(data)[:batch]
    got = OrtModel(path)(x).numpy()
    assert got.shape == _torch(model, x).shape
    assert np.abs(got - _torch(model, x)).max() <= 1e-4


def test_fp32_export_is_a_valid_float_graph(fp32_exports):
    _, _, path = fp32_exports["flatten"]
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["Conv"] == 1 and ops["Gemm"] + ops["MatMul"] == 1
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # symbolic batch dimension


# -- QDQ --------------------------------------------------------------------------------------------
def test_qdq_graph_has_quantize_and_dequantize_nodes(qdq):
    case, q, _, path = qdq
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = Counter(n.op_type for n in graph.graph.node)
    layers = quantized_layers(q)
    assert ops["QuantizeLinear"] >= len(layers)  # at least every layer's input quantizer
    assert ops["DequantizeLinear"] >= 2 * len(layers)  # its input and its weight


def test_weights_are_int8_initializers_with_the_layers_exact_scales(qdq):
    case, q, _, path = qdq
    graph = onnx.load(str(path)).graph
    consts = _constants(graph)
    inits = {i.name: i for i in graph.initializer}
    for name, layer in quantized_layers(q).items():
        key = f"{name}.qweight"
        assert inits[key].data_type == onnx.TensorProto.INT8
        assert np.array_equal(consts[key], layer.qweight.numpy())
        (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == key]
        scale, zero_point = consts[dq.input[1]], consts[dq.input[2]]
        assert scale.dtype == np.float32 and np.array_equal(scale, layer.weight_scale.numpy())  # exactly
        assert zero_point.dtype == np.int8 and not zero_point.any()
        assert {a.name: a.i for a in dq.attribute}.get("axis") == 0  # per output channel
    # No float copy of any weight survives in the file: the int8 tensors are the only weights.
    weight_shapes = {tuple(layer.qweight.shape) for layer in quantized_layers(q).values()}
    float_tensors = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not [i.name for i in float_tensors if tuple(i.dims) in weight_shapes and len(i.dims) > 1]


def test_activation_quantizers_carry_the_calibrated_scales(qdq):
    case, q, _, path = qdq
    graph = onnx.load(str(path)).graph
    consts = _constants(graph)
    exported = {(float(consts[n.input[1]]), int(consts[n.input[2]])) for n in graph.node if n.op_type == "QuantizeLinear"}
    for layer in quantized_layers(q).values():
        for aq in (layer.input_quant, layer.output_quant):
            assert (aq.scale, aq.zero_point) in exported


def test_qdq_graph_computes_what_the_simulation_computes(qdq):
    """Executed node by node (no fusion), the QDQ graph is the simulation: at most one output
    quantization step apart (a value on a rounding boundary), measured today: 0 steps everywhere."""
    case, q, data, path = qdq
    x = torch.cat(data)
    sim = _torch(q, x)
    got = _run(_session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), x)
    step = list(quantized_layers(q).values())[-1].output_quant.scale
    assert np.abs(got - sim).max() <= 1.0 * step + 1e-6
    assert (got.argmax(-1) == sim.argmax(-1)).mean() >= 0.99


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_qdq_export_has_a_dynamic_batch(qdq, batch):
    case, q, data, path = qdq
    x = torch.cat(data)[:batch]
    got = _run(_session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), x)
    assert got.shape == _torch(q, x).shape


def test_fused_runtime_stays_within_a_few_steps_of_the_simulation(qdq):
    case, q, data, path = qdq
    x = torch.cat(data)
    sim = _torch(q, x)
    got = _run(ort_session(path, threads=1), x)
    step = list(quantized_layers(q).values())[-1].output_quant.scale
    assert np.abs(got - sim).max() <= 3.0 * step
    assert (got.argmax(-1) == sim.argmax(-1)).mean() >= 0.99


# -- errors and atomicity ---------------------------------------------------------------------------
def _fake_export(kind: str):
    """Stand-ins for torch.onnx.export: one writes half a file and crashes, one writes a well-formed
    ONNX model that ONNX Runtime rejects (an operator that does not exist)."""

    def export(module, args, f, **kwargs):
        if kind == "exporter-raises":
            Path(f).write_bytes(b"half of an onnx file")
            raise RuntimeError("exporter crashed (simulated)")
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
        graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="no.such.domain")], "g", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("no.such.domain", 1)]), f)

    return export


@pytest.mark.parametrize("kind, fragment", [("exporter-raises", "exporter crashed"), ("runtime-rejects", "ONNX Runtime rejects")])
def test_failed_export_leaves_nothing(tmp_path, monkeypatch, kind, fragment):
    monkeypatch.setattr(torch.onnx, "export", _fake_export(kind))
    target = tmp_path / "sub" / "m.onnx"
    with pytest.raises(ExportError) as info:
        st.export_onnx(CASES["flatten"].model(), target, torch.randn(2, 1, 10, 10))
    assert fragment in str(info.value)
    assert not target.exists()
    assert hidden_entries(target.parent) == [] and list(target.parent.iterdir()) == []


def test_failed_export_keeps_an_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    monkeypatch.setattr(torch.onnx, "export", _fake_export("exporter-raises"))
    with pytest.raises(ExportError):
        st.export_onnx(CASES["flatten"].model(), target, torch.randn(2, 1, 10, 10))
    assert target.read_bytes() == b"previous export"
    assert hidden_entries(tmp_path) == []


def test_export_rejects_non_modules_and_missing_inputs(tmp_path):
    with pytest.raises(ExportError, match="nn.Module or a Result"):
        st.export_onnx("not a model", tmp_path / "a.onnx", torch.zeros(1))
    with pytest.raises(ExportError, match="example_inputs"):
        st.export_onnx(CASES["flatten"].model(), tmp_path / "b.onnx", None)
    assert list(tmp_path.iterdir()) == []


class _Twins(torch.nn.Module):
    """Two Linears holding equal weights and biases (separate tensors) and a third that differs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) + 2 * self.b(x) + self.c(x)


def test_equal_initializers_are_merged_and_outputs_unchanged(tmp_path):
    # The exporter's optimizer stores equal constants once: what lets q, k and v, which share one
    # smoothing factor, divide their input once in ONNX Runtime (tests/quant/test_smooth.py).
    from shrinktunnel.export import ort_session

    model, x = _Twins().eval(), torch.randn(3, 8)
    path = st.export_onnx(model, tmp_path / "m.onnx", example_inputs=x)
    shapes = sorted(tuple(i.dims) for i in onnx.load(str(path)).graph.initializer)
    assert shapes.count((8, 8)) == 2 and shapes.count((8,)) == 2  # a's and b's merged; c's kept
    session = ort_session(path, threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], model(x).numpy(),
                                   rtol=1e-5, atol=1e-5)

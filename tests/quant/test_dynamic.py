"""Dynamic activation quantization: exact integer arithmetic, per-token scales, the same numbers in
PyTorch and ONNX Runtime (MatMulInteger), save/load, and the config's bad-input cases."""

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import CASES, sqnr_db
from shrinktunnel.errors import ConfigError
from shrinktunnel.export import ort_session
from shrinktunnel.quant.dynamic import matmul_integer, quantize_dynamic_u8

DYNAMIC = {"activations": {"dynamic": True}}


def _torch(model, x):
    with torch.no_grad():
        return model(x)


def test_matmul_integer_is_exact_at_the_extremes():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 7, 1024), generator=g, dtype=torch.uint8)
    a[0, 0] = 255
    b = torch.randint(-128, 128, (1024, 9), generator=g, dtype=torch.int8)
    b[:, 0] = -128
    expected = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
    got = matmul_integer(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, expected)
    assert got[0, 0, 0] == 255 * -128 * 1024


def test_dynamic_quantization_is_per_row_and_represents_zero_exactly():
    x = torch.tensor([[0.0, 1.0, -3.0, 2.5], [0.0, 0.0, 0.0, 0.0], [100.0, 50.0, 0.0, 25.0]])
    q, scale, zp = quantize_dynamic_u8(x)
    assert q.dtype == torch.uint8 and scale.shape == (3, 1) and zp.shape == (3, 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    # zero maps to the zero point exactly in every row (padding tokens, ReLU zeros)
    zeros = x == 0
    assert torch.equal(q.to(torch.int32)[zeros], zp.expand_as(x)[zeros])
    assert torch.equal(q[1], torch.zeros(4, dtype=torch.uint8))  # an all-zero row stays zero
    deq = (q.to(torch.int32) - zp).float() * scale
    assert (deq - x).abs().max() <= scale.max() / 2 + 1e-6
    # each row's range uses the whole uint8 grid
    assert q[0].min() == 0 and q[0].max() == 255 and q[2].max() == 255


def test_per_token_scales_survive_an_outlier_token_that_per_tensor_does_not():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(4, 10, 32)
    x[0, 3] *= 200  # one token with huge activations (what transformers have)
    ref = _torch(lin, x)
    per_token = st.quantize(lin, DYNAMIC, progress=False)
    per_tensor = st.quantize(lin, {"activations": {"dynamic": True, "per_token": False}}, progress=False)
    ordinary = torch.ones(4, 10, dtype=torch.bool)
    ordinary[0, 3] = False
    good = sqnr_db(ref[ordinary], _torch(per_token, x)[ordinary])
    bad = sqnr_db(ref[ordinary], _torch(per_tensor, x)[ordinary])
    assert good > 30 and good > bad + 15


@pytest.mark.parametrize("name", ["attention", "functional_relu", "flatten"])
def test_dynamic_model_matches_float_and_onnx_runtime_runs_integer_matmuls(name, tmp_path):
    case = CASES[name]
    model = case.model()
    x = case.batches(1, batch=3)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = st.quantize(model, DYNAMIC, progress=False)
    ref, got = _torch(model, x), _torch(q, x)
    assert sqnr_db(ref, got) > 25
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # convolutions keep float activations, and say so
        assert any(conv in str(w.message) and "Linear layers only" in str(w.message) for w in caught)
    path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert ops.count("MatMulInteger") == linears
    session = ort_session(path, threads=1)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, got.numpy(), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    case = CASES["attention"]
    q = st.quantize(case.model(), DYNAMIC, progress=False)
    x = case.batches(1)[0]
    st.save(q, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=case.model())
    assert torch.equal(_torch(loaded, x), _torch(q, x))


def test_dynamic_needs_no_calibration_data_and_runs_in_a_recipe():
    case = CASES["attention"]
    x = case.batches(2)
    result = st.compress(case.model(), [{"quantize": DYNAMIC}], data=x, progress=False)
    layers = [m for m in result.model.modules() if getattr(m, "input_dynamic", None)]
    assert len(layers) == 4
    assert all(layer.qweight.dtype == torch.int8 for layer in layers)


@pytest.mark.parametrize("config, message", [
    ({"dynamic": True, "symmetric": True}, "only apply to static"),
    ({"dynamic": True, "calibrator": "entropy"}, "only apply to static"),
    ({"per_token": False}, "per_token only applies to dynamic"),
])
def test_bad_activation_configs_name_the_fix(config, message):
    with pytest.raises(ConfigError, match=message):
        st.QuantConfig(activations=config)


@pytest.mark.parametrize("weights", [{"symmetric": False}, {"granularity": "per_group", "group_size": 4, "bits": 4}])
def test_dynamic_needs_symmetric_per_channel_weights(weights):
    with pytest.raises(ConfigError, match="dynamic activations need symmetric weights"):
        st.quantize(CASES["attention"].model(), {"weights": weights, **DYNAMIC}, progress=False)


def test_dynamic_with_sub_byte_weights_keeps_them_packed():
    case = CASES["attention"]
    q = st.quantize(case.model(), {"weights": {"bits": 4}, **DYNAMIC}, progress=False)
    layer = q.q
    assert layer.packed and layer.input_dynamic == {"per_token": True}
    x = case.batches(1)[0]
    assert sqnr_db(_torch(case.model(), x), _torch(q, x)) > 10
    assert not math.isnan(float(_torch(q, x).sum()))


@pytest.mark.parametrize("name, inputs", [("attention", 2), ("flatten", 1)])
def test_per_tensor_dynamic_quantizes_each_input_once_in_onnx_runtime(name, inputs, tmp_path):
    # Each Linear exports as DynamicQuantizeLinear + ONNX Runtime's MatMulIntegerToFloat (u8s8 GEMM and
    # rescale in one kernel). The quantizations of one tensor are merged (attention: q, k, v read x),
    # and ONNX Runtime fuses a quantization with its only reader into DynamicQuantizeMatMul: one
    # quantization per distinct input, one integer kernel per Linear, no elementwise quantization ops.
    case = CASES[name]
    model = case.model()
    x = case.batches(1, batch=3)[0]
    q = st.quantize(model, {"activations": {"dynamic": True, "per_token": False}}, progress=False)
    assert sqnr_db(_torch(model, x), _torch(q, x)) > 25
    path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    exported = [n.op_type for n in onnx.load(str(path)).graph.node]
    # The exporter's optimizer already merges identical quantizations; ONNX Runtime would too.
    assert exported.count("MatMulIntegerToFloat") == linears and exported.count("DynamicQuantizeLinear") == inputs
    assert not any(t in exported for t in ("MatMulInteger", "ReduceMin", "Round"))
    session = ort_session(path, threads=1, optimized_model_path=tmp_path / "ran.onnx")
    ran = [n.op_type for n in onnx.load(str(tmp_path / "ran.onnx")).graph.node]
    assert ran.count("DynamicQuantizeMatMul") + ran.count("MatMulIntegerToFloat") == linears
    assert ran.count("DynamicQuantizeMatMul") + ran.count("DynamicQuantizeLinear") == inputs
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, _torch(q, x).numpy(), rtol=1e-4, atol=1e-4)

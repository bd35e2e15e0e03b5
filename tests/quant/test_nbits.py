"""4-bit per-group Linears export as ONNX Runtime's MatMulNBits, and compute what PyTorch computes."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.export import ort_session
from shrinktunnel.quant.nbits import exports_as_nbits, matmul_nbits, nbits_layout


def _model():
    torch.manual_seed(0)
    # in_features 96 with groups of 32: an odd number of groups per row (zero points padded to bytes)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.Conv1d(7, 7, 1)).eval()


def _int4(group_size, symmetric=True, activations=None):
    return {"weights": {"bits": 4, "granularity": "per_group", "group_size": group_size, "symmetric": symmetric},
            "activations": activations, "layers": ["0", "2"]}


@pytest.mark.parametrize("symmetric", [True, False])
def test_layout_round_trips_through_the_eager_kernel(symmetric):
    q = st.quantize(_model(), _int4(32, symmetric), progress=False)
    layer = q[2]
    b, scales, zps = nbits_layout(layer.integer_weight(), layer.weight_scale, layer.weight_zero_point,
                                  signed=symmetric)
    assert b.dtype == torch.uint8 and b.shape == (32, 3, 16) and scales.shape == (96,) and zps.shape == (32 * 2,)
    x = torch.randn(5, 96)
    expected = x @ layer.dequantized_weight().t()
    torch.testing.assert_close(matmul_nbits(x, b, scales, zps, 96, 32, 32), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetric, activations", [(True, None), (False, None), (True, {})])
def test_export_runs_matmulnbits_in_onnx_runtime_with_pytorch_numerics(symmetric, activations, tmp_path):
    x = torch.randn(3, 7, 64)
    q = st.quantize(_model(), _int4(32, symmetric, activations), data=[x], progress=False)
    with pytest.warns(UserWarning, match="MatMulNBits"):
        path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    nodes = onnx.load(str(path)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(n.domain == "com.microsoft" for n in nbits)
    session = ort_session(path, threads=1)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, q(x).numpy(), rtol=1e-5, atol=1e-5)


def test_groups_onnx_runtime_cannot_block_export_dequantized_with_a_note(tmp_path):
    x = torch.randn(3, 7, 64)
    q = st.quantize(_model(), _int4(8), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    assert any("export dequantized" in str(w.message) for w in caught)
    assert not any(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node)


def test_which_formats_export_as_matmulnbits():
    assert exports_as_nbits("linear", 4, "per_group", 32)
    assert exports_as_nbits("linear", 4, "per_group", 128)
    assert not exports_as_nbits("linear", 4, "per_group", 8)  # ONNX Runtime needs blocks >= 16
    assert not exports_as_nbits("linear", 4, "per_group", 48)  # ... and a power of two
    assert not exports_as_nbits("linear", 4, "per_channel", None)
    assert not exports_as_nbits("linear", 3, "per_group", 32)
    assert not exports_as_nbits("conv1d", 4, "per_group", 32)

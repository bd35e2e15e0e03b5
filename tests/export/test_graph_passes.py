"""export.graph_passes: constant scales folded into earlier constant factors, exactly, and only where safe."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import shrinktunnel as st
from shrinktunnel.export import ort_session
from shrinktunnel.export.graph_passes import fold_constant_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def _gelu_then_scale(r_shape=(2, 3, 4), extra_reader=False, chains=1):
    """out_k = (P * (0.5 * Erf(R))) * v_k for `chains` chains sharing the constant 0.5."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Erf", ["R"], ["erf"])]
    outputs = [helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, [2, 3, 4]) for k in range(chains)]
    for k in range(chains):
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"v{k}"))
        nodes += [helper.make_node("Mul", ["half", "erf"], [f"q{k}"]),
                  helper.make_node("Mul", ["P", f"q{k}"], [f"x{k}"]),
                  helper.make_node("Mul", [f"x{k}", f"v{k}"], [f"out{k}"])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [2, 3, 4]))
        nodes.append(helper.make_node("Neg", ["x0"], ["side"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("P", TensorProto.FLOAT, [2, 3, 4]),
                                           helper.make_tensor_value_info("R", TensorProto.FLOAT, list(r_shape))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    s = ort_session(path, threads=1)
    feed = {i.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
            for i in s.get_inputs()}
    return s.run(None, feed)


def _muls(model):
    return sum(n.op_type == "Mul" for n in model.graph.node)


@pytest.mark.parametrize("chains", [1, 2])
def test_a_scale_after_a_gelu_like_chain_is_folded_exactly(tmp_path, chains):
    model = _gelu_then_scale(chains=chains)
    before = _run(model, tmp_path, "before")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_constant_scales(folded) == chains
    onnx.checker.check_model(folded)
    assert _muls(folded) == _muls(model) - chains
    assert "half" not in {i.name for i in folded.graph.initializer}  # the shared 0.5 is replaced in every chain
    for a, b in zip(before, _run(folded, tmp_path, "after")):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_an_intermediate_read_elsewhere_is_left_alone():
    model = _gelu_then_scale(extra_reader=True)
    assert fold_constant_scales(model) == 0


def test_a_scale_that_would_grow_a_broadcast_is_left_alone():
    # R is [2, 3, 1]: 0.5 * Erf(R) broadcasts against P; a [4] scale there would change its shape.
    assert fold_constant_scales(_gelu_then_scale(r_shape=(2, 3, 1))) == 0


class _SmoothedFFN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_smoothquant_after_gelu_exports_without_its_mul_at_opset_18(tmp_path):
    # Opset 18 spells GELU as Div, Erf, Add, Mul, Mul: the smoothing folds into its 0.5. (The default,
    # opset 20, has one Gelu node instead: faster than the fold saves, and the Mul stays.)
    model = _SmoothedFFN().eval()
    data = [torch.randn(8, 5, 16) * torch.linspace(0.1, 8, 16) for _ in range(4)]
    cfg = {"activations": {"dynamic": True, "per_token": False}, "smooth": 0.5}
    q = st.quantize(model, cfg, data=data, progress=False)
    plain = st.quantize(model, {"activations": cfg["activations"]}, progress=False)
    path = st.export_onnx(q, tmp_path / "q.onnx", example_inputs=data[0], opset=18)
    plain_path = st.export_onnx(plain, tmp_path / "plain.onnx", example_inputs=data[0], opset=18)
    # up's input is the model input (no constant factor to fold into): its 1 / s stays; down's goes.
    assert _muls(onnx.load(str(path))) == _muls(onnx.load(str(plain_path))) + 1
    session = ort_session(path, threads=1)
    with torch.no_grad():
        for x in data:
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            np.testing.assert_allclose(got, q(x).numpy(), rtol=1e-3, atol=1e-3)


def test_the_default_opset_exports_gelu_as_one_node(tmp_path):
    path = st.export_onnx(_SmoothedFFN().eval(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 3, 16))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Gelu") == 1 and "Erf" not in ops

"""A method plugs in at one place: a test-only method whose layers call their own torch custom operator
declares how that operator exports (register_onnx_translations) and a report section
(register_method(report=...)); st.compress and st.export_onnx pick both up without any change to
export/ or api.py, and the exported graph runs in ONNX Runtime with PyTorch's outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.config import Config
from shrinktunnel.core.registry import METHODS, ONNX_TRANSLATIONS, ReportSection, register_method, register_onnx_translations
from shrinktunnel.core.select import select_modules, set_submodule
from shrinktunnel.errors import ExportError


@torch.library.custom_op("shrinktunnel_test::scaled_linear", mutates_args=())
def scaled_linear(x: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    return (x @ w.t()) * scale


@scaled_linear.register_fake
def _(x, w, scale):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


class ScaledLinear(nn.Module):
    """Weights stored divided by 2, the product scaled back: the same function through a custom op."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("half_weight", weight.detach() / 2)

    def forward(self, x):
        return scaled_linear(x, self.half_weight, 2.0)


class ScaleConfig(Config):
    layers: list[str] = ["*"]


def _apply(model, cfg, ctx):
    model = copy.deepcopy(model)
    done = []
    for name, m in select_modules(model, (nn.Linear,), cfg.layers):
        if m.bias is None:
            set_submodule(model, name, ScaledLinear(m.weight))
            done.append([name, m.out_features, m.in_features])
    return model, {"layers": done}


def _replay(model, replay):
    for name, n_out, n_in in replay["layers"]:
        set_submodule(model, name, ScaledLinear(torch.zeros(n_out, n_in)))
    return model


def _translations() -> dict:
    from onnxscript import opset18 as op

    def _scaled_linear(x, w, scale: float):
        return op.Mul(op.MatMul(x, op.Transpose(w, perm=[1, 0])), op.Constant(value_float=scale))

    return {torch.ops.shrinktunnel_test.scaled_linear.default: _scaled_linear}


@pytest.fixture
def scale_method():
    section = ReportSection("scaled_layers", lambda model: [n for n, m in model.named_modules() if isinstance(m, ScaledLinear)] or None)
    register_method("test_scale", ScaleConfig, replay=_replay, report=section)(_apply)
    try:
        yield
    finally:
        METHODS.pop("test_scale")
        if _translations in ONNX_TRANSLATIONS:
            ONNX_TRANSLATIONS.remove(_translations)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()


def test_a_method_declares_its_report_section_and_onnx_translation(scale_method, tmp_path):
    model, x = _model(), torch.randn(3, 8)
    result = st.compress(model, [{"test_scale": {}}], example_inputs=x, progress=False)
    assert result.metrics["after"]["scaled_layers"] == ["0", "2"]  # the declared section, nothing in api.py
    assert "scaled_layers" not in result.metrics["before"]
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-6, atol=1e-6)

    with pytest.raises(ExportError):  # undeclared, the custom op has no ONNX
        st.export_onnx(result, tmp_path / "none.onnx", example_inputs=x)
    register_onnx_translations(_translations)
    path = st.export_onnx(result, tmp_path / "m.onnx", example_inputs=x)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Mul"} <= ops
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, result.model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_report_sections_of_builtin_methods_come_from_registration():
    from shrinktunnel.core.registry import report_sections

    assert "weight_sharing" in {s.key for s in report_sections()}  # cluster declares it


def test_register_method_refuses_a_report_that_is_not_a_section():
    from shrinktunnel.errors import ConfigError

    with pytest.raises(ConfigError, match="ReportSection"):
        register_method("test_bad_report", ScaleConfig, replay=_replay, report=lambda m: None)(_apply)
    assert "test_bad_report" not in METHODS

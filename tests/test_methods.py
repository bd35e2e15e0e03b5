"""One conformance suite over every registered method: a new method gets these checks for free.

For each method, as a recipe stage on a small net with the awkward parts (BatchNorm, a residual
ModuleList of blocks, a Conv2d subclass that pads in its own forward): the config survives a JSON
round trip, the caller's model is not changed, the stage records its coverage, save -> load gives
the same outputs bit for bit, and the ONNX export runs in ONNX Runtime with the same outputs.
A registered method missing from the table below fails `test_every_registered_method_is_covered`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.coverage import stage_coverage
from shrinktunnel.core.registry import METHODS, get_method

from conftest import snapshot, state_dicts_equal

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PadConv(nn.Conv2d):
    """Pads in its own forward (timm's Conv2dSame pattern, stride 1)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(PadConv(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(dim=(2, 3)))


# method -> (config, ONNX Runtime tolerance against PyTorch, relative to the output's scale)
CONFIGS: dict[str, tuple[dict, float]] = {
    "quantize": ({}, 2e-2),  # a rounding tie can flip one int8 step
    "cast": ({"format": "float16"}, 1e-5),
    "qat": ({"steps": 3}, 2e-2),
    "distill": ({"steps": 3}, 1e-5),
    "keep_layers": ({}, 1e-5),
    "fuse_ops": ({}, 1e-5),
    "decompose": ({"ratio": 0.5, "keep_if_slower": False}, 1e-5),
    "cluster": ({"bits": 4}, 1e-5),
    "prune": ({"sparsity": 0.5}, 1e-5),
    "prune_channels": ({"ratio": 0.5}, 1e-5),
    # Further configurations of a method: "method[what]" (issue 18's formats).
    "quantize[log2, pow2 scales]": ({"weights": {"format": "log2"},
                                     "overrides": [{"pattern": "head", "weights": {"bits": 8, "scale": "pow2"}}]}, 2e-2),
    "qat[log2 INQ, stochastic binary, int8 gradients]": (
        {"weights": {"format": "log2"}, "inq": [0.5, 1.0], "gradients": "int8", "steps": 3,
         "overrides": [{"pattern": "blocks.*", "weights": {"format": "binary", "stochastic": True}}]}, 2e-2),
}
NOT_STAGES = {"fuse_networks": "st.fuse takes several models; tests/fusion/test_networks.py covers it"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = BlockNet()
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def test_every_registered_method_is_covered():
    get_method("quantize")  # loads the built-in packages
    methods = {key.split("[")[0] for key in CONFIGS}
    assert set(METHODS) == methods | set(NOT_STAGES), "add the new method to CONFIGS (or NOT_STAGES, with why)"


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_method_conformance(method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    config, tolerance = CONFIGS[method]
    method = method.split("[")[0]
    cfg = METHODS[method].config_cls.parse(config)
    assert METHODS[method].config_cls.parse(cfg.to_dict()).to_dict() == cfg.to_dict()  # JSON round trip

    model, data = _model(), _data()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = st.compress(model, [(method, config)], data=data, progress=False)
    assert state_dicts_equal(model, before)  # the caller's model is not changed
    out = result.model
    assert [s.method for s in stage_coverage(out)] == [method]

    x = data[0][0]
    with torch.no_grad():
        y = out(x)
    assert y.shape == (16, 5) and torch.isfinite(y).all()

    path = result.save(tmp_path / "artifact")
    back = st.load(path, model=_model())
    with torch.no_grad():
        assert torch.equal(back(x), y)  # replay + tensors: bit for bit

    onnx_path = st.export_onnx(result, tmp_path / "m.onnx", example_inputs=x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    scale = float(y.abs().max()) or 1.0
    assert np.abs(got - y.numpy()).max() <= tolerance * scale

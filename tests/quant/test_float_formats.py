"""FP16 / BF16 / FP8 weight storage (the `cast` method)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError, DataError
from shrinktunnel.export import OrtModel
from shrinktunnel.quant import FloatWeightLayer

# SQNR floors of the whole model's output against float32, measured then set a few dB below:
# float16 ~75 dB, bfloat16 ~60 dB, e4m3 ~39 dB, e5m2 ~25 dB on the MNIST CNN; the tiny net here is similar.
FLOORS = {"float16": 60.0, "bfloat16": 40.0, "float8_e4m3fn": 28.0, "float8_e5m2": 18.0}
BYTES = {"float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float(((ref - got) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


@pytest.mark.parametrize("fmt", list(FLOORS))
def test_cast_keeps_outputs_and_stores_the_format(fmt, tmp_path):
    model, x = _net(), torch.randn(4, 3, 8, 8)
    c = st.cast(model, {"format": fmt})
    assert isinstance(c[0], FloatWeightLayer) and c[0].stored_weight.dtype == getattr(torch, fmt)
    # `weight` answers as the original layer's would: float32, the values the layer computes with
    assert c[0].weight.dtype == torch.float32 and torch.equal(c[0].weight, c[0].float_weight())
    assert _sqnr(model(x), c(x)) > FLOORS[fmt]
    assert torch.equal(model[0].weight, _net()[0].weight)  # the input model is untouched
    path = st.save(c, tmp_path / "a")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("3.weight")
    assert stored.dtype == getattr(torch, fmt) and stored.element_size() == BYTES[fmt]
    again = st.load(path, model=model)
    assert torch.equal(again(x), c(x))  # bit-exact round trip


@pytest.mark.parametrize("fmt", ["float16", "float8_e4m3fn"])
def test_cast_exports_and_runs_in_onnx_runtime(fmt, tmp_path):
    model, x = _net(), torch.randn(5, 3, 8, 8)
    c = st.cast(model, {"format": fmt})
    path = st.export_onnx(c, tmp_path / "m.onnx", x)
    got = OrtModel(path)(x)
    assert torch.allclose(got, c(x), atol=1e-4, rtol=0)


def test_fp8_scale_maps_each_channel_max_to_the_format_max():
    model = _net()
    c = st.cast(model, {"format": "float8_e4m3fn"})
    w = c[3].stored_weight.float().abs().reshape(10, -1).amax(dim=1)
    assert torch.all(w == torch.finfo(torch.float8_e4m3fn).max)  # 448: the largest magnitude lands exactly on it


def test_cast_bad_input():
    with pytest.raises(ConfigError, match="format"):
        st.CastConfig(format="float4")
    model = _net()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        st.cast(model, {"format": "float16"})
    with pytest.warns(UserWarning, match="matches no module"):
        st.cast(_net(), {"layers": ["nope*"]})


class _TiedLM(nn.Module):
    """An embedding tied to its output projection (tie_word_embeddings), and a second embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=0)
        self.pos = nn.Embedding(8, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("fmt", ["float16", "float8_e4m3fn"])
def test_cast_reaches_embeddings_and_casts_a_tied_table_once(fmt, tmp_path):
    from shrinktunnel.core.coverage import stage_coverage
    from shrinktunnel.core.tied import TiedEmbedding

    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 40, (3, 8))
    out = st.cast(model, {"format": fmt})
    (cov,) = stage_coverage(out)
    assert cov.share == 1.0
    assert isinstance(out.emb, TiedEmbedding) and out.emb.layer is out.head  # one table, two uses
    assert isinstance(out.pos, FloatWeightLayer)
    ref = model(ids)
    tol = 1e-2 if fmt == "float16" else 0.2
    assert (out(ids) - ref).abs().max() <= tol * ref.abs().max()
    path = st.save(out, tmp_path / "a")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tables = [k for k in f.keys() if tuple(f.get_slice(k).get_shape()) == (40, 16)]
    assert len(tables) == 1  # stored once
    assert torch.equal(st.load(path, model=model)(ids), out(ids))

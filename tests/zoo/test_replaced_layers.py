"""A method's layer answers as the layer it replaced: model code reads `weight`, `stride`, `in_features`...
outside the layer's forward (transformers' ViT casts its pixels to `projection.weight.dtype`, T5 its hidden
states to `wo.weight.dtype`, Whisper reads `conv.stride`). Regressions of issue 15's zoo failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.clustering.layer import ClusteredLayer
from shrinktunnel.decomposition.layers import LowRank
from shrinktunnel.quant import FloatWeightLayer
from zoo.models import build, example_inputs, run

pytestmark = pytest.mark.filterwarnings("ignore")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 24)).eval()


def _attrs(m: nn.Module, like: nn.Module) -> dict:
    keys = ("in_features", "out_features") if isinstance(like, nn.Linear) else (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    return {k: getattr(m, k) for k in keys}


METHODS = {
    "cast": (lambda m: st.cast(m, {"format": "float16"}), FloatWeightLayer),
    "cluster": (lambda m: st.cluster(m, st.ClusterConfig(bits=4)), ClusteredLayer),
    "decompose": (lambda m: st.decompose(m, st.DecomposeConfig(ratio=0.5, keep_if_slower=False)), LowRank),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_replaced_layer_answers_the_original_attributes_and_its_float_weight(method):
    model = _net()
    transform, cls = METHODS[method]
    out = transform(model)
    x = torch.randn(2, 3, 8, 8)
    for i in (0, 2, 4):
        layer = out[i]
        assert isinstance(layer, cls), (i, type(layer))
        assert _attrs(layer, model[i]) == _attrs(model[i], model[i])
        w = layer.weight  # an attribute, not a method; float32 like the original's
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.shape == model[i].weight.shape
    # `weight` is what the layer computes with: the original layer's function with that weight
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    conv.load_state_dict({"weight": out[0].weight, "bias": model[0].bias})
    with torch.no_grad():
        torch.testing.assert_close(conv(x), out[0](x), atol=1e-5, rtol=1e-5)
        lin = nn.functional.linear(out[:4](x), out[4].weight, out[4].bias)
        torch.testing.assert_close(lin, out(x), atol=1e-5, rtol=1e-5)


def test_cast_stores_the_narrow_format_and_the_state_dict_keeps_its_name(tmp_path):
    out = st.cast(_net(), {"format": "float16"})
    assert out[0].stored_weight.dtype == torch.float16 and out[0].state_dict()["weight"].dtype == torch.float16
    assert torch.equal(out[0].weight, out[0].stored_weight.float())
    again = st.load(st.save(out, tmp_path / "a"), model=_net())
    assert torch.equal(again[0].stored_weight, out[0].stored_weight)


@pytest.mark.parametrize("name", ["vit", "t5_encoder"])
@pytest.mark.parametrize("method", list(METHODS))
def test_hf_models_reading_weight_dtype_run_after_each_method(name, method):
    model = build(name)
    x = example_inputs(name)
    ref = run(model, x)
    got = run(METHODS[method][0](model), x)
    assert got.dtype == torch.float32 and got.shape == ref.shape and torch.isfinite(got).all()
    if method == "cast":  # float16 weights: the outputs move by float16 rounding only
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()

"""AWQ (quant/awq.py): the scale search never does worse than no scaling on its own rows, clipping
lowers the partial-product error, and `awq: true` gives smoothed layers that save, reload and export."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant.awq import fake_quant, search_clip, search_scale
from shrinktunnel.quant.modules import QuantizedLayer
from shrinktunnel.quant.ops import dequantize_weight, quantize_weight, weight_qparams, weight_qrange

from test_gptq_llm import W4G16, calib, tiny_llama


def _salient(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :4] *= 20  # a few channels carry most of the energy, as in LLM activations
    return x


def test_fake_quant_is_the_layer_arithmetic():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    for sym in (True, False):
        qmin, qmax = weight_qrange(4, sym)
        s, z = weight_qparams(w, qmin, qmax, sym, "per_group", 16)
        dt = torch.int8 if sym else torch.uint8
        ref = dequantize_weight(quantize_weight(w, s, z, qmin, qmax, dt), s, z, qmin, qmax)
        torch.testing.assert_close(fake_quant(w, qmin, qmax, sym, 16), ref, rtol=1e-6, atol=1e-6)


def test_scale_search_beats_no_scaling_on_salient_channels():
    x = _salient()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    qmin, qmax = weight_qrange(3, True)
    s, info = search_scale(x, [w], lambda v: fake_quant(v, qmin, qmax, True, 16))
    assert info["error"] <= info["error_unscaled"] and info["alpha"] > 0
    assert info["error"] < 0.8 * info["error_unscaled"], info
    assert s.shape == (64,) and bool((s[:4] > s[4:].max()).all())  # the salient channels scaled up


def test_clip_search_lowers_the_output_error():
    x = _salient(seed=3)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    w[0, 5] = 8.0  # an outlier weight stretches its group's range
    qmin, qmax = weight_qrange(3, True)
    clipped = search_clip(w, x, qmin, qmax, True, 16)
    err = lambda v: float(((x @ (fake_quant(v, qmin, qmax, True, 16) - w).t()) ** 2).mean())  # noqa: E731
    assert err(clipped) < err(w)
    assert bool((clipped.abs() <= w.abs() + 1e-6).all())


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_awq_on_a_tiny_llama(rounding, tmp_path):
    model = tiny_llama()
    q = st.quantize(model, {**W4G16, "awq": True, "rounding": rounding}, data=calib(), progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == 14  # 7 Linears per block; the tied lm_head stays float (tied: auto)
    assert any(m.spec().get("input_smooth") for m in layers)
    path = tmp_path / "awq"
    st.save(q, path)
    back = st.load(path, model=tiny_llama())
    ids = calib()[1]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, q(ids).logits, rtol=0, atol=0)
        cos = torch.nn.functional.cosine_similarity(q(ids).logits.flatten(), model(ids).logits.flatten(), dim=0)
    assert cos > 0.98, cos


def test_awq_is_weight_only_and_needs_data():
    with pytest.raises(ConfigError, match="awq"):
        st.QuantConfig(awq=True)  # activations quantized by default
    with pytest.raises(Exception, match="calibration data"):
        st.quantize(tiny_llama(), {**W4G16, "awq": True}, progress=False)

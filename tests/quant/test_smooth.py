"""SmoothQuant: the transform is exact in float, it rescues per-tensor activation scales from outlier
channels, alpha is chosen per layer, the result round-trips and exports, and bad configs name the fix."""

import numpy as np
import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import sqnr_db
from shrinktunnel.errors import ConfigError, DataError
from shrinktunnel.export import ort_session
from shrinktunnel.quant.smooth import SmoothObserver, choose_smoothing, smoothing_factors
from shrinktunnel.quant.config import ActivationQuant, WeightQuant


class OutlierNet(nn.Module):
    """A LayerNorm whose output has a few channels ~50x larger than the rest (as in transformers),
    feeding two Linears."""

    def __init__(self, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight[:3] = 50.0
        self.up = nn.Linear(d, 128)
        self.down = nn.Linear(128, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 10, 64, generator=g) for _ in range(n)]


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_smoothing_is_exact_in_float():
    lin = nn.Linear(32, 8)
    x = torch.randn(100, 32) * torch.linspace(0.1, 30, 32)
    s = smoothing_factors(x.abs().amax(0), lin.weight, 0.5)
    assert bool((s > 0).all())
    torch.testing.assert_close((x / s) @ (lin.weight * s).t(), x @ lin.weight.t(), rtol=1e-5, atol=1e-4)


def test_dead_channels_get_factor_one():
    w = torch.randn(4, 6)
    w[:, 2] = 0
    absmax = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0, 6.0])
    s = smoothing_factors(absmax, w, 0.5)
    assert s[2] == 1 and s[3] == 1 and bool(torch.isfinite(s).all())


def test_auto_alpha_never_scores_worse_than_no_smoothing():
    obs = SmoothObserver()
    x = torch.randn(512, 64) * torch.cat([torch.full((3,), 40.0), torch.ones(61)])
    obs.update(x)
    w = torch.randn(32, 64)
    wq, aq = WeightQuant(), ActivationQuant(dynamic=True, per_token=False)
    s, record = choose_smoothing(obs, w, wq, aq, "auto")
    assert s is not None and record["alpha"] is not None
    assert record["error"] < 0.5 * record["error_unsmoothed"]  # outlier channels: smoothing pays a lot
    flat = SmoothObserver()
    flat.update(torch.randn(512, 64))
    _, rec = choose_smoothing(flat, w, wq, aq, "auto")
    assert rec["error"] <= rec["error_unsmoothed"]


def test_observer_memory_is_bounded_by_its_sample():
    obs = SmoothObserver(keep_rows=100)
    for _ in range(50):
        obs.update(torch.randn(8, 30, 16))
    assert obs.sample().shape == (100, 16) and obs.count == 50 * 240


@pytest.mark.parametrize("activations", [{"dynamic": True, "per_token": False}, {"calibrator": "minmax"}])
def test_smoothing_rescues_per_tensor_activations_on_outlier_channels(activations):
    model, data = OutlierNet().eval(), _data()
    x = _data(1, seed=7)[0]
    ref = _out(model, x)
    plain = st.quantize(model, {"activations": activations}, data=data, progress=False)
    smooth = st.quantize(model, {"activations": activations, "smooth": "auto"}, data=data, progress=False)
    plain_db, smooth_db = sqnr_db(ref, _out(plain, x)), sqnr_db(ref, _out(smooth, x))
    assert smooth_db > plain_db + 4, (plain_db, smooth_db)  # >= 2.5x less error power
    assert smooth.up.extra_repr().endswith("smoothed") or "smoothed" in smooth.up.extra_repr()


def test_smoothed_model_round_trips_and_runs_in_onnx_runtime(tmp_path):
    model, data = OutlierNet().eval(), _data()
    q = st.quantize(model, {"activations": {"dynamic": True, "per_token": False}, "smooth": 0.8,
                            "smooth_layers": ["up"]}, data=data, progress=False)
    assert "smoothed" in q.up.extra_repr() and "smoothed" not in q.down.extra_repr()
    x = _data(1, seed=3)[0]
    st.save(q, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=OutlierNet())
    assert torch.equal(_out(loaded, x), _out(q, x))
    path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    session = ort_session(path, threads=1)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, _out(q, x).numpy(), rtol=1e-4, atol=1e-4)


def test_smoothing_composes_with_gptq_and_fallback():
    model, data = OutlierNet().eval(), _data()
    q = st.quantize(model, {"smooth": "auto", "rounding": "gptq", "max_drop": 0.001}, data=data, progress=False)
    x = _data(1, seed=5)[0]
    assert sqnr_db(_out(model, x), _out(q, x)) > 20


@pytest.mark.parametrize("config, message", [
    ({"smooth": 1.5}, "migration strength"),
    ({"smooth": 0.0}, "migration strength"),
    ({"smooth": "auto", "activations": None}, "needs quantized activations"),
])
def test_bad_smooth_configs_name_the_fix(config, message):
    with pytest.raises(ConfigError, match=message):
        st.quantize(OutlierNet(), config, data=_data(1), progress=False)


def test_smoothing_needs_data():
    with pytest.raises(DataError, match="smooth needs calibration data"):
        st.quantize(OutlierNet(), {"smooth": "auto", "activations": {"dynamic": True}}, progress=False)


class SharedInput(nn.Module):
    """q, k and v read one LayerNorm output with outlier channels; o reads the attention output."""

    def __init__(self, d=32):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight[:2] = 40.0
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        return self.o(torch.softmax(q @ k.transpose(-2, -1) / 8, dim=-1) @ v)


def test_layers_reading_one_tensor_share_one_factor_and_one_quantization_in_onnx_runtime(tmp_path):
    import onnx

    model, data = SharedInput().eval(), [torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = {"activations": {"dynamic": True, "per_token": False}, "smooth": "auto"}
    result = st.compress(model, [st.QuantConfig(**cfg)], data=data, progress=False)
    q = result.model
    report = q.__dict__["_shrinktunnel"]["stages"][-1]["replay"]["smoothing_report"]
    assert report["q"]["shared_with"] == ["k", "v"] and "shared_with" not in report["o"]
    assert report["q"]["alpha"] is not None  # the outlier channels make smoothing pay
    assert torch.equal(q.q.input_smooth, q.k.input_smooth) and torch.equal(q.q.input_smooth, q.v.input_smooth)
    x = data[0]
    assert sqnr_db(_out(model, x), _out(q, x)) > 25
    path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    session = ort_session(path, threads=1, optimized_model_path=tmp_path / "ran.onnx")
    ran = [n.op_type for n in onnx.load(str(tmp_path / "ran.onnx")).graph.node]
    # One division of h by s and one quantization of it for q, k and v; one for o's input.
    assert ran.count("DynamicQuantizeLinear") + ran.count("DynamicQuantizeMatMul") == 2
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], _out(q, x).numpy(),
                               rtol=1e-4, atol=1e-4)

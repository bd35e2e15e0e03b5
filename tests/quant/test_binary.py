"""Binary and ternary weights, binary activations: the forward is XNOR-Net's / TWN's / BNN's, the
gradient is exactly the clipped identity's, weights are stored at 1 and 2 bits and unpack exactly,
the trained layer and its conversion compute the same thing bit for bit, artifacts round-trip, ONNX
Runtime matches PyTorch, and bad input fails with typed errors."""

import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from conftest import CASES, quantized_layers, state_dicts_equal
from shrinktunnel.codec import packed_nbytes
from shrinktunnel.errors import ArtifactError, ConfigError
from shrinktunnel.export import OrtModel
from shrinktunnel.quant import QuantizedLayer, WeightQuant
from shrinktunnel.quant.binary import (
    BinaryActivation, binary_weight_params, binarize_activation, fake_binary_weight, quantize_binary_weight,
)
from shrinktunnel.quant.fake_quant import sign_ste, ternary_ste
from shrinktunnel.quant.qat import FakeQuantLayer, constrain

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:export_onnx:UserWarning")


def _net(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def _data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


# -- the estimators -------------------------------------------------------------------------------
def test_sign_gradient_is_the_clipped_identitys_exactly():
    x = torch.tensor([-3.0, -1.0, -0.999, -0.25, 0.0, 0.5, 1.0, 1.0001, 7.0])
    a = x.clone().requires_grad_(True)
    out = sign_ste(a)
    assert out.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1]  # sign(0) = +1: two levels, never 0
    upstream = torch.linspace(-2, 2, 9)
    out.backward(upstream)
    b = x.clone().requires_grad_(True)
    torch.clamp(b, -1, 1).backward(upstream)  # d/dx max(-1, min(1, x))
    assert torch.equal(a.grad, b.grad)
    assert a.grad.tolist() == [0, upstream[1].item(), upstream[2].item(), upstream[3].item(), upstream[4].item(),
                               upstream[5].item(), upstream[6].item(), 0, 0]


def test_ternary_forward_is_twn_and_its_gradient_the_clipped_identitys():
    # One channel, mean |w| = 0.5, threshold 0.35: three weights above it, mean of those |w| = 0.8.
    w = torch.tensor([[0.9, -0.3, 0.0, -0.6, 0.3, 0.9]])
    alpha, threshold = binary_weight_params(w, "ternary", "per_channel")
    assert threshold.item() == pytest.approx(0.35) and alpha.item() == pytest.approx(0.8)
    q, scale, zp = quantize_binary_weight(w, "ternary", "per_channel")
    assert q.tolist() == [[1, 0, 0, -1, 0, 1]] and q.dtype == torch.int8 and torch.equal(scale, alpha)
    assert zp.tolist() == [0]
    a = (w * 2).requires_grad_(True)  # some latent weights beyond +-1
    ternary_ste(a, threshold).backward(torch.ones_like(a))
    b = (w * 2).requires_grad_(True)
    torch.clamp(b, -1, 1).backward(torch.ones_like(b))
    assert torch.equal(a.grad, b.grad)


def test_binary_weight_is_xnor_alpha_sign_and_its_gradient_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g) * torch.tensor([0.1, 0.5, 1.0, 2.0]).view(4, 1, 1, 1)
    alpha = w.abs().mean(dim=(1, 2, 3))
    q, scale, _ = quantize_binary_weight(w, "binary", "per_channel")
    assert torch.equal(scale, alpha) and torch.equal(q, torch.where(w >= 0, 1, -1).to(torch.int8))
    latent = w.clone().requires_grad_(True)
    out = fake_binary_weight(latent, "binary", "per_channel")
    assert torch.equal(out, q.float() * alpha.view(4, 1, 1, 1))
    upstream = torch.randn(w.shape, generator=g)
    out.backward(upstream)
    expected = upstream * alpha.view(4, 1, 1, 1)  # alpha is a constant of the backward pass
    assert torch.equal(latent.grad, torch.where(w.abs() <= 1, expected, torch.zeros_like(expected)))
    assert 0 < int((w.abs() > 1).sum())  # the clip did something
    per_tensor = quantize_binary_weight(w, "binary", "per_tensor")[1]
    assert torch.equal(per_tensor, w.abs().mean().expand(4))


def test_binary_activation_levels_and_gradient():
    x = torch.tensor([-1.0, 0.1, 0.2, 0.5, 0.7, 2.0])
    o, s = torch.tensor(0.2), torch.tensor(0.4)
    assert binarize_activation(x, o, s).tolist() == pytest.approx([-0.2, -0.2, 0.6, 0.6, 0.6, 0.6])
    a = x.clone().requires_grad_(True)
    binarize_activation(a, o, s, ste=True).sum().backward()
    assert a.grad.tolist() == [0, 1, 1, 1, 0, 0]  # 1 where |x - offset| <= scale (scaled clipped identity)
    act = BinaryActivation(0.4, 0.2)
    assert torch.equal(act(x), binarize_activation(x, o, s)) and act.to_dict() == {"format": "binary", "scale": 0.4, "offset": 0.2}


# -- storage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,bits", [("binary", 1), ("ternary", 2)])
def test_weights_pack_at_their_width_and_unpack_exactly(tmp_path, fmt, bits):
    model, data = _net(), _data()
    q = st.qat(model, {"weights": {"format": fmt}, "activations": None, "steps": 2}, data=data, progress=False)
    path = st.save(q, tmp_path / "a")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name, layer in quantized_layers(q).items():
            n = layer.integer_weight().numel()
            packed = f.get_tensor(f"{name}.qweight_packed")
            assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
            assert f"{name}.qweight" not in f.keys()
    for name, layer in quantized_layers(q).items():
        w = layer.integer_weight()
        fresh = QuantizedLayer.from_spec(layer.spec())
        fresh.set_weight(w, layer.weight_scale, layer.weight_zero_point)
        assert torch.equal(fresh.qweight_packed, layer.qweight_packed) and torch.equal(fresh.integer_weight(), w)
        allowed = {-1, 1} if fmt == "binary" else {-1, 0, 1}
        assert set(w.unique().tolist()) <= allowed and w.dtype == torch.int8
    loaded = st.load(path, model=model)
    x = data[0][0]
    assert state_dicts_equal(loaded, q) and torch.equal(loaded(x), q(x))


def test_binary_artifact_is_about_an_eighth_of_int8(tmp_path):
    model, data = _net(), _data()
    int8 = st.quantize(model, {"activations": None}, progress=False)
    binary = st.qat(model, {"weights": {"format": "binary"}, "activations": None, "steps": 1}, data=data, progress=False)
    size = lambda m: sum(v.numel() * v.element_size() for k, v in m.state_dict().items() if "qweight" in k)  # noqa: E731
    assert size(binary) * 8 == pytest.approx(size(int8), abs=8 * 3)  # a byte per layer for the rounding up


# -- training and conversion ----------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    {"weights": {"format": "binary"}},
    {"weights": {"format": "ternary", "granularity": "per_tensor"}},
    {"weights": {"format": "binary"}, "activations": {"format": "binary"}},
    {"weights": {"format": "binary"}, "activations": {"format": "binary", "symmetric": True},
     "overrides": [{"pattern": "0", "weights": {"bits": 8}, "activations": {}},
                   {"pattern": "5", "weights": {"bits": 8}}]},
], ids=["binary-a8", "ternary-per-tensor-a8", "binary-binary", "bnn-first-last-int8"])
def test_trained_binary_layers_convert_bit_exactly_and_round_trip(tmp_path, cfg):
    model, data = _net(), _data()
    prepared = st.prepare_qat(model, cfg, data=data, progress=False)
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(prepared(x), y).backward()
        opt.step()
        constrain(prepared)
    converted = st.convert_qat(prepared)
    x = data[0][0]
    assert torch.equal(prepared(x), converted(x))
    loaded = st.load(st.save(converted, tmp_path / "a"), model=model)
    assert state_dicts_equal(loaded, converted) and torch.equal(loaded(x), converted(x))
    st.export_onnx(loaded, tmp_path / "m.onnx", x)  # binary / ternary: int8 DequantizeLinear of the +-1 / 0 integers
    if cfg.get("activations") is not None and "overrides" not in cfg:
        assert float((OrtModel(tmp_path / "m.onnx")(x) - converted(x)).abs().max()) <= 1e-4


def test_binary_weight_only_export_runs_in_onnx_runtime_as_pytorch(tmp_path):
    model, data = _net(), _data()
    q = st.qat(model, {"weights": {"format": "binary"}, "activations": None, "steps": 2}, data=data, progress=False)
    x = data[0][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.export_onnx(q, tmp_path / "m.onnx", x)
    notes = [str(w.message) for w in caught if str(w.message).startswith("export_onnx:")]
    assert len(notes) == 1 and "1-bit weights export unpacked, one int8 byte per weight" in notes[0]
    assert float((OrtModel(tmp_path / "m.onnx")(x) - q(x)).abs().max()) <= 1e-4


def test_latent_weights_are_clipped_to_plus_minus_one():
    model, data = _net(), _data()
    prepared = st.prepare_qat(model, {"weights": {"format": "binary"}, "activations": None}, data=data, progress=False)
    layer = prepared[0]
    assert isinstance(layer, FakeQuantLayer)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = 3.0
    constrain(prepared)
    assert float(layer.weight.detach().abs().max()) <= 1.0
    unclipped = st.prepare_qat(model, {"weights": {"format": "binary"}, "activations": None, "clip_latent": False},
                               data=data, progress=False)
    with torch.no_grad():
        unclipped[0].weight[0, 0, 0, 0] = 3.0
    constrain(unclipped)
    assert float(unclipped[0].weight.detach()[0, 0, 0, 0]) == 3.0


def test_binary_qat_beats_binarizing_without_training():
    model, data = _net(), _data(n=8)
    with torch.no_grad():
        targets = [(x, model(x).argmax(1)) for x, _ in data]  # learnable labels: the float model's
    cfg = {"weights": {"format": "binary"}, "activations": None}
    untrained = st.convert_qat(st.prepare_qat(model, cfg, data=targets, progress=False))
    trained = st.qat(model, {**cfg, "lr": 3e-3, "epochs": 6}, data=targets, progress=False)
    agree = lambda m: sum(int((m(x).argmax(1) == y).sum()) for x, y in targets)  # noqa: E731
    assert agree(trained) > agree(untrained) + 10, (agree(trained), agree(untrained))


def test_all_zero_channels_get_a_nonzero_scale():
    w = torch.zeros(2, 4)
    w[1] = torch.tensor([0.5, -0.5, 0.1, 0.0])
    for fmt in ("binary", "ternary"):
        q, scale, _ = quantize_binary_weight(w, fmt, "per_channel")
        assert bool((scale > 0).all() and torch.isfinite(scale).all())
        deq = q.float() * scale.view(-1, 1)
        assert float(deq[0].abs().max()) < 1e-30  # an all-zero channel stays (practically) zero


# -- bad input ------------------------------------------------------------------------------------
def test_bad_formats_give_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="bits=1 integers are binary weights: set format: binary"):
        WeightQuant(bits=1, format="int")
    with pytest.raises(ConfigError, match="format binary weights are stored at 1 bit"):
        WeightQuant(format="binary", bits=4)
    with pytest.raises(ConfigError, match="use granularity: per_channel or per_tensor"):
        WeightQuant(format="ternary", granularity="per_group", group_size=4)
    with pytest.raises(ConfigError, match="remove calibrator, which only apply to integer activations"):
        st.QATConfig(activations={"format": "binary", "calibrator": "entropy"})
    with pytest.raises(ConfigError, match="'quaternary'"):
        WeightQuant(format="quaternary")
    assert WeightQuant(bits=1).format == "binary" and WeightQuant(format="ternary").bits == 2
    model, data = _net(), _data()
    q = st.qat(model, {"weights": {"format": "binary"}, "activations": None, "steps": 1}, data=data, progress=False)
    layer = quantized_layers(q)["0"]
    with pytest.raises(ValueError, match="binary weights must be -1 or \\+1"):
        layer.set_weight(torch.zeros_like(layer.integer_weight()), layer.weight_scale, layer.weight_zero_point)
    bad = dict(layer.spec(), weight=dict(layer.spec()["weight"], bits=2))
    with pytest.raises(ValueError, match="binary weights with bits/dtype/qmin/qmax/packed"):
        QuantizedLayer.from_spec(bad)
    # A corrupted artifact: an unknown weight format is rejected on load, not misread.
    import json

    path = st.save(q, tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"][0]["replay"]["layers"]["0"]["weight"]["format"] = "quaternary"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        st.load(path, model=model)

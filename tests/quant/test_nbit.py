"""Weights of 2 to 8 bits, symmetric (signed) or asymmetric (unsigned with a zero point), per tensor,
per channel or per group: the grid is exact, zero is representable, the error shrinks with the width,
narrow weights are stored packed (an INT4 artifact is half the INT8 one), artifacts round-trip
bit-exactly, ONNX exports match PyTorch, and bad formats fail with errors that say what to do."""

import copy
import math
import random
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from conftest import CASES, quantized_layers, sqnr_db, state_dicts_equal
from shrinktunnel.codec import packed_nbytes
from shrinktunnel.errors import ConfigError, DataError
from shrinktunnel.export import OrtModel
from shrinktunnel.quant import QuantizedLayer, WeightQuant
from shrinktunnel.quant import modules as qmodules
from shrinktunnel.quant.ops import (
    affine_qparams, dequantize_weight, qrange, quantize_weight, weight_groups, weight_qparams, weight_qrange,
)

BITS = list(range(2, 9))
GRANULARITIES = ["per_tensor", "per_channel", "per_group"]
GROUP = 16

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:export_onnx:UserWarning")


def _fmt(bits, symmetric, granularity, group_size=GROUP):
    return {"bits": bits, "symmetric": symmetric, "granularity": granularity,
            "group_size": group_size if granularity == "per_group" else None}


def _quantize(w, bits, symmetric, granularity, group_size=GROUP):
    """The arithmetic quantize uses, called directly: (q, scale, zero_point, dequantized, qmin, qmax)."""
    qmin, qmax = weight_qrange(bits, symmetric)
    gs = group_size if granularity == "per_group" else None
    scale, zp = weight_qparams(w, qmin, qmax, symmetric, granularity, gs)
    q = quantize_weight(w, scale, zp, qmin, qmax, torch.int8 if symmetric else torch.uint8)
    return q, scale, zp, dequantize_weight(q, scale, zp, qmin, qmax), qmin, qmax


def _per_element(t, w, granularity, group_size=GROUP):
    """Broadcast a per-channel (out,) or per-group (out, G) tensor to every element of `w`."""
    if granularity == "per_group":
        return t.repeat_interleave(group_size, dim=1).reshape(w.shape)
    return t.view((-1,) + (1,) * (w.dim() - 1)).expand(w.shape)


def _uneven_weight(shape, seed):
    """Gaussian weight whose channels differ in scale by 1000x, with exact zeros sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).view((-1,) + (1,) * (len(shape) - 1))
    w.view(shape[0], -1)[:, ::7] = 0.0
    return w


def _mlp(width=512, depth=3, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers[:-1], nn.Linear(width, 10)).eval()


class _ConvLinear(nn.Module):
    """A conv whose flattened input (4 x 3 x 3 = 36) and a Linear whose in_features (8 * 6 * 6 = 288)
    both divide by 4 and 12, so one per-group config covers both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 12)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _out(model, x):
    with torch.no_grad():
        return model(x)


# -- the grid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(12, 48), (6, 8, 2, 3)], ids=["linear", "conv2d"])
def test_weights_lie_on_the_grid_in_range_with_zero_exact(shape, bits, symmetric, granularity):
    w = _uneven_weight(shape, seed=bits)
    q, scale, zp, deq, qmin, qmax = _quantize(w, bits, symmetric, granularity)
    # The range: narrow signed for symmetric, full unsigned for asymmetric.
    if symmetric:
        assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) and q.dtype == torch.int8
        assert not zp.any()
    else:
        assert (qmin, qmax) == (0, 2**bits - 1) and q.dtype == torch.uint8
    assert q.shape == w.shape and int(q.min()) >= qmin and int(q.max()) <= qmax
    # Shapes: (out,) per tensor / channel, (out, n_groups) per group; every scale finite and positive.
    expected = (shape[0], w[0].numel() // GROUP) if granularity == "per_group" else (shape[0],)
    assert scale.shape == zp.shape == expected and scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert bool(torch.isfinite(scale).all() and (scale > 0).all())
    assert int(zp.min()) >= qmin and int(zp.max()) <= qmax
    if granularity == "per_tensor":
        assert len(set(scale.tolist())) == 1 and len(set(zp.tolist())) == 1
    # Exactly (q - zp) * scale, one float32 rounding of an exact integer difference.
    s, z = _per_element(scale, w, granularity), _per_element(zp, w, granularity)
    assert torch.equal(deq, (q.to(torch.int32) - z).float() * s)
    # The grid is a fixed point: quantizing the dequantized weight gives the same integers.
    assert torch.equal(quantize_weight(deq, scale, zp, qmin, qmax, q.dtype), q)
    # Zero is exactly representable: every exact zero of the weight comes back as 0.0.
    zeros = w == 0
    assert bool(zeros.any()) and bool((deq[zeros] == 0).all()) and torch.equal(q[zeros].to(torch.int32), z[zeros])
    # Nothing is clipped by more than half a step (the range always covers min and max to within it).
    assert bool(((w - deq).abs() <= s / 2 * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_weight_gets_scale_one_and_a_zero_point_in_range(bits, symmetric, granularity):
    w = torch.randn(4, 32)
    w[1] = 0.0  # an all-zero channel
    w[2, :GROUP] = 0.0  # an all-zero group
    if granularity == "per_tensor":
        w.zero_()
    q, scale, zp, deq, qmin, qmax = _quantize(w, bits, symmetric, granularity)
    zero_rows = [1] if granularity != "per_tensor" else [0, 1, 2, 3]
    for r in zero_rows:
        assert bool((scale[r] == 1.0).all()) and bool(((zp[r] >= qmin) & (zp[r] <= qmax)).all())
    if granularity == "per_group":
        assert scale[2, 0] == 1.0
    assert bool((deq[w == 0] == 0).all())


def test_asymmetric_range_is_widened_to_contain_zero():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -2.0, -1.0, -0.5], [-1.0, 0.0, 1.0, 3.0]])
    q, scale, zp, deq, qmin, qmax = _quantize(w, 4, False, "per_channel")
    # All-positive rows: [0, max]; all-negative rows: [min, 0]; mixed rows: [min, max].
    assert scale.tolist() == pytest.approx([3.0 / 15, 3.0 / 15, 4.0 / 15])
    assert zp.tolist() == [0, 15, round(1.0 / (4.0 / 15))]
    assert deq[0, 3] == pytest.approx(3.0) and deq[1, 0] == pytest.approx(-3.0)


def test_affine_qparams_still_computes_what_it_did():
    """Activation ranges now go through the tensor version; the result must be the old Python
    arithmetic, bit for bit (float64, round half to even, one rounding to float32)."""

    def reference(lo, hi, qmin, qmax, symmetric):
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if symmetric:
            amax = max(-lo, hi)
            half = qmax if qmin < 0 else (qmax - qmin) / 2
            scale = amax / half if amax > 0 else 1.0
            zero_point = 0 if qmin < 0 else (qmin + qmax + 1) // 2
        else:
            scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
            zero_point = max(qmin, min(qmax, int(round(qmin - lo / scale))))
        return float(torch.tensor(max(scale, torch.finfo(torch.float32).tiny), dtype=torch.float32)), zero_point

    rng = random.Random(0)
    ranges = [(0.0, 0.0), (-1.5, 3.0), (0.0, 2.55), (0.5, 2.0), (-4.0, -1.0), (-1e-30, 1e-30), (-1e30, 5.0)]
    ranges += [tuple(sorted(rng.uniform(-1, 1) * 10 ** rng.uniform(-6, 6) for _ in range(2))) for _ in range(2000)]
    for lo, hi in ranges:
        lo, hi = float(np.float32(lo)), float(np.float32(hi))  # observers hand over float32 values
        for qmin, qmax, symmetric in ((0, 255, False), (-128, 127, True), (0, 255, True), (-128, 127, False)):
            assert affine_qparams(lo, hi, qmin, qmax, symmetric) == reference(lo, hi, qmin, qmax, symmetric)


# -- error versus width ---------------------------------------------------------------------------
def _sqnr_by_bits(w, symmetric, granularity, group_size=GROUP):
    return [sqnr_db(w, _quantize(w, b, symmetric, granularity, group_size)[3]) for b in BITS]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "unsigned"])
def test_sqnr_on_gaussian_weights_rises_with_bits_above_a_floor(symmetric, granularity):
    # Measured on N(0, 1) 256 x 256 (3 seeds), dB for 2..8 bits: signed per channel 1.9, 10.6, 18.0,
    # 24.6, 30.9, 37.0, 43.2; unsigned 5.2, 12.6, 19.2, 25.5, 31.7, 37.8, 43.8; per tensor 1.5 to 3 dB
    # lower (signed 2 bits: 0.3). Floors: 6 dB per bit (one bit halves the step) minus 11 (13 per tensor).
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    sqnr = _sqnr_by_bits(w, symmetric, granularity)
    offset = 13 if granularity == "per_tensor" else 11
    for bits, value in zip(BITS, sqnr):
        assert value >= 6 * bits - offset, f"{bits} bits: {value:.1f} dB"
    steps = np.diff(sqnr)
    assert bool((steps >= 5.0).all()), steps  # about 6 dB per bit


@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "unsigned"])
def test_per_group_beats_per_channel_when_scales_vary_along_the_input(symmetric):
    # Each block of 32 inputs has its own scale (log-normal): one scale per row must cover the largest
    # block and flattens the others. Measured gain: 1.1 dB (signed, 2 bits: 3 levels) to 7 dB.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 8, generator=g)).repeat_interleave(32, dim=1)
    per_channel = _sqnr_by_bits(w, symmetric, "per_channel")
    per_group = _sqnr_by_bits(w, symmetric, "per_group", 32)
    for bits, pc, pg in zip(BITS, per_channel, per_group):
        assert pg >= pc + (0.5 if bits == 2 else 3.0), f"{bits} bits: per group {pg:.1f} dB, per channel {pc:.1f} dB"


def test_groups_run_along_the_flattened_input_dimension():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)  # conv: out 2, in 3, 2x2 kernel
    g = weight_groups(w, 4)
    assert g.shape == (2, 3, 4) and torch.equal(g[1, 2], w[1].reshape(-1)[8:12])
    q, scale, zp, deq, _, _ = _quantize(w, 8, True, "per_group", 4)
    assert torch.equal(scale, w.reshape(2, 3, 4).abs().amax(dim=2) / 127)


# -- configuration errors -------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [9, 0, 16, -1])
def test_bits_outside_1_to_8_are_rejected(bits):
    with pytest.raises(ConfigError, match=rf"bits={bits} is not supported for weights"):
        st.QuantConfig.parse({"weights": {"bits": bits}})


def test_one_bit_weights_are_binary_and_need_training():
    # bits=1 is the binary format (XNOR-Net scale), which post-training quantization refuses: it needs QAT.
    with pytest.raises(ConfigError, match="binary weights need training: use the qat method"):
        st.QuantConfig.parse({"weights": {"bits": 1}})


def test_every_width_from_2_to_8_is_accepted_and_activations_stay_8_bit():
    for bits in BITS:
        assert WeightQuant(bits=bits).bits == bits
    with pytest.raises(ConfigError, match="bits=4 is not supported"):
        st.QuantConfig.parse({"activations": {"bits": 4}})


@pytest.mark.parametrize(
    "weights, fragment",
    [
        ({"granularity": "per_group"}, "per_group needs group_size"),
        ({"granularity": "per_group", "group_size": 1}, "group_size=1 is too small; use 2 or more"),
        ({"granularity": "per_group", "group_size": -4}, "group_size=-4 is too small"),
        ({"granularity": "per_channel", "group_size": 32}, "group_size=32 is only read with granularity: per_group"),
        ({"bits": 4, "reduce_range": True}, "reduce_range applies to 8-bit weights only"),
    ],
)
def test_inconsistent_weight_formats_are_config_errors(weights, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        st.QuantConfig.parse({"weights": weights})
    assert str(info.value).startswith("QuantConfig.weights")


def test_group_size_that_does_not_divide_in_features_names_the_layer_and_the_valid_sizes():
    model = nn.Sequential(nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    cfg = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 5}, "activations": None}
    with pytest.raises(ConfigError) as info:
        st.quantize(model, cfg, progress=False)
    msg = str(info.value)
    assert "group_size=5 does not divide the input dimension of 0 (Linear, in_features = 24)" in msg
    assert "choose a group_size that divides 24 (2, 3, 4, 6, 8, 12, 24)" in msg
    assert "{pattern: '0', weights: {granularity: per_channel, bits: 4}}" in msg


def test_group_size_error_on_a_conv_names_its_flattened_dimension_and_comes_before_calibration():
    model = _ConvLinear().eval()
    cfg = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 8}}  # static: would need data
    with pytest.raises(ConfigError) as info:
        st.quantize(model, cfg, progress=False)  # no data: the group check fails first
    msg = str(info.value)
    assert "of conv (Conv2d, in_channels/groups x kernel = 4 x 3 x 3 = 36)" in msg
    assert "divides 36 (2, 3, 4, 6, 9, 12, 18, 36)" in msg


def test_valid_group_sizes_are_listed_up_to_256():
    model = nn.Sequential(nn.Linear(1024, 4)).eval()
    with pytest.raises(ConfigError) as info:
        st.quantize(model, {"weights": {"granularity": "per_group", "group_size": 48}, "activations": None}, progress=False)
    assert "divides 1024 (2, 4, 8, 16, 32, 64, 128, 256)," in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_weight_is_a_data_error_naming_the_layer(bad):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    with pytest.raises(DataError) as info:
        st.quantize(model, {"weights": {"bits": 4}, "activations": None}, progress=False)
    msg = str(info.value)
    n_nan, n_inf = (1, 0) if math.isnan(bad) else (0, 1)
    assert f"the weight of 2 has {n_nan} NaN and {n_inf} infinite values" in msg
    assert "skip: ['2']" in msg
    # Skipping that layer, as the message says, works.
    q = st.quantize(model, {"weights": {"bits": 4}, "activations": None, "skip": ["2"]}, progress=False)
    assert isinstance(q[0], QuantizedLayer) and type(q[2]) is nn.Linear


# -- storage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", BITS)
def test_layers_store_packed_integers_and_compute_with_the_exact_dequantized_weight(bits, symmetric, granularity):
    model = _ConvLinear()
    cfg = {"weights": _fmt(bits, symmetric, granularity, group_size=4), "activations": None}
    q = st.quantize(model, cfg, progress=False)
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for name in ("conv", "fc"):
        layer, float_layer = q.get_submodule(name), model.get_submodule(name)
        w = layer._spec["weight"]
        assert w["bits"] == bits and w["symmetric"] == symmetric and w["granularity"] == granularity
        assert w["packed"] == (bits < 8) and w["dtype"] == ("int8" if symmetric else "uint8")
        assert w["group_size"] == (4 if granularity == "per_group" else None)
        sd = layer.state_dict()
        numel = float_layer.weight.numel()
        if bits < 8:
            assert "qweight" not in sd and "qweight_unpacked" not in sd  # the cache is not saved
            assert sd["qweight_packed"].dtype == torch.uint8 and sd["qweight_packed"].shape == (packed_nbytes(numel, bits),)
            assert sd["qweight_packed"].numel() == math.ceil(numel * bits / 8)
        else:
            assert "qweight_packed" not in sd and sd["qweight"].shape == float_layer.weight.shape
            assert sd["qweight"].dtype == (torch.int8 if symmetric else torch.uint8)
        # The stored integers are exactly those of the arithmetic, and the forward uses (q - zp) * scale.
        ref_q, ref_scale, ref_zp, ref_deq, _, _ = _quantize(float_layer.weight.detach(), bits, symmetric, granularity, 4)
        assert torch.equal(layer.integer_weight(), ref_q)
        assert torch.equal(layer.weight_scale, ref_scale) and torch.equal(layer.weight_zero_point.to(torch.int32), ref_zp)
        # Zero points: int32 per channel (as always); per group one byte each, in the weight's type.
        zp_dtype = ref_q.dtype if granularity == "per_group" else torch.int32
        assert layer.weight_zero_point.dtype == zp_dtype and w["zero_point_dtype"] == str(zp_dtype).removeprefix("torch.")
        assert torch.equal(layer.dequantized_weight(), ref_deq)
        assert layer.num_weights() == numel + float_layer.bias.numel()
    with torch.no_grad():
        h = F.relu(F.conv2d(x, q.conv.dequantized_weight(), q.conv.bias, padding=1)).flatten(1)
        assert torch.equal(q(x), F.linear(h, q.fc.dequantized_weight(), q.fc.bias))


def test_eight_bit_per_channel_keeps_todays_layout():
    model = CASES["flatten"].model()
    q = st.quantize(model, data=CASES["flatten"].batches(), progress=False)
    assert list(q.fc.state_dict()) == ["bias", "qweight", "weight_scale", "weight_zero_point"]
    assert q.fc.qweight.dtype == torch.int8 and q.fc.weight_scale.shape == (10,)
    w = model.fc.weight.detach()
    assert torch.equal(q.fc.weight_scale, w.abs().amax(dim=1) / 127)
    assert torch.equal(q.fc.qweight, torch.round(w / q.fc.weight_scale.view(-1, 1)).clamp(-127, 127).to(torch.int8))


def test_int4_artifact_is_about_half_the_int8_one(tmp_path):
    model = _mlp()
    numel = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sizes = {}
    for bits in (8, 4):
        q = st.quantize(model, {"weights": {"bits": bits}, "activations": None}, progress=False)
        path = st.save(q, tmp_path / f"int{bits}")
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for name, n in numel.items():
                if bits == 8:
                    assert f.get_tensor(f"{name}.qweight").nbytes == n
                else:  # exactly numel * bits / 8, rounded up: nothing else is stored for the integers
                    t = f.get_tensor(f"{name}.qweight_packed")
                    assert t.dtype == torch.uint8 and t.nbytes == -(-n * 4 // 8) == packed_nbytes(n, 4)
        sizes[bits] = (path / "model.safetensors").stat().st_size
    assert sizes[4] / sizes[8] < 0.6, sizes  # measured 0.51: scales, zero points and biases are the rest


def test_odd_sizes_pack_with_a_partial_last_byte():
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5)).eval()  # 91 and 65 weights
    q = st.quantize(model, {"weights": {"bits": 3, "symmetric": False}, "activations": None}, progress=False)
    assert q[0].qweight_packed.numel() == math.ceil(91 * 3 / 8) == 35
    assert q[2].qweight_packed.numel() == math.ceil(65 * 3 / 8) == 25
    assert torch.equal(q[0].integer_weight(), _quantize(model[0].weight.detach(), 3, False, "per_channel")[0])


# -- the unpacked cache ---------------------------------------------------------------------------
def test_packed_weights_are_unpacked_once_and_again_only_when_they_change(monkeypatch):
    calls = []
    real = qmodules.unpack
    monkeypatch.setattr(qmodules, "unpack", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _mlp(width=32, depth=2)
    cfg = {"weights": {"bits": 4}, "activations": None}
    q = st.quantize(model, cfg, progress=False)
    x = torch.randn(5, 32)
    first = _out(q, x)
    n_layers = len(quantized_layers(q))
    assert len(calls) == n_layers
    for _ in range(3):
        assert torch.equal(_out(q, x), first)
    assert len(calls) == n_layers  # repeated forwards reuse the cache

    # load_state_dict with other weights: the next forward unpacks the new bytes.
    other = st.quantize(_mlp(width=32, depth=2, seed=1), cfg, progress=False)
    q.load_state_dict(other.state_dict())
    assert torch.equal(_out(q, x), _out(other, x)) and not torch.equal(_out(q, x), first)
    # An in-place change of the packed bytes is seen too.
    layer = q[0]
    before = layer.integer_weight().clone()
    with torch.no_grad():
        layer.qweight_packed.zero_()
    assert not layer.integer_weight().any() and before.any()


def test_loading_into_a_layer_that_already_ran_refreshes_its_cache():
    fc = nn.Linear(16, 4)
    spec_model = st.quantize(nn.Sequential(fc).eval(), {"weights": {"bits": 2}, "activations": None}, progress=False)
    spec = spec_model[0].spec()
    empty = QuantizedLayer.from_spec(spec)
    x = torch.randn(3, 16)
    assert not _out(empty, x).any()  # zeros everywhere: the cache now holds zeros
    empty.load_state_dict(spec_model[0].state_dict())
    assert torch.equal(_out(empty, x), _out(spec_model[0], x))


def test_deepcopy_and_device_moves_keep_the_cache_right():
    q = st.quantize(_mlp(width=32, depth=2), {"weights": {"bits": 3}, "activations": None}, progress=False)
    x = torch.randn(2, 32)
    y = _out(q, x)
    c = copy.deepcopy(q)
    with torch.no_grad():
        c[0].qweight_packed.zero_()
    assert torch.equal(_out(q, x), y) and not torch.equal(_out(c, x), y)
    assert torch.equal(_out(q.to(torch.device("cpu")), x), y)


# -- artifacts ------------------------------------------------------------------------------------
ROUND_TRIPS = [
    _fmt(2, True, "per_channel"), _fmt(3, False, "per_channel"), _fmt(4, True, "per_channel"),
    _fmt(8, True, "per_channel"), _fmt(8, False, "per_tensor"), _fmt(4, True, "per_group", 4),
    _fmt(3, False, "per_group", 12), _fmt(8, False, "per_group", 4),
]


@pytest.mark.parametrize("weights", ROUND_TRIPS, ids=lambda w: f"{w['bits']}b-{'s' if w['symmetric'] else 'u'}-{w['granularity']}")
@pytest.mark.parametrize("static", [False, True], ids=["weight-only", "static"])
def test_save_load_round_trip_is_bit_exact(tmp_path, weights, static):
    model = _ConvLinear().eval()
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = {"weights": weights} if static else {"weights": weights, "activations": None}
    result = st.compress(model, [st.QuantConfig.parse(cfg)], data=[x] if static else None, progress=False)
    path = result.save(tmp_path / "a")
    loaded = st.load(path, model=_ConvLinear())
    assert state_dicts_equal(loaded, result.model)
    assert torch.equal(_out(loaded, x), _out(result.model, x))
    for name, layer in quantized_layers(loaded).items():
        assert layer.spec() == quantized_layers(result.model)[name].spec()
        assert torch.equal(layer.integer_weight(), quantized_layers(result.model)[name].integer_weight())


def test_specs_of_older_artifacts_without_the_new_keys_still_load():
    q = st.quantize(CASES["flatten"].model(), data=CASES["flatten"].batches(), progress=False)
    spec = q.fc.spec()
    old = dict(spec, weight={k: spec["weight"][k] for k in ("bits", "dtype", "qmin", "qmax", "granularity")})
    layer = QuantizedLayer.from_spec(old)
    layer.load_state_dict(q.fc.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(_out(layer, x), _out(q.fc, x))


# -- ONNX -----------------------------------------------------------------------------------------
def _export(model, x, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.export_onnx(model, path, x)
    return [str(w.message) for w in caught if str(w.message).startswith("export_onnx:")]


@pytest.mark.parametrize("weights", [_fmt(4, True, "per_channel"), _fmt(4, False, "per_group", 4), _fmt(3, True, "per_group", 12)],
                         ids=["int4-per-channel", "uint4-per-group", "int3-per-group"])
def test_weight_only_narrow_export_matches_pytorch(tmp_path, weights):
    model = _ConvLinear().eval()
    x = torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    q = st.quantize(model, {"weights": weights, "activations": None}, progress=False)
    notes = _export(q, x, tmp_path / "m.onnx")
    assert len(notes) == 1 and notes[0].startswith("export_onnx: conv, fc: ")
    if weights["granularity"] == "per_group":
        assert "export dequantized" in notes[0] and "runs these layers in float" in notes[0]
    else:
        assert "no int4 (or other sub-byte) conv/gemm" in notes[0]
    got = OrtModel(tmp_path / "m.onnx")(x[:7])
    assert float((got - _out(q, x[:7])).abs().max()) <= 1e-4


def test_int4_per_channel_exports_int8_qdq_with_the_layers_integers(tmp_path):
    case = CASES["flatten"]
    model, data = case.model(), case.batches()
    q = st.quantize(model, {"weights": {"bits": 4}}, data=data, progress=False)
    notes = _export(q, data[0], tmp_path / "m.onnx")
    assert notes and "features.0, fc" in notes[0]
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for name, layer in quantized_layers(q).items():
        stored = inits[f"{name}.qweight_unpacked"]
        assert stored.dtype == np.int8 and np.array_equal(stored, layer.integer_weight().numpy())
        assert stored.min() >= -7 and stored.max() <= 7
        (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.qweight_unpacked"]
    # Executed node by node, the QDQ graph is the simulation (a rounding boundary at most one step off).
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    x = torch.cat(data)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - _out(q, x).numpy()).max() <= q.fc.output_quant.scale + 1e-6


def test_eight_bit_asymmetric_exports_uint8_qdq_with_zero_points(tmp_path):
    model = _ConvLinear().eval()
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    q = st.quantize(model, {"weights": {"symmetric": False}, "activations": None}, progress=False)
    assert _export(q, x, tmp_path / "m.onnx") == []  # the QDQ path: nothing to say
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    assert inits["fc.qweight"].dtype == np.uint8 and np.array_equal(inits["fc.qweight"], q.fc.qweight.numpy())
    assert q.fc.weight_zero_point.any()
    got = OrtModel(tmp_path / "m.onnx")(x)
    assert float((got - _out(q, x)).abs().max()) <= 1e-4


def test_per_group_layer_matmulnbits_cannot_take_exports_and_onnx_runtime_folds_it_to_float(tmp_path):
    import onnxruntime as ort

    model = nn.Sequential(nn.Linear(384, 768), nn.ReLU(), nn.Linear(768, 16)).eval()
    # groups of 48: not a power of two, so not MatMulNBits blocks (tests/quant/test_nbits.py has those)
    q = st.quantize(model, {"weights": _fmt(4, True, "per_group", 48), "activations": None}, progress=False)
    x = torch.randn(4, 384, generator=torch.Generator().manual_seed(0))
    _export(q, x, tmp_path / "m.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops <= {"Gemm", "MatMul", "Add", "Relu"}, ops  # the dequantization was folded into float weights
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - _out(q, x).numpy()).max() <= 1e-4


def test_qrange_of_narrow_widths():
    assert [weight_qrange(b, True) for b in (2, 3, 4)] == [(-1, 1), (-3, 3), (-7, 7)]
    assert [weight_qrange(b, False) for b in (2, 3, 4)] == [(0, 3), (0, 7), (0, 15)]
    assert weight_qrange(8, True) == qrange(8, signed=True, narrow=True)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"bits": 12}, "bits=12"),
        ({"granularity": "per_row"}, "granularity='per_row'"),
        ({"packed": False}, "packed=False with bits=4"),
        ({"dtype": "int16"}, "dtype='int16'"),
        ({"qmin": -8, "qmax": 8}, "outside a 4-bit int range"),
        ({"granularity": "per_group", "group_size": 5}, "group_size=5 for an input dimension of 64"),
    ],
)
def test_an_artifact_with_a_weight_format_it_cannot_honour_is_rejected(tmp_path, change, fragment):
    import json

    model = nn.Sequential(nn.Linear(64, 8)).eval()
    path = st.save(st.quantize(model, {"weights": {"bits": 4}, "activations": None}, progress=False), tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"][0]["replay"]["layers"]["0"]["weight"].update(change)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(st.ShrinkError, match="unsupported quantized weight format") as info:
        st.load(path, model=model)
    assert fragment in str(info.value)

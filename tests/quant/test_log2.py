"""Log2 (power-of-two) weights and power-of-two scales: codes decode to exact powers of two, rounding is
to the nearest level, the int8 export form is the same weight bit for bit, PTQ / QAT / INQ artifacts
round-trip exactly, ONNX Runtime agrees, and bad input fails with typed errors."""

import json
import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ArtifactError, ConfigError
from shrinktunnel.quant import QuantizedLayer
from shrinktunnel.quant import log2 as L
from shrinktunnel.quant.config import WeightQuant
from shrinktunnel.quant.ops import weight_qparams, quantize_weight, dequantize_weight
from shrinktunnel.quant.qat import FakeQuantLayer, inq_freeze

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:export_onnx:UserWarning",
                                        "ignore:qat:UserWarning")


def _mlp(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)).eval()


def _labelled(model, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(32, 12, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x in xs]


def _sqnr(w, d):
    w, d = w.detach(), d.detach()
    return float(10 * torch.log10(w.pow(2).sum() / (w - d).pow(2).sum()))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_decode_to_exact_powers_of_two_nearest_in_the_linear_domain(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(7, 40, generator=g) * torch.logspace(-3, 0, 7).view(-1, 1)
    w[3] = 0.0  # an all-zero channel
    scale, zp = L.log2_qparams(w, "per_channel")
    assert L.is_pow2(scale) and torch.equal(zp, torch.zeros(7, dtype=torch.int32))
    q = L.quantize(w, scale, bits)
    n = L.levels(bits)
    assert int(q.abs().max()) <= n
    d = L.dequantize(q, scale, bits)
    nz = d != 0
    assert L.is_pow2(d[nz].abs())  # every non-zero weight an exact power of two
    assert torch.equal(torch.sign(d[nz]), torch.sign(w[nz]))
    assert torch.equal(d[3], torch.zeros(40))
    # The nearest of {0, +-2^(e_max - k), k < n} to each weight, found by brute force.
    e_max = torch.frexp(scale)[1] - 1
    lv = torch.ldexp(torch.ones(7, n), (e_max.view(-1, 1) - torch.arange(n).view(1, -1)).to(torch.int32))
    cand = torch.cat([torch.zeros(7, 1), lv, -lv], dim=1)  # (out, 2n + 1)
    best = cand.gather(1, (w.unsqueeze(2) - cand.unsqueeze(1)).abs().argmin(dim=2))
    assert torch.equal(d, best)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_form_is_the_same_weight_bit_for_bit(bits):
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    scale, _ = L.log2_qparams(w, "per_tensor")
    q = L.quantize(w, scale, bits)
    lin, s = L.int8_form(q, scale, bits)
    assert int(lin.abs().max()) <= 64 and lin.dtype == torch.int8
    assert torch.equal(L.dequantize_int8(q, scale, bits), L.dequantize(q, scale, bits))


def test_ptq_log2_artifact_round_trips_and_exports_as_int8_qdq(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, data = _mlp(), _labelled(_mlp())
    q = st.quantize(model, {"weights": {"format": "log2"}}, data=data, progress=False)
    layer = q[0]
    assert isinstance(layer, QuantizedLayer) and layer._format["format"] == "log2"
    assert layer.qweight_packed.numel() == 12 * 32 * 4 // 8  # 4 bits a weight
    assert _sqnr(model[0].weight, layer.dequantized_weight()) > 12  # 4-bit log2 of a uniform init: ~15 dB
    x = data[0][0]
    y = q(x)
    back = st.load(st.save(q, tmp_path / "a"), model=_mlp())
    assert torch.equal(back(x), y)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["stages"][0]["replay"]["layers"]["0"]["weight"]["format"] == "log2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    assert not [w for w in caught if "log2" in str(w.message)]  # exact int8: nothing to warn about
    graph = onnx.load(str(path)).graph
    int8_inits = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_inits) >= 3 and any(n.op_type == "DequantizeLinear" for n in graph.node)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - y.detach().numpy()).max() <= 2e-2 * float(y.abs().max())


def test_wide_log2_exports_dequantized_with_a_note(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, data = _mlp(), _labelled(_mlp())
    q = st.quantize(model, {"weights": {"format": "log2", "bits": 6}, "activations": None}, data=data, progress=False)
    x = data[0][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = st.export_onnx(q, tmp_path / "m.onnx", example_inputs=x)
    assert any("exported dequantized" in str(w.message) for w in caught)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert abs(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] - q(x).detach().numpy()).max() < 1e-5


@pytest.mark.parametrize("granularity,group", [("per_channel", None), ("per_tensor", None), ("per_group", 8)])
def test_pow2_scales_are_powers_of_two_and_cost_at_most_a_bit(granularity, group):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    free, zp = weight_qparams(w, -7, 7, True, granularity, group)
    p2 = L.pow2_scales(w, free, zp, -7, 7, granularity, group)
    assert L.is_pow2(p2) and p2.shape == free.shape
    if granularity == "per_tensor":
        assert torch.equal(p2, p2[:1].expand_as(p2))
    rt = lambda s: dequantize_weight(quantize_weight(w, s, zp, -7, 7, torch.int8), s, zp, -7, 7)  # noqa: E731
    _, e = torch.frexp(free)
    ceil = torch.ldexp(torch.ones_like(free), e)
    assert _sqnr(w, rt(p2)) >= _sqnr(w, rt(ceil)) - 1e-9  # the better of floor / ceil: never worse than ceil
    assert _sqnr(w, rt(p2)) > _sqnr(w, rt(free)) - 6.03  # a scale at most 2x off: at most one bit lost


def test_pow2_scales_in_ptq_and_qat_artifacts(tmp_path):
    model, data = _mlp(), _labelled(_mlp())
    for i, q in enumerate((st.quantize(model, {"weights": {"scale": "pow2"}}, data=data, progress=False),
                           st.qat(model, {"weights": {"bits": 4, "scale": "pow2"}, "steps": 3}, data=data, progress=False))):
        for layer in (q[0], q[2], q[4]):
            assert L.is_pow2(layer.weight_scale) and layer._spec["weight"]["scale"] == "pow2"
        back = st.load(st.save(q, tmp_path / f"p{i}"), model=_mlp())
        assert torch.equal(back(data[0][0]), q(data[0][0]))


def test_log2_qat_converts_bit_exactly_and_inq_freezes_largest_first(tmp_path):
    model, data = _mlp(), _labelled(_mlp())
    prepared = st.prepare_qat(model, {"weights": {"format": "log2"}}, data=data, progress=False)
    layer = prepared[2]
    assert isinstance(layer, FakeQuantLayer)
    before = layer.weight.detach().clone()
    inq_freeze(prepared, 0.5)
    mask = layer.inq_mask
    assert int(mask.sum()) == before.numel() // 2
    assert float(before.abs()[mask].min()) >= float(before.abs()[~mask].max())  # the largest half
    assert L.is_pow2(layer.weight.detach()[mask].abs()[layer.weight.detach()[mask] != 0])
    frozen = layer.weight.detach()[mask].clone()
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    prepared.train()
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(prepared(x), y).backward()
        opt.step()
        st.quant.qat.constrain(prepared)
    assert torch.equal(layer.weight.detach()[mask], frozen)  # frozen weights never move
    assert not torch.equal(layer.weight.detach()[~mask], before[~mask])  # the rest trained
    inq_freeze(prepared, 1.0)
    prepared.eval()
    q = st.convert_qat(prepared)
    x = data[0][0]
    assert torch.equal(q(x), prepared(x))  # converted = trained, bit for bit
    back = st.load(st.save(q, tmp_path / "q"), model=_mlp())
    assert torch.equal(back(x), q(x))


def test_inq_schedule_in_st_qat_ends_all_log2():
    model, data = _mlp(), _labelled(_mlp())
    q = st.qat(model, {"weights": {"format": "log2", "bits": 3}, "inq": [0.5, 1.0], "steps": 4, "lr": 1e-3},
               data=data, progress=False)
    w = q[0].dequantized_weight()
    assert L.is_pow2(w[w != 0].abs()) and q[0]._format["format"] == "log2"


def test_bad_log2_input_gives_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="format log2 with bits: 1 leaves no bit for an exponent"):
        WeightQuant(format="log2", bits=1)
    with pytest.raises(ConfigError, match="per_channel or per_tensor"):
        WeightQuant(format="log2", granularity="per_group", group_size=8)
    with pytest.raises(ConfigError, match="scale: pow2 rounds the scales of symmetric integer"):
        WeightQuant(scale="pow2", symmetric=False)
    with pytest.raises(ConfigError, match="need scales: observed"):
        st.QATConfig(weights={"format": "log2"}, scales="lsq")
    with pytest.raises(ConfigError, match="inq quantizes weights incrementally"):
        st.QATConfig(inq=[0.5, 1.0])
    with pytest.raises(ConfigError, match="increasing fractions"):
        st.QATConfig(weights={"format": "log2"}, inq=[0.5, 0.4, 1.0])
    with pytest.raises(ConfigError, match="gptq and awq"):
        st.QuantConfig(weights={"format": "log2"}, activations=None, rounding="gptq")
    assert WeightQuant(format="log2").bits == 4
    # Corrupted tensors: a log2 scale that is not a power of two is refused, not misread.
    model, data = _mlp(), _labelled(_mlp())
    q = st.quantize(model, {"weights": {"format": "log2"}, "activations": None}, data=data, progress=False)
    layer = QuantizedLayer.from_spec(q[0].spec())
    state = {k: v.clone() for k, v in q[0].state_dict().items()}
    state["weight_scale"] = state["weight_scale"] * 1.5
    layer.load_state_dict(state)
    with pytest.raises(ArtifactError, match="not a power of two"):
        layer(data[0][0])
    with pytest.raises(ValueError, match="log2 weights with bits"):  # replay reports it as an ArtifactError
        QuantizedLayer.from_spec({**q[0].spec(), "weight": {**q[0].spec()["weight"], "qmax": 9}})


def test_the_search_offers_log2_weights_by_name():
    """log2_4 / log2_3: quantize's declared actions, never default (no faster on CPU / ONNX Runtime)."""
    from shrinktunnel.search import ACTIONS, DEFAULT_ACTIONS, plan_stages

    assert ACTIONS["log2_4"].method == "quantize" and ACTIONS["log2_4"] not in list(DEFAULT_ACTIONS)
    ((method, config),) = plan_stages({"fc1": "log2_4", "fc2": "log2_4"}, dict(ACTIONS), None)
    assert method == "quantize" and config["weights"]["format"] == "log2" and config["weights"]["bits"] == 4

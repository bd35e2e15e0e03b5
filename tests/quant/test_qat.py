"""Quantization-aware training: the STE and LSQ gradients are the published ones (exact where the
arithmetic is exact), a prepared model computes bit for bit what its conversion computes, QAT without
training converts to exactly PTQ's artifact and with training to PTQ's arithmetic on the trained
weights and scales, QAT recovers what PTQ loses, artifacts round-trip, export matches ONNX Runtime,
and bad input fails with typed errors."""

import math
import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import CASES, quantized_layers, state_dicts_equal
from shrinktunnel.errors import ConfigError, DataError, ModelError
from shrinktunnel.export import OrtModel
from shrinktunnel.quant import QATConfig, QuantizedLayer
from shrinktunnel.quant.fake_quant import fake_quant_act, fake_quant_weight, lsq_grad_scale
from shrinktunnel.quant.ops import dequantize_weight, fake_quant_activation, quantize_weight, weight_qparams
from shrinktunnel.quant.qat import FakeQuantLayer, constrain

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:export_onnx:UserWarning")


def _mlp(seed=0, width=32):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 6)).eval()


def _labelled(model, n=8, batch=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 12, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x in xs]


# -- the gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity,group", [("per_channel", None), ("per_group", 4)])
def test_weight_ste_gradient_is_the_in_range_mask_exactly(granularity, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    scale, zp = weight_qparams(w, -7, 7, True, granularity, group)
    scale = scale * 0.6  # a step too small for the largest weights: some are clamped
    w.requires_grad_(True)
    out = fake_quant_weight(w, scale, zp, -7, 7, torch.int8)
    q = quantize_weight(w.detach(), scale, zp, -7, 7, torch.int8)
    assert torch.equal(out, dequantize_weight(q, scale, zp, -7, 7))  # the converted layer's weight
    upstream = torch.randn(6, 8, generator=g)
    out.backward(upstream)
    s = scale.repeat_interleave(group, dim=1) if group else scale.view(-1, 1)
    r = torch.round(w.detach() / s)
    inside = (r >= -7) & (r <= 7)
    assert 0 < int(inside.sum()) < w.numel()
    assert torch.equal(w.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_activation_ste_gradient_is_the_in_range_mask_exactly():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 50, generator=g) * 3).requires_grad_(True)
    scale, zp = 0.02, 100
    out = fake_quant_act(x, scale, zp, 0, 255, torch.uint8)
    assert torch.equal(out, fake_quant_activation(x.detach(), scale, zp, 0, 255, torch.uint8))
    upstream = torch.randn(4, 50, generator=g)
    out.backward(upstream)
    r = torch.round(x.detach() * (1.0 / scale)) + zp
    inside = (r >= 0) & (r <= 255)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_lsq_step_gradient_by_hand():
    # Esser et al. eq. 3 with s = 0.5, Qn = Qp = 3: v/s = 0.5, -1.5, 2.5, 4, -10 rounds (half to even)
    # to 0, -2, 2 inside, then clamps above and below. Every quantity is a power-of-two fraction: exact.
    x = torch.tensor([0.25, -0.75, 1.25, 2.0, -5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = fake_quant_act(x, s, 0, -3, 3, torch.int8, grad_scale=1.0)
    assert out.tolist() == [0.0, -1.0, 1.0, 1.5, -1.5]
    out.backward(torch.ones(5))
    # d/ds: round(v/s) - v/s inside: -0.5, -0.5, -0.5; Qp = 3 above; -Qn = -3 below.
    assert s.grad.item() == -0.5 - 0.5 - 0.5 + 3 - 3
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # The gradient scale multiplies the step's gradient only.
    s2 = torch.tensor(0.5, requires_grad=True)
    fake_quant_act(x.detach(), s2, 0, -3, 3, torch.int8, grad_scale=0.125).backward(torch.ones(5))
    assert s2.grad.item() == -1.5 * 0.125
    assert lsq_grad_scale(5, 3) == 1 / math.sqrt(15)


def _lsq_reference(v, s, qn, qp, g):
    """LSQ as the paper's code writes it: gradscale and roundpass with plain autograd."""
    s_scaled = (s - s * g).detach() + s * g
    u = torch.clamp(v / s_scaled, -qn, qp)
    return ((u.round() - u).detach() + u) * s_scaled


def test_lsq_weight_gradients_match_the_papers_formulation():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 16, generator=g)
    step = (w.abs().amax(dim=1) / 3 * 0.7).requires_grad_(True)  # 3 bits, some weights clamped
    upstream = torch.randn(5, 16, generator=g)
    gs = lsq_grad_scale(16, 3)
    w1 = w.clone().requires_grad_(True)
    fake_quant_weight(w1, step, torch.zeros(5, dtype=torch.int32), -3, 3, torch.int8, gs).backward(upstream)
    grad_step = step.grad.clone()
    step.grad = None
    w2 = w.clone().requires_grad_(True)
    _lsq_reference(w2, step.view(-1, 1).expand(5, 16), 3, 3, gs).backward(upstream)
    torch.testing.assert_close(grad_step, step.grad, rtol=1e-5, atol=1e-6)
    # The reference multiplies by 1/s then s (not exact in float); the mask must be the same.
    assert torch.equal(w1.grad == 0, w2.grad == 0)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=0)


# -- prepare / convert ----------------------------------------------------------------------------
CONFIGS = {
    "w8a8": {},
    "w4-asym-group-a8": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 4}},
    "w3-per-tensor-weight-only": {"weights": {"bits": 3, "granularity": "per_tensor"}, "activations": None},
    "w8a8-symmetric-reduce-range": {"weights": {"reduce_range": True}, "activations": {"symmetric": True}},
}


PAIRS = [(c, n) for c in ("residual", "conv1d", "flatten", "attention") for n in CONFIGS
         if "group" not in n or c == "attention"]  # group 4 divides only the attention net's 16 inputs


@pytest.mark.parametrize("case_name,name", PAIRS, ids=[f"{c}-{n}" for c, n in PAIRS])
def test_untrained_qat_converts_to_exactly_the_ptq_artifact(name, case_name):
    case = CASES[case_name]
    model, data = case.model(), case.batches()
    ptq = st.quantize(model, CONFIGS[name], data=data, progress=False)
    converted = st.convert_qat(st.prepare_qat(model, {**CONFIGS[name], "calibration_batches": 4}, data=data, progress=False))
    assert state_dicts_equal(converted, ptq)
    assert {n: m.spec() for n, m in quantized_layers(converted).items()} == \
           {n: m.spec() for n, m in quantized_layers(ptq).items()}
    assert converted._shrinktunnel["stages"][-1]["replay"]["fused"] == ptq._shrinktunnel["stages"][-1]["replay"]["fused"]


@pytest.mark.parametrize("scales", ["observed", "lsq"])
def test_trained_qat_converts_to_ptq_arithmetic_for_its_weights_and_scales(scales):
    model = _mlp()
    data = _labelled(model)
    cfg = {"weights": {"bits": 4}, "scales": scales, "lr": 1e-2, "steps": 5}
    prepared = st.prepare_qat(model, cfg, data=data, progress=False)
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    for x, y in data[:5]:  # the user's own loop
        opt.zero_grad()
        nn.functional.cross_entropy(prepared(x), y).backward()
        opt.step()
        constrain(prepared)
    converted = st.convert_qat(prepared)
    x = data[0][0]
    assert torch.equal(prepared(x), converted(x))  # what was trained is what runs
    for name, layer in quantized_layers(converted).items():
        fq = prepared.get_submodule(name)
        w = fq.weight.detach()
        if scales == "observed":  # PTQ's scales, recomputed from the trained weights
            scale, zp = weight_qparams(w, -7, 7, True, "per_channel")
            assert torch.equal(fq.input_quant.scale, torch.tensor(float(layer.input_quant.scale)))
        else:
            scale, zp = fq.weight_scale.detach(), fq.weight_zero_point
            assert not torch.equal(scale, weight_qparams(w, -7, 7, True, "per_channel")[0])  # learned
            assert layer.input_quant.scale == float(fq.input_quant.scale.detach())
        assert torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer.integer_weight(), quantize_weight(w, scale, zp, -7, 7, torch.int8))


def test_lsq_gives_every_step_size_a_gradient():
    model = _mlp()
    data = _labelled(model)
    prepared = st.prepare_qat(model, {"scales": "lsq"}, data=data, progress=False)
    steps = {n: p for n, p in prepared.named_parameters() if "scale" in n}
    assert len(steps) == 3 * 3  # weight, input and output step of each of the 3 layers
    x, y = data[0]
    nn.functional.cross_entropy(prepared(x), y).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).any())
               for p in steps.values())


def test_qat_recovers_what_ptq_loses():
    model = _mlp(width=48)
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(64, 12, generator=g) for _ in range(40)]
    test = torch.randn(512, 12, generator=g)
    cfg = {"weights": {"bits": 2}, "activations": None}
    ptq = st.quantize(model, cfg, progress=False)
    qat = st.qat(model, {**cfg, "loss": "mse_to_float", "lr": 2e-3, "epochs": 3}, data=data, progress=False)
    with torch.no_grad():
        ref = model(test)
        err_ptq = float(((ptq(test) - ref) ** 2).mean())
        err_qat = float(((qat(test) - ref) ** 2).mean())
    assert err_qat < 0.5 * err_ptq, (err_qat, err_ptq)


def test_qat_artifact_round_trip_and_onnx_export(tmp_path):
    model = CASES["flatten"].model()
    data = [(x, torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(i)))
            for i, x in enumerate(CASES["flatten"].batches())]
    q = st.qat(model, {"scales": "lsq", "steps": 4}, data=data, progress=False)
    assert isinstance(model.fc, nn.Linear)  # the caller's model is untouched
    loaded = st.load(st.save(q, tmp_path / "a"), model=model)
    x = data[0][0]
    assert state_dicts_equal(loaded, q) and torch.equal(loaded(x), q(x))
    st.export_onnx(loaded, tmp_path / "m.onnx", x)
    # ONNX Runtime fuses the QDQ pattern into integer kernels, whose requantization may round the other
    # way: one step of the output quantizer at most (as tests/export holds PTQ's export to).
    step = loaded.fc.output_quant.scale
    assert float((OrtModel(tmp_path / "m.onnx")(x) - q(x)).abs().max()) <= step + 1e-6
    weight_only = st.qat(model, {"activations": None, "steps": 2}, data=data, progress=False)
    st.export_onnx(weight_only, tmp_path / "w.onnx", x)  # runs in float: PyTorch's numerics
    assert float((OrtModel(tmp_path / "w.onnx")(x) - weight_only(x)).abs().max()) <= 1e-4


def test_qat_runs_as_a_recipe_stage(tmp_path):
    model = _mlp()
    data = _labelled(model)
    result = st.compress(model, [{"qat": {"weights": {"bits": 4}, "steps": 3}}], data=data, progress=False)
    assert [s["method"] for s in result.model._shrinktunnel["stages"]] == ["qat"]
    assert len(quantized_layers(result.model)) == 3
    loaded = st.load(result.save(tmp_path / "r"), model=model)
    assert torch.equal(loaded(data[0][0]), result.model(data[0][0]))


def test_fake_quant_layer_replaces_exactly_the_layers_ptq_quantizes():
    model = CASES["conv1d"].model()
    prepared = st.prepare_qat(model, {"skip": ["body.2"]}, data=CASES["conv1d"].batches(), progress=False)
    assert isinstance(prepared.body[0], FakeQuantLayer) and isinstance(prepared.body[2], nn.Conv1d)
    assert isinstance(prepared.body[1], nn.Identity)  # the ReLU folded, as PTQ folds it


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_gives_typed_errors():
    model = _mlp()
    data = _labelled(model)
    with pytest.raises(DataError, match="qat trains on data"):
        st.qat(model, {}, data=None, progress=False)
    with pytest.raises(ConfigError, match="unknown key 'lr_rate'"):
        QATConfig(lr_rate=1)
    with pytest.raises(ConfigError, match="dynamic activations have no range to train"):
        QATConfig(activations={"dynamic": True})
    with pytest.raises(ConfigError, match="optimizer 'lion'"):
        QATConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="need training: use the qat method"):
        st.quantize(model, {"weights": {"format": "ternary"}}, progress=False)
    with pytest.raises(ConfigError, match="binary activations need training"):
        st.quantize(model, {"overrides": [{"pattern": "0", "activations": {"format": "binary"}}]}, data=data, progress=False)
    with pytest.raises(ModelError, match="expects a model returned by prepare"):
        st.convert_qat(model)
    with pytest.raises(DataError, match="needs \\(inputs, target\\) batches"):
        st.qat(model, {"steps": 1}, data=[x for x, _ in data], progress=False)
    prepared = st.prepare_qat(model, {"scales": "lsq"}, data=data, progress=False)
    with torch.no_grad():
        prepared[0].weight_scale[2] = -1.0  # a diverged step
    with pytest.raises(DataError, match="weight step of 0 became zero, negative or non-finite"):
        st.convert_qat(prepared)
    with torch.no_grad():
        prepared[0].weight_scale[2] = 1.0
        prepared[2].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="weight of 2 holds NaN"):
        st.convert_qat(prepared)


def test_unlabelled_data_trains_with_mse_to_float():
    model = _mlp()
    data = [x for x, _ in _labelled(model)]
    q = st.qat(model, {"loss": "mse_to_float", "steps": 2}, data=data, progress=False)
    assert len(quantized_layers(q)) == 3


def test_qat_trains_through_an_embedding_and_converts_it():
    """An Embedding is quantized weight-only by PTQ; QAT used to fail on it (it has no bias)."""
    case = CASES["unsupported"]
    model = case.model()
    data = [(x, torch.randint(0, 2, (x.shape[0],))) for x in case.batches()]
    q = st.qat(model, {"steps": 2}, data=data, progress=False)
    assert isinstance(q.emb, QuantizedLayer) and q.emb.kind == "embedding"
    assert torch.isfinite(q(data[0][0])).all()

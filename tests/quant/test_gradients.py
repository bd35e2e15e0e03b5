"""8-bit gradients: int8 and FP8 e5m2 per-tensor quantization with stochastic rounding is unbiased and
lands on its grid, nearest rounding is within half a step, the QAT backward passes see only quantized
gradients, and the forward (so the converted model) is unchanged."""

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant.gradients import grad_quant, quantize_gradient

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:qat:UserWarning")


def _grad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g) * torch.logspace(-4, -1, 400)  # wide, as gradients are
    return x, g


def test_int8_stochastic_rounding_is_unbiased_and_on_the_grid():
    x, g = _grad()
    s = float(x.abs().max()) / 127
    n = 3000
    acc = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n):
        q = quantize_gradient(x, "int8", True, g)
        acc += q.double()
    k = q / s
    assert torch.allclose(k, k.round(), atol=1e-4) and float(k.abs().max()) <= 127 + 1e-4
    # Each value is floor or ceil of x / s: a Bernoulli of variance <= 1/4 steps^2.
    assert float((acc / n - x.double()).abs().max()) <= 5 * 0.5 * s / n ** 0.5
    near = quantize_gradient(x, "int8", False)
    assert float((near - x).abs().max()) <= s / 2 * (1 + 1e-5)
    assert int((near == 0).sum()) > int((q == 0).sum())  # nearest loses the small gradients


def test_fp8_e5m2_stochastic_rounding_is_unbiased_and_representable():
    x, g = _grad()
    n = 3000
    acc = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(n):
        q = quantize_gradient(x, "fp8_e5m2", True, g)
        acc += q.double()
    _, e = torch.frexp(x.abs().max())
    scaled = torch.ldexp(q, (15 - e).to(torch.int32))  # the scaling quantize_gradient applies
    assert torch.equal(scaled.to(torch.float8_e5m2).float(), scaled)  # every value an e5m2 number
    rel = (acc / n - x.double()).abs() / x.double().abs()
    big = x.abs() > float(x.abs().max()) * 2.0 ** -14  # e5m2's normal range after scaling
    assert float(rel[big].max()) < 0.03  # one sample's error is up to 25 %: the mean's is not


def test_qat_backward_sees_only_quantized_gradients_and_forward_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(3)]
    plain = st.prepare_qat(model, {"weights": {"bits": 4}}, data=data, progress=False)
    prepared = st.prepare_qat(model, {"weights": {"bits": 4}, "gradients": "int8"}, data=data, progress=False)
    x, y = data[0]
    assert torch.equal(plain(x), prepared(x))  # the forward is untouched
    prepared.train()
    torch.nn.functional.cross_entropy(prepared(x), y).backward()
    gw = prepared[0].weight.grad  # STE passes the int8 weight gradient through (masked)
    nz = gw[gw != 0]
    steps = nz / nz.abs().min()
    assert bool(torch.allclose(steps, steps.round(), atol=1e-3))  # multiples of one per-tensor step
    q = st.qat(model, {"weights": {"bits": 4}, "gradients": "fp8_e5m2", "steps": 3}, data=data, progress=False)
    assert torch.isfinite(q(x)).all()


def test_grad_quant_is_identity_without_grad_and_bad_format_fails():
    x = torch.randn(4)
    assert grad_quant(x, "int8") is x
    with pytest.raises(ValueError, match="gradient format"):
        quantize_gradient(x, "int4")
    with pytest.raises(ConfigError, match="gradients"):
        st.QATConfig(gradients="int4")

"""Stochastic BinaryConnect: the sampled levels are unbiased (E[alpha b] = w where |w| <= alpha), training samples and
inference takes the deterministic sign (so the converted layer equals the eval-mode prepared layer bit for
bit), the gradient is the clipped identity's, and stochastic without training is a clear error."""

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant.binary import fake_binary_weight, stochastic_levels
from shrinktunnel.quant.config import WeightQuant
from shrinktunnel.quant.qat import FakeQuantLayer

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning", "ignore:qat:UserWarning")


def _net():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4)).eval()


def _data(model, n=4):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 10, generator=g) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x in xs]


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_sampled_levels_are_unbiased(granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 50, generator=g) * torch.linspace(0.1, 2, 6).view(-1, 1)
    n = 4000
    mean = sum(stochastic_levels(w, granularity, g) for _ in range(n)) / n
    a = w.abs().reshape(6, -1)
    h = a.mean(dim=1, keepdim=True) if granularity == "per_channel" else a.mean().expand(6, 1)  # H = alpha
    expected = (w / h).clamp(-1, 1)  # E[b] = 2p - 1 = w / H where |w| <= H, else sign(w)
    std = (1 - expected.pow(2)).clamp_min(0).sqrt() / n ** 0.5
    assert bool(((mean - expected).abs() <= 5 * std + 1e-6).all())
    assert torch.equal(stochastic_levels(w, granularity, g).abs(), torch.ones_like(w))


def test_stochastic_weight_gradient_is_the_clipped_identity_and_levels_alpha_scaled():
    w = (torch.randn(5, 8, generator=torch.Generator().manual_seed(3)) * 0.8).requires_grad_(True)
    out = fake_binary_weight(w, "binary", "per_channel", stochastic=True, generator=torch.Generator().manual_seed(4))
    alpha = w.detach().abs().mean(dim=1, keepdim=True)
    assert torch.allclose(out.detach().abs(), alpha.expand_as(out), rtol=0, atol=0)
    up = torch.randn(5, 8)
    out.backward(up)
    assert torch.equal(w.grad, torch.where(w.detach().abs() <= 1, up * alpha, torch.zeros_like(up)))


def test_training_samples_inference_is_deterministic_and_converts_exactly(tmp_path):
    model, data = _net(), _data(_net())
    prepared = st.prepare_qat(model, {"weights": {"format": "binary", "stochastic": True}, "activations": None},
                              data=data, progress=False)
    layer = prepared[0]
    assert isinstance(layer, FakeQuantLayer) and layer.stochastic
    x = data[0][0]
    prepared.train()
    torch.manual_seed(5)
    a, b = prepared(x), prepared(x)
    assert not torch.equal(a, b)  # a new sample each forward
    prepared.eval()
    assert torch.equal(prepared(x), prepared(x))
    q = st.convert_qat(prepared)
    assert torch.equal(q(x), prepared(x))  # the deterministic sign, bit for bit
    trained = st.qat(model, {"weights": {"format": "binary", "stochastic": True}, "activations": None,
                             "steps": 3, "lr": 1e-3}, data=data, progress=False)
    back = st.load(st.save(trained, tmp_path / "s"), model=_net())
    assert torch.equal(back(x), trained(x))


def test_stochastic_without_training_is_a_clear_error():
    with pytest.raises(ConfigError, match="stochastic binarization samples the weights during training"):
        st.QuantConfig(weights={"format": "binary", "stochastic": True})
    with pytest.raises(ConfigError, match="use the qat method"):
        st.quantize(_net(), {"weights": {"format": "binary", "stochastic": True}, "activations": None})
    with pytest.raises(ConfigError, match="stochastic applies to format binary"):
        WeightQuant(bits=4, stochastic=True)

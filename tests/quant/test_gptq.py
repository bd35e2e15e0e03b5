"""GPTQ rounding: the streamed Hessian, the exact identity with round-to-nearest when inputs are
uncorrelated, a real gain when they are correlated, and its bad-input cases."""

import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import CASES, sqnr_db
from shrinktunnel.errors import DataError
from shrinktunnel.quant.gptq import HessianObserver, gptq_quantize
from shrinktunnel.quant.ops import quantize_weight, weight_qparams, weight_qrange


def _correlated(n, k, seed=0):
    # Real activations live near a low-dimensional subspace: rank 8 plus a little noise.
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, k, generator=torch.Generator().manual_seed(1234))
    return torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


def test_hessian_streams_to_the_batch_value():
    x = _correlated(300, 12)
    obs = HessianObserver(12)
    for chunk in x.split(70):
        obs.update(chunk.reshape(-1, 5, 12) if len(chunk) % 5 == 0 else chunk)
    torch.testing.assert_close(obs.h, 2 * x.double().t() @ x.double() / 300, rtol=1e-5, atol=1e-5)  # float32 products
    assert obs.count == 300


@pytest.mark.parametrize("granularity, group_size", [("per_channel", None), ("per_group", 8)])
def test_uncorrelated_inputs_give_exactly_round_to_nearest(granularity, group_size):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    qmin, qmax = weight_qrange(4, True)
    q, scale, zp = gptq_quantize(w, torch.eye(32) * 3.0, qmin, qmax, True, granularity, group_size)
    ref_scale, ref_zp = weight_qparams(w, qmin, qmax, True, granularity, group_size)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    assert torch.equal(q.to(torch.int8), quantize_weight(w, ref_scale, ref_zp, qmin, qmax, torch.int8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    calib = [_correlated(256, 64, seed=s) for s in range(4)]
    held = _correlated(512, 64, seed=9)
    base = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": symmetric},
            "activations": None}
    rtn = st.quantize(model, base, progress=False)
    gptq = st.quantize(model, {**base, "rounding": "gptq"}, data=calib, progress=False)
    with torch.no_grad():
        ref = model(held)
        gain = sqnr_db(ref, gptq(held)) - sqnr_db(ref, rtn(held))
    assert gain > 5.0, gain  # measured 7.2 and 6.8 dB
    layer = gptq[0]
    w = layer.integer_weight()
    assert int(w.min()) >= layer._format["qmin"] and int(w.max()) <= layer._format["qmax"]


def test_dead_inputs_are_zeroed_not_nan():
    x = _correlated(200, 16)
    x[:, 3] = 0.0
    obs = HessianObserver(16)
    obs.update(x)
    w = torch.randn(4, 16)
    q, scale, zp = gptq_quantize(w, obs.h, *weight_qrange(4, True), True, "per_channel", None)
    assert torch.isfinite(scale).all() and torch.equal(q[:, 3], torch.zeros(4))


def test_gptq_needs_data_and_leaves_convolutions_to_nearest(tmp_path):
    case = CASES["flatten"]
    cfg = {"weights": {"bits": 4}, "activations": None, "rounding": "gptq"}
    with pytest.raises(DataError, match="gptq needs calibration data"):
        st.quantize(case.model(), cfg, progress=False)
    with pytest.warns(UserWarning, match="gptq applies to Linear layers"):
        q = st.quantize(case.model(), cfg, data=case.batches(2), progress=False)
    x = case.batches(1)[0]
    st.save(q, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=case.model())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


# -- per-group scale / zero-point search (quant/scale_search.py) ------------------------------------------

from shrinktunnel.quant.scale_search import search_qparams, weighted_error  # noqa: E402


def _heavy_tailed(out, k, seed=0):
    # LLM weights: mostly small, a few large ones per group (a Gaussian over a random scale: heavy tails)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, k, generator=g) / torch.rand(out, k, generator=g).clamp_min(0.05).sqrt() * 0.02


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (3, False), (2, False)])
def test_scale_search_never_worse_than_min_max_per_group(bits, symmetric):
    w = _heavy_tailed(32, 256, seed=bits)
    d = torch.rand(256, generator=torch.Generator().manual_seed(5)) + 0.1
    qmin, qmax = weight_qrange(bits, symmetric)
    s0, z0 = weight_qparams(w, qmin, qmax, symmetric, "per_group", 64)
    s1, z1 = search_qparams(w, qmin, qmax, symmetric, 64, d)
    assert s1.shape == s0.shape and z1.shape == z0.shape and z1.dtype == torch.int32
    assert int(z1.min()) >= qmin and int(z1.max()) <= qmax and bool((s1 > 0).all())
    g, dg = w.reshape(32, 4, 64), d.reshape(1, 4, 64)
    e0 = weighted_error(g, dg, s0.unsqueeze(2), z0.unsqueeze(2).float(), qmin, qmax)
    e1 = weighted_error(g, dg, s1.unsqueeze(2), z1.unsqueeze(2).float(), qmin, qmax)
    assert bool((e1 <= e0 * (1 + 1e-6)).all())  # min-max is one of the candidates
    assert float(e1.sum()) < 0.95 * float(e0.sum()), float(e1.sum() / e0.sum())
    # the integers the layer stores reproduce the searched error
    q = quantize_weight(w, s1, z1, qmin, qmax, torch.int8 if symmetric else torch.uint8).float()
    deq = ((q.reshape(32, 4, 64) - z1.unsqueeze(2)) * s1.unsqueeze(2))
    torch.testing.assert_close(float((dg * (g - deq) ** 2).sum()), float(e1.sum()), rtol=1e-4, atol=0)


def test_scale_search_follows_the_importance():
    w = _heavy_tailed(64, 64, seed=7)
    qmin, qmax = weight_qrange(3, False)
    d = torch.ones(64)
    d[:8] = 100.0  # eight inputs carry the energy: their weights' error counts
    s_w, z_w = search_qparams(w, qmin, qmax, False, 64, d)
    s_u, z_u = search_qparams(w, qmin, qmax, False, 64, None)
    g = w.reshape(64, 1, 64)
    err = lambda s, z: float(weighted_error(g, d.reshape(1, 1, 64), s.unsqueeze(2), z.unsqueeze(2).float(), qmin, qmax).sum())  # noqa: E731
    assert err(s_w, z_w) < err(s_u, z_u)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_with_scale_search_on_uncorrelated_inputs_lowers_the_output_error(act_order):
    # Uncorrelated inputs of unequal energy d: GPTQ is round-to-nearest, and the mean squared output error
    # is exactly sum_j d_j (w_j - w^_j)^2, what the search minimizes with diag(H) as the importance.
    w = _heavy_tailed(48, 128, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4096, 128, generator=g) * torch.linspace(0.2, 2.0, 128)
    h = torch.diag(2 * (x.double() ** 2).mean(dim=0))
    qmin, qmax = weight_qrange(4, False)
    errs = {}
    for search in (False, True):
        q, scale, zp = gptq_quantize(w, h, qmin, qmax, False, "per_group", 32, act_order=act_order, search=search)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
        deq = ((q.reshape(48, 4, 32) - zp.unsqueeze(2)) * scale.unsqueeze(2)).reshape(48, 128)
        errs[search] = float(((x @ (deq - w).t()) ** 2).mean())
    assert errs[True] < 0.97 * errs[False], errs  # measured 0.93

"""Whitened SVD: exact at full rank, its error is the dropped whitened energy, it beats plain SVD on
correlated inputs (Linear and the channel scheme), the method records it, and a budget over the selected
layers only."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.decomposition import budget as B
from shrinktunnel.decomposition import factorize as F
from shrinktunnel.decomposition import layers as L
from shrinktunnel.decomposition.ranks import SVDCache, ranks_for_energy


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with a few strong, mixed directions and a non-zero mean: what a transformer's hidden states look
    like to a projection (and nothing like the isotropic inputs plain SVD implicitly assumes)."""
    scales = torch.logspace(1, -2, d, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64))[0]
    g = torch.Generator().manual_seed(seed)  # the samples; the distribution (scales, mix) is the same for every seed
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ mix.T + 0.5


def _decompose(model, config, data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = st.decompose(model, config, data=data, progress=False)
    return out, [str(w.message) for w in caught]


def test_full_rank_exact_and_error_is_the_dropped_whitened_energy():
    torch.manual_seed(0)
    w = torch.randn(24, 32, dtype=torch.float64)
    x = _correlated(500, 32)
    gram = x.T @ x
    white = F.whitening(gram, 0.0)
    torch.testing.assert_close(white.root @ white.inverse, torch.eye(32, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(white.root @ white.root.T, gram, atol=1e-8 * float(gram.abs().max()), rtol=0)
    usv = F.whitened_svd(w, white)
    left, right = F.svd_factors(w, 24, usv, white)
    torch.testing.assert_close(left @ right, w, atol=1e-9, rtol=0)
    s = usv[1]
    for r in (4, 12, 20):
        left, right = F.svd_factors(w, r, usv, white)
        measured = float(((w - left @ right) @ x.T).norm() / (w @ x.T).norm())
        dropped = float((s[r:] ** 2).sum() / (s ** 2).sum()) ** 0.5
        assert measured == pytest.approx(dropped, rel=1e-9)
        assert F.output_error(w, left @ right, gram) == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("r", [4, 8, 16])
def test_beats_plain_svd_on_correlated_inputs(r):
    """At every rank the whitened truncation's output error on the calibration inputs is below plain SVD's
    (it is the least possible, so only equal inputs could tie), and clearly so on held-out inputs from
    the same distribution."""
    torch.manual_seed(1)
    lin = nn.Linear(48, 40).double()
    calib, held = _correlated(2000, 48, seed=0), _correlated(500, 48, seed=1)
    white = F.whitening(calib.T @ calib, 1e-6)
    plain, _ = L.decompose_layer(lin, "svd", [r])
    whitened, _ = L.decompose_layer(lin, "svd", [r], white=white)
    with torch.no_grad():
        def err(m, x):
            return float((m(x) - lin(x)).norm() / lin(x).norm())
        assert err(whitened, calib) < 0.7 * err(plain, calib)
        assert err(whitened, held) < 0.7 * err(plain, held)


def test_channel_scheme_whitened_on_patches():
    """A conv's channel view is whitened by the second moment of its input patches (zero padding, stride)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 16, 3, padding=1, stride=2).double()
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64), size=10,
                                           mode="bilinear")  # smooth: neighbouring pixels agree
    x = torch.cat([base, base + 0.05 * torch.randn(8, 2, 10, 10, generator=g, dtype=torch.float64),
                   base.roll(1, 2)], 1)  # six channels spanning far fewer directions
    gram = B.input_grams(conv, {"c": conv}, [x])["c"]
    rows = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 54)
    torch.testing.assert_close(gram, rows.T @ rows, atol=1e-9, rtol=0)
    white = F.whitening(gram, 1e-6)
    plain, _ = L.decompose_layer(conv, "channel", [6])
    whitened, _ = L.decompose_layer(conv, "channel", [6], white=white)
    with torch.no_grad():
        y = conv(x)
        assert float((whitened(x) - y).norm()) < 0.5 * float((plain(x) - y).norm())


def test_energy_counts_output_energy_when_whitened():
    torch.manual_seed(3)
    lin = nn.Linear(32, 24).double()
    x = _correlated(400, 32)
    white = F.whitening(x.T @ x, 0.0)
    cache = SVDCache({id(lin): white})
    (r,) = ranks_for_energy(lin, "svd", 0.99, cache)
    dec, _ = L.decompose_layer(lin, "svd", [r], usv=cache.usv(lin, "svd"), white=white)
    w = lin.weight.detach()
    approx = F.reconstruct("svd", L.factors(lin, "svd", [r], usv=cache.usv(lin, "svd"), white=white))
    assert F.output_error(w, approx, x.T @ x) ** 2 <= 0.01 + 1e-12
    assert r < ranks_for_energy(lin, "svd", 0.99, SVDCache())[0]  # the data's few directions need fewer ranks


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_method_auto_whitens_with_data_and_round_trips(tmp_path):
    torch.manual_seed(4)
    model = MLP().eval()
    data = [_correlated(64, 32, seed=s).float() for s in range(4)]
    held = _correlated(256, 32, seed=9).float()
    cfg = {"ratio": 0.3, "keep_if_slower": False}
    auto, _ = _decompose(model, cfg, data)
    plain, _ = _decompose(model, {**cfg, "method": "svd"}, data)
    layers = st.core.history.get_record(auto)["stages"][-1]["replay"]["layers"]
    assert {d["method"] for d in layers.values()} == {"whitened_svd"} and all("output_error" in d for d in layers.values())
    with torch.no_grad():
        y = model(held)
        assert float((auto(held) - y).norm()) < 0.7 * float((plain(held) - y).norm())
        loaded = st.load(st.save(auto, tmp_path / "art"), model=MLP())
        torch.testing.assert_close(loaded(held), auto(held), atol=0, rtol=0)
    no_data, _ = _decompose(model, cfg, None)  # auto without data: plain SVD, as before
    assert {d["method"] for d in st.core.history.get_record(no_data)["stages"][-1]["replay"]["layers"].values()} == {"svd"}


def test_whitened_without_data_is_a_data_error():
    with pytest.raises(st.DataError, match="whitened_svd needs data"):
        st.decompose(MLP(), {"method": "whitened_svd"}, progress=False)


def test_non_whitenable_scheme_is_listed():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    data = [torch.randn(2, 4, 8, 8)]
    _, warned = _decompose(model, {"conv_scheme": "channel", "rank": 2, "method": "whitened_svd",
                                   "keep_if_slower": False}, data)
    assert any("2 not whitened" in w for w in warned)  # reflect padding: its patches are not formed here
    _, warned = _decompose(model, {"conv_scheme": "tucker2", "rank": 2, "method": "whitened_svd",
                                   "keep_if_slower": False}, data)
    assert any("0 (tucker2) is factorised from its weight alone" in w for w in warned)


def test_budget_over_the_selected_layers_only():
    """budget_scope layers: the selected layers keep the budget's fraction of their weights, the others
    (here fc1, not selected) do not count."""
    torch.manual_seed(5)
    model = MLP().eval()
    data = [_correlated(64, 32, seed=s).float() for s in range(2)]
    out, warned = _decompose(model, {"layers": ["fc2", "fc3"], "budget": 0.5, "budget_metric": "params",
                                     "budget_scope": "layers", "keep_if_slower": False}, data)
    kept = sum(p.numel() for n, p in out.named_parameters() if n.startswith(("fc2", "fc3")) and n.endswith("weight"))
    assert kept <= 0.5 * (64 * 64 + 64 * 8)
    assert not any("not reached" in w for w in warned)
    assert out.fc1 is not model.fc1 and torch.equal(out.fc1.weight, model.fc1.weight)

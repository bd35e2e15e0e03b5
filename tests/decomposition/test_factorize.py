"""The arithmetic: exact at full rank, the error bounds the rank rules promise, the AMCT example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrinktunnel.decomposition import factorize as F
from shrinktunnel.decomposition import layers as L
from shrinktunnel.decomposition.ranks import SVDCache, ranks_for_energy, ranks_for_ratio
from shrinktunnel.measure import count_macs

CONV_SCHEMES = ["channel", "spatial", "tucker2", "cp"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _conv(*args, seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(*args, **kw).double()


GEOMETRIES = {
    "stride_pad": dict(stride=2, padding=1),
    "dilated_rect": dict(kernel_size=(3, 5), dilation=(2, 1), padding=(2, 2)),
    "same_circular": dict(padding="same", padding_mode="circular"),
    "reflect_nobias": dict(padding=1, padding_mode="reflect", bias=False),
}


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_full_rank_is_exact(scheme, geometry):
    """At full rank every scheme computes the layer itself, whatever its stride, padding and dilation."""
    kw = dict(GEOMETRIES[geometry])
    kernel = kw.pop("kernel_size", 3)
    conv = _conv(5, 6, kernel, **kw)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    dec, err = L.decompose_layer(conv, scheme, L.full_rank(conv, scheme), cp_iterations=300)
    assert err < 1e-9
    torch.testing.assert_close(dec(x), conv(x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("scheme", ["channel", "tucker2"])
def test_conv1d_full_rank_is_exact(scheme):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 6, 5, stride=2, padding=2, padding_mode="reflect").double()
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    dec, err = L.decompose_layer(conv, scheme, L.full_rank(conv, scheme))
    assert err < 1e-12
    torch.testing.assert_close(dec(x), conv(x), atol=1e-12, rtol=0)


def test_linear_svd_full_rank_exact_and_3d_input():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    dec, err = L.decompose_layer(lin, "svd", [5])
    x = torch.randn(3, 4, 7, dtype=torch.float64)  # (N, T, D): a Linear applies to the last dimension
    assert [type(m) for m in dec] == [nn.Linear, nn.Linear] and dec[0].bias is None
    torch.testing.assert_close(dec(x), lin(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scheme", ["svd", "channel", "spatial"])
def test_svd_truncation_error_is_the_dropped_energy(scheme):
    """Eckart-Young: the error of the rank-r truncation is exactly the energy of the dropped singular values,
    and the energy rule's rank is the smallest that keeps the energy asked for."""
    module = nn.Linear(40, 24).double() if scheme == "svd" else _conv(8, 12, 3)
    w = module.weight.detach()
    sigma = F.singular_values(F.matrix_view(scheme, w))
    for energy in (0.5, 0.8, 0.95):
        (r,) = ranks_for_energy(module, scheme, energy, SVDCache())
        _, err = L.decompose_layer(module, scheme, [r])
        dropped = float((sigma[r:] ** 2).sum() / (sigma ** 2).sum())
        assert err ** 2 == pytest.approx(dropped, rel=1e-9)
        assert 1 - dropped >= energy - 1e-12
        assert 1 - float((sigma[r - 1:] ** 2).sum() / (sigma ** 2).sum()) < energy  # r - 1 would not do


def test_energy_one_is_full_rank():
    conv = _conv(4, 6, 3)
    assert ranks_for_energy(conv, "channel", 1.0, SVDCache()) == L.full_rank(conv, "channel")


def test_tucker2_energy_bound_and_hooi_improves_hosvd():
    conv = _conv(16, 24, 3)
    w = conv.weight.detach()
    for energy in (0.6, 0.9):
        ranks = ranks_for_energy(conv, "tucker2", energy, SVDCache())
        _, err = L.decompose_layer(conv, "tucker2", ranks)
        assert err ** 2 <= 1 - energy + 1e-12
    hosvd = F.relative_error(w, F.reconstruct("tucker2", F.tucker2_factors(w, 6, 5, iterations=0)))
    hooi = F.relative_error(w, F.reconstruct("tucker2", F.tucker2_factors(w, 6, 5, iterations=3)))
    assert hooi <= hosvd + 1e-12
    assert hooi < 1


def test_cp_recovers_a_rank_three_tensor():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (6, 5, 3, 3))
    w = torch.einsum("tr,sr,hr,xr->tshx", a, b, c, d)
    err = F.relative_error(w, F.reconstruct("cp", F.cp_factors(w, 3, iterations=300)))
    assert err < 1e-6


def test_cp_energy_rank_reaches_its_bound():
    conv = _conv(6, 8, 3)
    (r,) = ranks_for_energy(conv, "cp", 0.7, SVDCache(), cp_iterations=60)
    _, err = L.decompose_layer(conv, "cp", [r], cp_iterations=60)
    assert err ** 2 <= 0.3 + 1e-6


@pytest.mark.parametrize("scheme", ["svd", *CONV_SCHEMES])
def test_ratio_is_the_largest_rank_that_fits(scheme):
    module = nn.Linear(48, 32) if scheme == "svd" else nn.Conv2d(16, 24, 3)
    for ratio in (0.2, 0.5, 0.8):
        ranks = ranks_for_ratio(module, scheme, ratio)
        assert L.decomposed_weights(module, scheme, ranks) <= ratio * module.weight.numel()
        if scheme != "tucker2":  # one more unit of rank would not fit
            assert L.decomposed_weights(module, scheme, [ranks[0] + 1]) > ratio * module.weight.numel()


def test_amct_example_spatial_64x64x3x3():
    """AMCT's example: a 64x64x3x3 conv at rank 32 becomes 32x64x3x1 then 64x32x1x3, 66.7 % fewer MACs."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    dec, _ = L.decompose_layer(conv, "spatial", [32])
    assert tuple(dec[0].weight.shape) == (32, 64, 3, 1) and tuple(dec[1].weight.shape) == (64, 32, 1, 3)
    x = torch.randn(1, 64, 16, 16)
    saved = 1 - count_macs(dec, ((x,), {})) / count_macs(conv, ((x,), {}))
    assert saved == pytest.approx(2 / 3, abs=1e-9)


def test_build_matches_decompose_structure():
    """Replay builds from the original layer alone exactly the shapes decomposition fills."""
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    for scheme in CONV_SCHEMES:
        ranks = ranks_for_ratio(conv, scheme, 0.4)
        dec, _ = L.decompose_layer(conv, scheme, ranks)
        built = L.build(conv, scheme, ranks)
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in dec.state_dict().items()}
        assert [type(m) for m in built] == [type(m) for m in dec]

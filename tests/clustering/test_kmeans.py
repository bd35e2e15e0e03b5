"""1-D k-means: every initialisation, Lloyd never worse than its start, the optimal option exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrinktunnel.clustering import Init, kmeans_1d
from shrinktunnel.clustering.kmeans import initial_centroids


def sse(w: torch.Tensor, codebook: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((w.double() - codebook.double()[labels]) ** 2).sum())


def optimal_sse(x: np.ndarray, k: int) -> float:
    """Brute-force DP over the sorted values (O(k n^2)): the exact optimum, for small n."""
    x = np.sort(x.astype(np.float64))
    n = x.size
    p1, p2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
    cost = lambda i, j: p2[j] - p2[i] - (p1[j] - p1[i]) ** 2 / (j - i)  # noqa: E731  x[i:j]
    best = [cost(0, j) if j else 0.0 for j in range(n + 1)]
    for _ in range(1, k):
        best = [0.0] + [min(best[i] + cost(i, j) for i in range(0, j)) for j in range(1, n + 1)]
    return best[n]


WEIGHTS = torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.mark.parametrize("init", list(Init))
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_every_init_gives_a_sorted_used_codebook_and_nearest_labels(init, bits):
    codebook, labels = kmeans_1d(WEIGHTS, 1 << bits, init=init, iterations=30, seed=1)
    assert codebook.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == WEIGHTS.shape
    assert 1 <= codebook.numel() <= 1 << bits
    assert bool((codebook[1:] > codebook[:-1]).all())  # sorted, distinct
    assert torch.bincount(labels, minlength=codebook.numel()).min() > 0  # every centroid used
    nearest = (WEIGHTS[:, None] - codebook[None, :]).abs().argmin(dim=1)
    assert torch.equal((WEIGHTS - codebook[labels]).abs(), (WEIGHTS - codebook[nearest]).abs())


@pytest.mark.parametrize("init", list(Init))
def test_lloyd_never_worse_than_its_initialisation(init):
    rng = np.random.default_rng(0)
    x = np.sort(WEIGHTS.double().numpy())
    start = torch.from_numpy(np.unique(initial_centroids(x, 16, init, rng)).astype(np.float32))
    start_labels = (WEIGHTS[:, None] - start[None, :]).abs().argmin(dim=1)
    codebook, labels = kmeans_1d(WEIGHTS, 16, init=init, iterations=50, seed=0)
    assert sse(WEIGHTS, codebook, labels) <= sse(WEIGHTS, start, start_labels) + 1e-9


def test_linear_init_spans_the_range_and_density_follows_the_cdf():
    x = np.sort(WEIGHTS.double().numpy())
    lin = initial_centroids(x, 8, Init.LINEAR, np.random.default_rng(0))
    assert lin[0] == x[0] and lin[-1] == x[-1]
    dens = initial_centroids(x, 8, Init.DENSITY, np.random.default_rng(0))
    # Evenly spaced quantiles: about n/8 weights between neighbours.
    between = np.diff(np.searchsorted(x, dens))
    assert between.min() >= 3000 // 8 - 2 and between.max() <= 3000 // 8 + 2


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), k=st.integers(2, 5), n=st.integers(6, 40))
def test_optimal_matches_brute_force(seed, k, n):
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=n).astype(np.float32))
    codebook, labels = kmeans_1d(x, k, optimal=True)
    assert sse(x, codebook, labels) == pytest.approx(optimal_sse(x.numpy(), k), rel=1e-5, abs=1e-9)
    # ...and Lloyd from any start is never better than optimal.
    for init in Init:
        cb, lb = kmeans_1d(x, k, init=init, seed=seed)
        assert sse(x, cb, lb) >= sse(x, codebook, labels) - 1e-6


@pytest.mark.parametrize("optimal", [False, True])
def test_fewer_distinct_values_than_clusters_is_exact(optimal):
    w = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0, 0.5] * 20)
    codebook, labels = kmeans_1d(w, 256, optimal=optimal)
    assert codebook.tolist() == [-1.0, 0.5, 2.0]
    assert torch.equal(codebook[labels], w)
    one = torch.full((50,), 0.25)
    codebook, labels = kmeans_1d(one, 4)
    assert codebook.tolist() == [0.25] and torch.equal(codebook[labels], one)

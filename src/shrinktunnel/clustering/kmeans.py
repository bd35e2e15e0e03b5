"""One-dimensional k-means: the codebook of a layer's weights.

Lloyd's algorithm on sorted values: in one dimension every cluster is a contiguous run of the sorted
weights, split at the midpoints between neighbouring centroids, so an iteration is k binary searches
(where the runs start) and k differences of a prefix sum (their means): O(k log n) after one
O(n log n) sort, whatever the layer's size. The optimal option solves the problem exactly (the
dynamic programme of Wang & Song 2011, with SMAWK speed-up, from the `kmeans1d` package).

Empty clusters are dropped at the end, so a codebook has at most 2^bits centroids, sorted ascending,
and exactly as many as there are distinct values when there are fewer (handled, not an error).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .config import Init

__all__ = ["kmeans_1d", "initial_centroids", "assign"]

KMEANS_PP_SAMPLE = 1 << 17  # kmeans++ seeds from at most this many weights (a random subset): O(k) passes


def initial_centroids(sorted_w: np.ndarray, k: int, init: Init, rng: np.random.Generator) -> np.ndarray:
    """k initial centroids (float64, sorted) for the sorted 1-D weights."""
    n = sorted_w.size
    lo, hi = float(sorted_w[0]), float(sorted_w[-1])
    if init == Init.LINEAR:
        return np.linspace(lo, hi, k)
    if init == Init.DENSITY:
        # The paper's density init: evenly spaced points on the CDF's y axis, read back on the x axis.
        q = (np.arange(k) + 0.5) / k
        return sorted_w[np.minimum((q * n).astype(np.int64), n - 1)].astype(np.float64)
    if init == Init.RANDOM:
        return np.sort(sorted_w[rng.choice(n, size=min(k, n), replace=False)].astype(np.float64))
    if init == Init.KMEANS_PP:
        x = sorted_w if n <= KMEANS_PP_SAMPLE else np.sort(sorted_w[rng.choice(n, KMEANS_PP_SAMPLE, replace=False)])
        x = x.astype(np.float64)
        centres = [x[rng.integers(x.size)]]
        d2 = (x - centres[0]) ** 2
        for _ in range(1, k):
            total = d2.sum()
            if total <= 0:  # every value already is a centre
                break
            c = x[min(int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")), x.size - 1)]
            centres.append(c)
            np.minimum(d2, (x - c) ** 2, out=d2)
        return np.sort(np.asarray(centres))
    raise ConfigError(f"unknown init {init!r}; use linear, density, random or kmeans++")


def assign(w: torch.Tensor | np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted `centroids` for each weight (ties go to the lower one)."""
    x = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, x.astype(np.float64), side="left")


def _lloyd(sorted_w: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    prefix = np.concatenate([[0.0], np.cumsum(sorted_w, dtype=np.float64)])
    for _ in range(iterations):
        mids = (centroids[1:] + centroids[:-1]) / 2
        bounds = np.concatenate([[0], np.searchsorted(sorted_w, mids, side="right"), [sorted_w.size]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        # An empty cluster keeps its centroid; it is dropped at the end if it stays empty.
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        new = np.sort(new)
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids


def _optimal(sorted_w: np.ndarray, k: int) -> np.ndarray:
    try:
        import kmeans1d
    except ImportError:  # only the missing package itself
        raise ConfigError("optimal: true needs the `kmeans1d` package: pip install kmeans1d, "
                          "or set optimal: false to use Lloyd's algorithm") from None
    result = kmeans1d.cluster(sorted_w.astype(np.float64), k)
    return np.sort(np.unique(np.asarray(result.centroids, dtype=np.float64)))


def kmeans_1d(w: torch.Tensor, k: int, *, init: Init = Init.LINEAR, iterations: int = 300,
              optimal: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, labels) of the 1-D weights `w`: at most k float32 centroids, sorted ascending and
    all used, and each weight's index into them (int64, w's shape). `w` must be finite and non-empty."""
    flat = w.detach().reshape(-1).cpu().double().numpy()
    sorted_w = np.sort(flat)
    distinct = int((np.diff(sorted_w) > 0).sum()) + 1
    if distinct <= k:
        centroids = np.unique(sorted_w)  # one centroid per distinct value: exact
    elif optimal:
        centroids = _optimal(sorted_w, k)
    else:
        rng = np.random.default_rng(seed)
        centroids = _lloyd(sorted_w, np.sort(initial_centroids(sorted_w, k, init, rng)), iterations)
    # float32 codebook, nearest-centroid labels computed against the float32 values actually stored.
    cb = np.unique(centroids.astype(np.float32)).astype(np.float64)
    labels = assign(flat, cb)
    used = np.bincount(labels, minlength=cb.size) > 0
    if not used.all():  # drop centroids no weight chose, keep the order
        cb = cb[used]
        labels = (np.cumsum(used) - 1)[labels]
    return torch.from_numpy(cb.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)).view(w.shape)

"""From a layer's rule (a given rank, an energy or a parameter ratio) to its ranks.

Every function here looks at one layer's weight only; the budgeted choice across layers, which needs
data, is in `budget.py`.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import ConfigError
from . import factorize as F
from . import layers as L

__all__ = ["check_rank", "ranks_for_ratio", "ranks_for_energy", "SVDCache", "WHITENED_SCHEMES"]

WHITENED_SCHEMES = ("svd", "channel")  # the schemes whose factors are one SVD of (out, in * kernel): the input
# (or its patches) multiplies that matrix directly, so its second moment whitens it


class SVDCache:
    """One SVD per (layer, scheme), shared by the energy rule, the candidates of the budget and the
    factors themselves: an SVD of a 1536 x 384 matrix costs more than everything else done to it.

    `whitenings` (id of a layer -> its input's `factorize.Whitening`): those layers' SVDs are of W S, the
    weight seen through the data (whitened_svd); the energy rule then counts the energy of the layer's
    output on the calibration data rather than of its weight."""

    def __init__(self, whitenings: dict[int, F.Whitening] | None = None) -> None:
        self._usv: dict[tuple[int, str], tuple] = {}
        self.whitenings = whitenings or {}

    def white(self, module: nn.Module, scheme: str) -> F.Whitening | None:
        return self.whitenings.get(id(module)) if scheme in WHITENED_SCHEMES else None

    def usv(self, module: nn.Module, scheme: str):
        if scheme not in ("svd", "channel", "spatial"):
            return None
        key = (id(module), scheme)
        if key not in self._usv:
            import torch

            m = F.matrix_view(scheme, module.weight.detach())
            white = self.white(module, scheme)
            with F.one_thread():
                self._usv[key] = F.whitened_svd(m, white) if white is not None else torch.linalg.svd(
                    m.double(), full_matrices=False)
        return self._usv[key]


def check_rank(name: str, module: nn.Module, scheme: str, rank: int | list[int]) -> list[int]:
    """The rank as a list (one entry, or [r_out, r_in] for tucker2), or a ConfigError naming the layer,
    its full rank and the fix."""
    full = L.full_rank(module, scheme)
    ranks = list(rank) if isinstance(rank, list) else [rank]
    if scheme == "tucker2" and len(ranks) == 1:
        # One integer for both channel modes: a thin side (a first conv's 1 or 3 input channels) keeps its
        # full rank; only a rank above both modes' full ranks is out of range.
        if 1 <= ranks[0] <= max(full):
            return L.tucker2_ranks(module, *(min(ranks[0], f) for f in full))
        full = [max(full)]  # the error below names the largest rank one integer may take
    if len(ranks) != len(full):
        raise ConfigError(f"decompose: rank={rank} for {name} ({scheme}) has {len(ranks)} entries; {scheme} takes "
                          f"one integer" + (" or [r_out, r_in]" if scheme == "tucker2" else ""))
    for r, f in zip(ranks, full):
        if not 1 <= r <= f:
            what = ("the rank of a tensor of this shape never exceeds" if scheme == "cp" else
                    "its full rank is")
            shown = full[0] if len(full) == 1 else full
            raise ConfigError(
                f"decompose: rank={rank} is out of range for {name} ({type(module).__name__} "
                f"{tuple(module.weight.shape)}, scheme {scheme}): {what} {shown}; give a rank from 1 to {shown}, "
                f"or a ratio, or set this layer's rank with an override {{pattern: {name!r}, rank: ...}}")
    return L.tucker2_ranks(module, *ranks) if scheme == "tucker2" else ranks


def ranks_for_ratio(module: nn.Module, scheme: str, ratio: float) -> list[int]:
    """The largest rank whose decomposed weights fit in `ratio` of the layer's (at least 1)."""
    allowed = ratio * module.weight.numel()
    full = L.full_rank(module, scheme)
    if scheme != "tucker2":
        r = math.floor(allowed / L.weights_per_rank(module, scheme))
        return [max(1, min(r, full[0]))]
    # Tucker-2: both channel ranks shrink in proportion to their modes' full ranks (a thin input side
    # such as a first conv of 1 or 3 channels keeps its full rank).
    best = [1, 1]
    for r_out in range(1, full[0] + 1):
        ranks = L.tucker2_ranks(module, r_out, max(1, min(full[1], round(r_out * full[1] / full[0]))))
        if L.decomposed_weights(module, scheme, ranks) <= allowed:
            best = ranks
    return best


def ranks_for_energy(module: nn.Module, scheme: str, energy: float, cache: SVDCache, *, cp_iterations: int = 100,
                     seed: int = 0) -> list[int]:
    """The smallest rank keeping `energy` of ||W||^2, i.e. ||W - W~||^2 <= (1 - energy) ||W||^2.

    svd / channel / spatial: exact (Eckart-Young on the scheme's matrix). tucker2: each mode keeps
    1 - (1 - energy) / 2 of its unfolding's energy, which bounds the HOSVD error by the sum of what the
    two modes drop (De Lathauwer et al. 2000, property 10), and HOOI only lowers it. cp: a bisection on
    the rank with CP-ALS, which assumes the ALS error falls with the rank (it does in practice, not by proof);
    the rank is searched up to where the CP form stops being smaller than the layer."""
    if scheme in ("svd", "channel", "spatial"):
        _, s, _ = cache.usv(module, scheme)
        return [F.energy_rank(s, energy)]
    w = module.weight.detach()
    if scheme == "tucker2":
        per_mode = 1 - (1 - energy) / 2
        return L.tucker2_ranks(module, F.energy_rank(F.mode_singular_values(w, 0), per_mode),
                               F.energy_rank(F.mode_singular_values(w, 1), per_mode))
    lo, hi = 1, max(1, min(L.full_rank(module, scheme)[0], math.ceil(w.numel() / L.weights_per_rank(module, scheme))))
    target = math.sqrt(max(0.0, 1 - energy))
    while lo < hi:
        mid = (lo + hi) // 2
        fs = F.cp_factors(w, mid, cp_iterations, seed)
        if F.relative_error(w, F.reconstruct("cp", fs)) <= target + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return [lo]

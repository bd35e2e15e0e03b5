"""Per-group scale and zero-point search: the (scale, zero point) of each group of weights with the least
(importance-weighted) squared rounding error, instead of the min-max range's.

A min-max range spends grid steps on a group's one or two extreme weights; shrinking the range clips them
and gives every other weight of the group a finer step. The search, per group and independently:

- candidates: the range shrunk by r = 1, 1 - 1/grid, ... (down to `1 - max_shrink`), as the GPTQ reference
  code's `Quantizer(mse=True)` and AWQ's `auto_clip` do; asymmetric ranges keep their integer zero point
  rounded from the shrunk minimum (`ops.affine_qparams_tensor`'s rule);
- for each candidate, the least-squares refit of the scale given its integer codes (llama.cpp's k-quants
  `make_qkx2_quants` refit the scale and the minimum the same way; here the zero point stays an integer,
  the format's): s' = sum d w (q - z) / sum d (q - z)^2, then the codes re-rounded with s';
- the error: sum_j d_j (w_j - s (q_j - z))^2 with d_j an importance per input column (the diagonal of the
  layer's input Hessian, llama.cpp's importance matrix; all ones without data).

r = 1 without refit is exactly `ops.weight_qparams`' min-max choice and is always a candidate, so the
weighted error never exceeds min-max's. Used for GPTQ's static groups (act-order) and its groups computed
in the column loop, and for round-to-nearest in the weight-only path (quant/gptq.weight_only_round).
"""

from __future__ import annotations

import torch

from .ops import affine_qparams_tensor, symmetric_scale

__all__ = ["search_qparams", "weighted_error"]

GRID = 20
MAX_SHRINK = 0.3  # ranges down to 70 % of min-max: past that the clipped weights' error dominates


def _codes(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(g / s) + z, qmin, qmax)


def weighted_error(g: torch.Tensor, d: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
                   ) -> torch.Tensor:
    """sum over each group of d (w - s (q - z))^2; g (out, G, gs), d broadcastable, s / z (out, G, 1)."""
    return (d * (g - (_codes(g, s, z, qmin, qmax) - z) * s) ** 2).sum(dim=2, keepdim=True)


@torch.no_grad()
def search_qparams(w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, group_size: int | None,
                   importance: torch.Tensor | None = None, grid: int = GRID, max_shrink: float = MAX_SHRINK
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32 (out, G), zero point int32 (out, G)) of a (out, in) weight in groups of `group_size`
    inputs (None: one group per row), the shapes `ops.weight_qparams(..., "per_group")` gives.
    `importance` (in,): the weight of each input column's squared error (None: all equal)."""
    w = w.detach().float()
    out, k = w.shape
    gs = group_size or k
    g = w.reshape(out, k // gs, gs)
    d = torch.ones(1, 1, gs) if importance is None else importance.detach().float().clamp_min(0).reshape(1, k // gs, gs)
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    best_s = best_z = best_e = None
    for i in range(int(round(max_shrink * grid)) + 1):
        r = 1.0 - i / grid
        if symmetric:
            s = symmetric_scale(torch.maximum(-lo, hi) * r, qmax)
            z = torch.zeros_like(s)
        else:
            s, z = affine_qparams_tensor(lo * r, hi * r, qmin, qmax)
            z = z.float()
        cands = [(s, z)]
        c = _codes(g, s, z, qmin, qmax) - z
        den = (d * c * c).sum(dim=2, keepdim=True)
        refit = (d * g * c).sum(dim=2, keepdim=True) / den.clamp_min(1e-30)
        cands.append((torch.where((den > 0) & (refit > 0), refit, s), z))
        for cs, cz in cands:
            e = weighted_error(g, d, cs, cz, qmin, qmax)
            if best_e is None:
                best_s, best_z, best_e = cs, cz, e
            else:
                better = e < best_e
                best_s, best_z, best_e = (torch.where(better, cs, best_s), torch.where(better, cz, best_z),
                                          torch.minimum(e, best_e))
    return best_s.squeeze(2).float().contiguous(), best_z.squeeze(2).to(torch.int32).contiguous()

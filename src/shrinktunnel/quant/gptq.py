"""GPTQ (Frantar et al., ICLR 2023): weights rounded one input column at a time, each rounding error
spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's squared output
error, H = 2 X^T X over the calibration inputs X (tokens x in_features).

Round-to-nearest treats every weight alone; GPTQ lets later columns absorb the error of earlier ones
along the directions the inputs actually excite. At 4 bits this is the difference between a usable
and a damaged transformer. Per-group scales are computed when the first column of a group is reached,
from the weights as the earlier corrections left them (the paper's grouping), so a group's scale fits
what will really be rounded.

Only Linear layers: the Hessian here is over in_features (a convolution would need unfolded inputs).
"""

from __future__ import annotations

import torch

from .ops import weight_qparams

__all__ = ["HessianObserver", "gptq_quantize"]


class HessianObserver:
    """Streams H = 2/n sum x x^T over every row x (the last dimension) of a layer's inputs; memory is
    in_features^2 floats whatever the amount of data."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        total = self.count + n
        self.h.mul_(self.count / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.count = total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers in [qmin, qmax] (float tensor, weight's shape), scale, zero_point) of a Linear weight
    (out, in); scale and zero point shaped as `ops.weight_qparams` gives them."""
    w = weight.detach().double().clone()
    out, k = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    # The upper Cholesky factor of H^-1 holds, row by row, the update coefficients of the sequential
    # rounding (the paper's Cholesky reformulation: numerically stable, no per-column inverse updates).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    per_group = granularity == "per_group"
    if not per_group:
        scale, zero_point = weight_qparams(w.float(), qmin, qmax, symmetric, granularity)
        col_scale, col_zp = scale.double().unsqueeze(1), zero_point.double().unsqueeze(1)
    else:
        block = max(group_size, block // group_size * group_size)  # groups never straddle two blocks
        scales, zps = [], []
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if per_group and col % group_size == 0:
                s, z = weight_qparams(w1[:, i:i + group_size].float(), qmin, qmax, symmetric, "per_channel")
                scales.append(s)
                zps.append(z)
                col_scale, col_zp = s.double().unsqueeze(1), z.double().unsqueeze(1)
            x = w1[:, i:i + 1]
            qi = torch.clamp(torch.round(x / col_scale) + col_zp, qmin, qmax)  # round half to even
            q[:, col:col + 1] = qi
            deq = (qi - col_zp) * col_scale
            err = (x - deq) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if per_group:
        scale, zero_point = torch.stack(scales, dim=1), torch.stack(zps, dim=1)
    return q.float(), scale, zero_point

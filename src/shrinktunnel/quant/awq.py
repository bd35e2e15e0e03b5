"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), weight-only.

A few input channels carry most of a Linear's activation energy; their weights matter most. AWQ scales
each input channel's weights up by s_j before rounding (W * s) and its inputs down (x / s), which leaves
the float product unchanged and gives the salient channels relatively finer steps. Here:

- Scale search (`search_scale`): s = mean|x_j|^alpha, normalised by sqrt(max s * min s), alpha on a grid
  of 20 from 0 to 0.95 (alpha = 0: s = 1, no scaling, is a candidate), chosen by the squared output error
  of the quantized Linears on the calibration rows; Linears reading one input (q / k / v, gate / up)
  share one s, scored on the sum of their errors. The reference implementation (llm-awq) scores the
  whole attention block for q / k / v; the Linears' own outputs are scored here, cheaper, and the same
  for every architecture.
- Clipping search (`search_clip`): per group of weights, the range shrunk by r in 1, 0.975, ... 0.525
  (20 steps, at most to half, llm-awq's `auto_clip`), chosen per output channel and group by the squared
  error of that group's partial dot products on 512 calibration rows.
- Where s goes: the layer keeps 1 / s as its `input_smooth` buffer (one multiply of the input at run
  time, the SmoothQuant layer's, exported as one Mul), so it works on any model; folding 1 / s into the
  RMSNorm / previous Linear before it, as llm-awq does, would remove that multiply (not done).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["fake_quant", "search_scale", "search_clip", "sample_rows"]

GRID = 20
MAX_SHRINK = 0.5
CLIP_ROWS = 512
SCALE_ROWS = 1024  # rows scoring the 20 alphas: one scalar to rank; 4096 cost 1.6x the CPU (SmolLM2 gate/up: 7.9 s
# against 5.0 s a block) for the same alpha on the blocks measured


def fake_quant(w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, group_size: int | None) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a (out, in) weight, per output channel or per group of
    `group_size` inputs, the arithmetic of ops.weight_qparams / quantize_weight in float."""
    out, k = w.shape
    g = w.reshape(out, -1, group_size or k)
    if symmetric:
        scale = g.abs().amax(dim=2, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=2, keepdim=True).clamp(max=0)
        hi = g.amax(dim=2, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(g / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).reshape(out, k)


def sample_rows(rows: list[torch.Tensor], n: int) -> torch.Tensor:
    """At most n rows of the concatenated calibration inputs, evenly spaced (deterministic)."""
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).float()
    if x.shape[0] > n:
        x = x[torch.linspace(0, x.shape[0] - 1, n).long()]
    return x


@torch.no_grad()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], quant: Callable[[torch.Tensor], torch.Tensor],
                 grid: int = GRID) -> tuple[torch.Tensor, dict]:
    """(s per input channel, {alpha, error, error_unscaled}) for Linears reading the rows x (n, in)."""
    x = x.float()
    x_mean = x.abs().mean(dim=0)
    refs = [x @ w.float().t() for w in weights]
    best = (float("inf"), None, None)
    errors = []
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs):
            wq = quant(w.float() * s) / s
            err += float(((x @ wq.t() - ref) ** 2).mean())
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], {"alpha": best[1], "error": best[0], "error_unscaled": errors[0]}


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                group_size: int | None, grid: int = GRID, max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """The weight (out, in) with each group's range clipped at the shrink ratio whose quantized partial
    products x_g . w_g on the rows x (n, in) are closest to the float ones."""
    out, k = w.shape
    gs = group_size or k
    x = x.float()[:CLIP_ROWS]
    xg = x.reshape(x.shape[0], k // gs, gs)  # (n, G, gs)
    wg = w.float().reshape(out, k // gs, gs)  # (out, G, gs)
    result = wg.clone()
    step = 64 if out * x.shape[0] * (k // gs) <= 64 * 512 * 64 else 16
    for o in range(0, out, step):
        wb = wg[o:o + step]  # (b, G, gs)
        ref = torch.einsum("ngk,bgk->bgn", xg, wb)
        hi, lo = wb.amax(dim=2, keepdim=True), wb.amin(dim=2, keepdim=True)
        amax = torch.maximum(hi, -lo)
        best_err = torch.full(wb.shape[:2], float("inf"))
        best = wb.clone()
        for i in range(int(max_shrink * grid)):
            r = 1 - i / grid
            cur = torch.clamp(wb, -amax * r, amax * r) if symmetric else torch.clamp(wb, lo * r, hi * r)
            deq = fake_quant(cur.reshape(-1, gs), qmin, qmax, symmetric, None).reshape(cur.shape)
            err = ((torch.einsum("ngk,bgk->bgn", xg, deq) - ref) ** 2).mean(dim=2)  # (b, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(2), cur, best)
        result[o:o + step] = best
    return result.reshape(out, k).to(w.dtype)

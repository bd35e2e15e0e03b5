"""The weight histogram of one layer with the values it may take after compression: the levels of
its quantization grid (from a quantized layer's own scales, or those a quantizer would choose for a
float layer) or the centroids of its shared-weight codebook. Plain data for the HTML report."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..quant.ops import weight_qparams, weight_qrange

__all__ = ["layer_histogram", "float_weight"]

MAX_GRID = 256  # levels listed at most (8-bit grids have 255)


def float_weight(module: nn.Module) -> torch.Tensor | None:
    """The float weight of a layer as it computes with it (dequantized for compressed layers)."""
    deq = getattr(module, "dequantized_weight", None)
    if callable(deq):
        return deq().detach().float()
    w = getattr(module, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):  # compressed layers that build their weight (shared)
        with torch.no_grad():
            w = w()
    return w.detach().float() if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


def _widest_channel(w: torch.Tensor) -> int:
    rows = w.reshape(w.shape[0], -1)
    return int(rows.abs().amax(dim=1).argmax())


def _quantized_grid(module: nn.Module, channel: int) -> tuple[list[float], str] | None:
    fmt = getattr(module, "_format", None)
    scale = getattr(module, "weight_scale", None)
    zp = getattr(module, "weight_zero_point", None)
    if not isinstance(fmt, dict) or scale is None or zp is None:
        return None
    s = float(scale.reshape(scale.shape[0], -1)[channel, 0])
    z = int(zp.reshape(zp.shape[0], -1)[channel, 0])
    levels = torch.arange(int(fmt["qmin"]), int(fmt["qmax"]) + 1, dtype=torch.float64)
    return [float(v) for v in (levels - z) * s], f"{fmt['bits']}-bit quantization grid (channel {channel})"


def _codebook(module: nn.Module) -> tuple[list[float], str] | None:
    for name, buf in list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False)):
        if any(k in name.lower() for k in ("codebook", "centroid")) and buf.numel() <= MAX_GRID:
            return [float(v) for v in buf.detach().reshape(-1)], f"{buf.numel()} shared-weight centroids"
    return None


def layer_histogram(module: nn.Module, name: str, *, bits: int | None = 4, bins: int = 60) -> dict[str, Any] | None:
    """Histogram of one output channel of the layer (the one of widest range, where a grid is
    coarsest) with its grid: the layer's own grid or codebook if it has one, else the grid a
    symmetric per-channel quantizer at `bits` would give it (None: no grid)."""
    w = float_weight(module)
    if w is None or w.numel() == 0:
        return None
    channel = _widest_channel(w)
    values = w.reshape(w.shape[0], -1)[channel]
    found = _quantized_grid(module, channel) or _codebook(module)
    if found is None and bits is not None:
        qmin, qmax = weight_qrange(bits, True)
        scale, zp = weight_qparams(w, qmin, qmax, True, "per_channel", None)
        s = float(scale.reshape(-1)[channel])
        found = [float(q * s) for q in range(qmin, qmax + 1)], f"{bits}-bit per-channel grid (channel {channel}) a quantizer would use"
    grid, grid_label = found if found is not None else ([], "")
    lo, hi = float(values.min()), float(values.max())
    if grid:
        lo, hi = min(lo, min(grid)), max(hi, max(grid))
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(values.double(), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"layer": name, "channel": channel, "values": int(values.numel()),
            "edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "grid": grid[:MAX_GRID], "grid_label": grid_label}

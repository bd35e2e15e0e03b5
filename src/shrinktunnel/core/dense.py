"""The dense float weight a method's layer computes with, whatever stores it: read by the layers that look
through another layer's weight (a tied embedding's rows, a recurrent layer's matrices)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dense_weight"]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The dense float weight a method's layer computes with."""
    if hasattr(layer, "fake_weight"):  # quant/qat.FakeQuantLayer while training: the rows it computes with
        return layer.fake_weight()
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    if hasattr(layer, "float_weight"):  # quant/float_formats.FloatWeightLayer: stored in 16 / 8 bits
        return layer.float_weight()
    return layer.weight  # ClusteredLayer's dense weight; SparseLayer's buffer

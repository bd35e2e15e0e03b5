"""Multiply-accumulates of one forward pass, counted by torch's FlopCounterMode (every aten op,
including the matmuls of attention that module hooks would miss)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core import data as D

__all__ = ["count_macs"]


def count_macs(model: nn.Module, inputs: D.Inputs, *, per_sample: bool = True) -> int:
    """MACs of `model` on `inputs` ((args, kwargs)); divided by the batch size when `per_sample`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        D.forward(model, inputs)
    macs = counter.get_total_flops() // 2
    if per_sample:
        batch = _batch_size(inputs)
        macs //= max(batch, 1)
    return int(macs)


def _batch_size(inputs: D.Inputs) -> int:
    args, kwargs = inputs
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return 1

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
        batch = D.batch_size(inputs)
        macs //= max(batch, 1)
    return int(macs)


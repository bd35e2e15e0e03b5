"""Observers: streaming statistics of a tensor, turned into a quantization range.

Memory is constant per observed tensor, whatever the amount of calibration data.
"""

from __future__ import annotations

import math

import torch

from .ops import affine_qparams

__all__ = ["MinMaxObserver", "OBSERVERS", "make_observer"]


class MinMaxObserver:
    """The running minimum and maximum (per tensor)."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach().float())
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        self.count += 1

    def qparams(self, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
        if self.count == 0:
            raise RuntimeError("observer saw no data")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            raise ValueError(f"observed range [{self.lo}, {self.hi}] is not finite")
        return affine_qparams(self.lo, self.hi, qmin, qmax, symmetric)


OBSERVERS = {"minmax": MinMaxObserver}


def make_observer(name: str):
    return OBSERVERS[name]()

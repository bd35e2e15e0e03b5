"""Module-level MODEL / DATA factories, referenced by path as "tests/helpers/factories.py:NAME".

This file is loaded by shrinktunnel's reference resolver (core/refs.py), not imported by pytest, so
it is self-contained: it must not import conftest.
"""

import torch
from torch import nn


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


def mlp():
    """A 'trained' model: fixed weights, so that every call returns the same network."""
    torch.manual_seed(0)
    return SmallMLP().eval()


def wide_mlp():
    """Wide enough that 2-bit weights make each layer smaller on disk (SmallMLP's are too small to shrink)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 256), nn.ReLU(), nn.Linear(256, 3)).eval()


def mlp_other_weights():
    """Same architecture, different weights (the artifact's tensors must win on load)."""
    torch.manual_seed(123)
    return SmallMLP().eval()


def residual():
    torch.manual_seed(0)
    return Residual().eval()


def broken_forward():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            raise RuntimeError("this forward always fails")

    return Broken()


def not_a_module():
    return {"not": "a module"}


def raising_factory():
    raise RuntimeError("the factory failed")


def raising_factory_multiline():
    raise RuntimeError("first line of the failure\nsecond line of the failure")


def calibration_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(8, 6, generator=g) for _ in range(3)]


NOT_CALLABLE = 42

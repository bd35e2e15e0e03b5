"""Tiny awkward networks for structured pruning: every way channels get tied together."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResBlockNet(nn.Module):
    """stem conv+BN, two residual blocks (the skip ties the stem's channels to both blocks), GAP, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(x + self.b2(x))
        return self.fc(x.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a 1x1 conv and a flatten into Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 5, padding=2)
        self.mix = nn.Conv2d(20, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.adaptive_avg_pool2d(F.relu(self.mix(y)), 4)
        return self.fc(torch.flatten(y, 1))


class DepthwiseNet(nn.Module):
    """MobileNet block: pointwise expand + BN, depthwise 3x3 + BN, pointwise project, GAP, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.expand(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.fc(self.project(x).mean(dim=(2, 3)))


class GroupedNet(nn.Module):
    """A grouped 3x3 conv (groups=4) between two dense convs: kept channels must balance per group."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.g(F.relu(self.c1(x))))
        return self.fc(self.c2(x).mean(dim=(2, 3)))


class MultiHeadNet(nn.Module):
    """Two-head self-attention written with explicit reshapes to (B, h, T, d), residual, FFN, LayerNorm."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.d = heads, d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda z: z.reshape(b, t, self.h, -1).transpose(1, 2)  # (B, h, T, d/h)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = self.ln(x)
        return x + self.ff2(F.gelu(self.ff1(x)))


class SharedLayerNet(nn.Module):
    """One conv applied twice (its output feeds itself), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = F.relu(self.shared(F.relu(self.shared(x))))
        return self.head(x.mean(dim=(2, 3)))


class InputSkipNet(nn.Module):
    """conv(x) added to the input x itself: the conv's channels are tied to the input (never prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.mid = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = x + self.conv(x)
        return self.head(F.relu(self.mid(y)).mean(dim=(2, 3)))


class ScaleLayer(nn.Module):
    """A custom layer with its own per-channel parameter: not in the surgery table."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.gain


class CustomLayerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = ScaleLayer(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.c2(self.scale(F.relu(self.c1(x)))))
        return self.head(x.mean(dim=(2, 3)))


def _img(c, s):
    return lambda n, g: torch.randn(n, c, s, s, generator=g)


# name -> (class, inputs(n, generator), layers that must shrink at ratio 0.5)
NETS = {
    "resblock": (ResBlockNet, _img(3, 8), ("b1.0", "b2.0")),
    "concat": (ConcatNet, _img(3, 8), ("a", "b", "mix")),
    "depthwise": (DepthwiseNet, _img(3, 8), ("expand", "dw")),
    "grouped": (GroupedNet, _img(3, 8), ("c1", "g")),
    "multihead": (MultiHeadNet, lambda n, g: torch.randn(n, 5, 16, generator=g), ("ff1",)),
    "shared": (SharedLayerNet, _img(3, 8), ("inp",)),
    "input_skip": (InputSkipNet, _img(3, 8), ("mid",)),
    "custom_layer": (CustomLayerNet, _img(3, 8), ("c2",)),
}


def make(name: str, seed: int = 0) -> nn.Module:
    cls = NETS[name][0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls()
        # Non-trivial BatchNorm statistics, so that pruning them wrongly would show in the outputs.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.1, 1.5)
        return model.eval()


def inputs(name: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    return NETS[name][1](n, torch.Generator().manual_seed(seed))

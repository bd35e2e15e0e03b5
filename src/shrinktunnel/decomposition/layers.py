"""Decomposed layers: a chain of plain nn.Linear / nn.Conv layers in a `LowRank` container.

The chain is made only of standard modules, so it exports to ONNX as ordinary Gemm/MatMul/Conv nodes
and any later stage (quantize, prune) sees ordinary layers. `build(module, scheme, ranks)` makes the
structure from the original layer alone (what replay needs); `decompose_layer` fills it with factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..quant.modules import QuantizedLayer, SpecAttributes
from . import factorize as F
from .config import ConvScheme

__all__ = ["LowRank", "dense_weight", "layer_kind", "build", "decompose_layer", "full_rank", "weights_per_rank", "decomposed_weights",
           "schemes_for"]

KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}


class LowRank(SpecAttributes, nn.Sequential):
    """A decomposed layer: computes what the original layer computed, through thin layers in sequence.
    `scheme` and `ranks` say how it was built (they are also in the artifact's replay).

    It answers the replaced layer's attributes as the other methods' layers do (SpecAttributes):
    `in_features`, `stride`, `kernel_size`, ... from `_spec` (the original's geometry), and `weight`, the
    dense weight the chain computes (model code reads it outside the forward: transformers' ViT casts its
    pixels to `projection.weight.dtype`, T5 reads `wo.weight.dtype`)."""

    def __init__(self, *layers: nn.Module, scheme: str, ranks: list[int], spec: dict[str, Any] | None = None) -> None:
        super().__init__(*layers)
        self.scheme = scheme
        self.ranks = list(ranks)
        self._spec = spec
        self._dense: torch.Tensor | None = None
        self._dense_from: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (original shape) the chain computes: rebuilt while training or exporting,
        else cached while the chain's weights are unchanged."""
        ws = [layer.weight for layer in self]
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws) or torch.compiler.is_exporting():
            return dense_weight(self.scheme, ws)
        key = tuple((w.data_ptr(), w._version, w.device) for w in ws)
        if self._dense_from != key:
            with torch.no_grad():
                self._dense = dense_weight(self.scheme, ws)
            self._dense_from = key
        return self._dense

    @property
    def bias(self) -> torch.Tensor | None:
        return self[-1].bias

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, ranks={self.ranks}"


def dense_weight(scheme: str, ws: list[torch.Tensor]) -> torch.Tensor:
    """The weight of the one layer that the chain of layers with weights `ws` computes (their dtype)."""
    if scheme == "svd":
        first, second = ws  # (r, in), (out, r)
        return second @ first
    if scheme == "channel":
        first, second = ws  # (r, in, *k), (out, r, 1...)
        return torch.einsum("tr,rs...->ts...", second.flatten(1), first)
    if scheme == "spatial":
        vertical, horizontal = ws  # (r, in, kh, 1), (out, r, 1, kw)
        return torch.einsum("rsh,trw->tshw", vertical[..., 0], horizontal[:, :, 0])
    if scheme == "tucker2":
        u_in, core, u_out = ws  # (r_in, in, 1...), (r_out, r_in, *k), (out, r_out, 1...)
        return torch.einsum("ab...,ta,bs->ts...", core, u_out.flatten(1), u_in.flatten(1))
    if scheme == "cp":
        b, c, d, a = ws  # (r, in, 1, 1), (r, 1, kh, 1), (r, 1, 1, kw), (out, r, 1, 1)
        return torch.einsum("tr,rs,rh,rw->tshw", a.flatten(1), b.flatten(1), c.flatten(1), d.flatten(1))
    raise ValueError(f"unknown scheme {scheme!r}")


def layer_kind(module: nn.Module) -> str | None:
    """'linear' / 'conv1d' / 'conv2d' for exactly those classes (a subclass may override forward, or its
    parent may read its weight, as nn.MultiheadAttention reads out_proj's); None otherwise."""
    return KINDS.get(type(module))


def schemes_for(kind: str) -> tuple[str, ...]:
    if kind == "linear":
        return ("svd",)
    if kind == "conv1d":
        return (ConvScheme.CHANNEL.value, ConvScheme.TUCKER2.value)
    return tuple(s.value for s in ConvScheme)


def _dims(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear (kernel ()) or an ungrouped convolution."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


def full_rank(module: nn.Module, scheme: str) -> list[int]:
    """The largest rank (per mode for tucker2) that means anything for this layer and scheme."""
    t, s, k = _dims(module)
    kprod = 1
    for d in k:
        kprod *= d
    if scheme in ("svd", "channel"):
        return [min(t, s * kprod)]
    if scheme == "spatial":
        return [min(s * k[0], t * k[1])]
    if scheme == "tucker2":
        return [min(t, s * kprod), min(s, t * kprod)]
    # cp: the rank of a tensor never exceeds the product of all its dimensions but the largest
    dims = sorted([t, s, *k])
    prod = 1
    for d in dims[:-1]:
        prod *= d
    return [prod]


def tucker2_ranks(module: nn.Module, r_out: int, r_in: int) -> list[int]:
    """[r_out, r_in] made consistent: a core (r_out, r_in, *k) has a mode-0 unfolding of r_in * prod(k)
    columns, so HOOI finds at most r_in * prod(k) output directions (and r_out * prod(k) input ones). A
    larger rank would only hold zeros, and the factors would not fill the layer built for it (timm's
    efficientnet_b0 stem, 32 x 3 x 3 x 3 at ratio 0.5: [10, 1] has room for 9 output directions)."""
    _, _, k = _dims(module)
    kprod = _prod(k)
    r_out = min(r_out, r_in * kprod)
    return [r_out, min(r_in, r_out * kprod)]


def original_weights(module: nn.Module) -> int:
    return module.weight.numel()


def weights_per_rank(module: nn.Module, scheme: str) -> int:
    """Weights added by one unit of rank (every scheme but tucker2 is linear in its rank)."""
    t, s, k = _dims(module)
    if scheme == "svd":
        return t + s
    if scheme == "channel":
        return s * _prod(k) + t
    if scheme == "spatial":
        return s * k[0] + t * k[1]
    if scheme == "cp":
        return t + s + sum(k)
    raise ValueError(scheme)


def decomposed_weights(module: nn.Module, scheme: str, ranks: list[int]) -> int:
    """Weights of the decomposed form (biases are the same either way and are left out)."""
    if scheme == "tucker2":
        t, s, k = _dims(module)
        r_out, r_in = ranks
        return s * r_in + r_out * r_in * _prod(k) + t * r_out
    return ranks[0] * weights_per_rank(module, scheme)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _conv(module: nn.Module, cin: int, cout: int, kernel, *, geometry: dict[str, Any] | None = None,
          groups: int = 1, bias: bool = False) -> nn.Module:
    cls = type(module)
    geo = {"stride": 1, "padding": 0, "dilation": 1, "padding_mode": "zeros"} if geometry is None else geometry
    return cls(cin, cout, kernel, groups=groups, bias=bias, **geo)


def _geometry(module: nn.Module, axis: int | None = None) -> dict[str, Any]:
    """The convolution's stride / padding / dilation, whole or restricted to one spatial axis (the other
    axis gets stride 1, padding 0, dilation 1). A string padding ("same", "valid") applies as is: with a
    kernel of 1 along the other axis it adds nothing there."""
    stride, padding, dilation = module.stride, module.padding, module.dilation
    if axis is not None:
        def on(values, default):
            return tuple(v if i == axis else default for i, v in enumerate(values))
        stride, dilation = on(stride, 1), on(dilation, 1)
        if not isinstance(padding, str):
            padding = on(padding, 0)
    return {"stride": stride, "padding": padding, "dilation": dilation, "padding_mode": module.padding_mode}


def build(module: nn.Module, scheme: str, ranks: list[int]) -> LowRank:
    """The decomposed structure of `module` (weights uninitialised in value, right in shape and dtype).

    The first layers never carry a bias: a 1 x 1 (or axis-restricted) convolution without bias maps the
    zero padding of the next layer to zero, so padding may move down the chain without changing the result."""
    bias = module.bias is not None
    t, s, k = _dims(module)
    if scheme == "svd":
        (r,) = ranks
        layers = [nn.Linear(s, r, bias=False), nn.Linear(r, t, bias=bias)]
    elif scheme == "channel":
        (r,) = ranks
        layers = [_conv(module, s, r, k, geometry=_geometry(module)), _conv(module, r, t, 1, bias=bias)]
    elif scheme == "spatial":
        (r,) = ranks
        layers = [_conv(module, s, r, (k[0], 1), geometry=_geometry(module, 0)),
                  _conv(module, r, t, (1, k[1]), geometry=_geometry(module, 1), bias=bias)]
    elif scheme == "tucker2":
        r_out, r_in = ranks
        layers = [_conv(module, s, r_in, 1), _conv(module, r_in, r_out, k, geometry=_geometry(module)),
                  _conv(module, r_out, t, 1, bias=bias)]
    elif scheme == "cp":
        (r,) = ranks
        layers = [_conv(module, s, r, 1),
                  _conv(module, r, r, (k[0], 1), geometry=_geometry(module, 0), groups=r),
                  _conv(module, r, r, (1, k[1]), geometry=_geometry(module, 1), groups=r),
                  _conv(module, r, t, 1, bias=bias)]
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    w = module.weight
    spec = {**QuantizedLayer.geometry(module), "scheme": scheme, "ranks": list(ranks)}
    return LowRank(*layers, scheme=scheme, ranks=ranks, spec=spec).to(device=w.device, dtype=w.dtype)


def factors(module: nn.Module, scheme: str, ranks: list[int], *, tucker_iterations: int = 2,
            cp_iterations: int = 100, seed: int = 0, usv=None, white: F.Whitening | None = None) -> tuple[torch.Tensor, ...]:
    """The factors of `module`'s weight (float64). `usv`: a precomputed SVD of the scheme's matrix view
    (of the whitened view when `white` is given: svd and channel only)."""
    w = module.weight.detach()
    if white is not None and scheme not in ("svd", "channel"):
        raise ValueError(f"whitening applies to the svd and channel schemes, not {scheme}")
    if scheme in ("svd", "channel", "spatial"):
        r = ranks[0]
        if scheme == "svd":
            left, right = F.svd_factors(w, r, usv, white)
            return right, left  # layer order: first (r, in), second (out, r)
        if scheme == "channel":
            return F.channel_factors(w, r, usv, white)
        return F.spatial_factors(w, r, usv)
    if scheme == "tucker2":
        return F.tucker2_factors(w, ranks[0], ranks[1], tucker_iterations)
    return F.cp_factors(w, ranks[0], cp_iterations, seed)


def _layer_weights(scheme: str, fs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The weight of each layer of the chain, from the factors."""
    if scheme in ("svd", "channel", "spatial"):
        return list(fs)
    if scheme == "tucker2":
        u_in, core, u_out = fs
        ones = [1] * (core.dim() - 2)
        return [u_in.T.reshape(u_in.shape[1], u_in.shape[0], *ones), core, u_out.reshape(*u_out.shape, *ones)]
    a, b, c, d = fs  # (T, R), (S, R), (kh, R), (kw, R)
    r = a.shape[1]
    return [b.T.reshape(r, -1, 1, 1), c.T.reshape(r, 1, -1, 1), d.T.reshape(r, 1, 1, -1), a.reshape(*a.shape, 1, 1)]


def decompose_layer(module: nn.Module, scheme: str, ranks: list[int], **kw) -> tuple[LowRank, float]:
    """The decomposed layer and its relative weight error ||W - W~|| / ||W||."""
    fs = factors(module, scheme, ranks, **kw)
    out = build(module, scheme, ranks)
    with torch.no_grad():
        for layer, weight in zip(out, _layer_weights(scheme, fs)):
            layer.weight.copy_(weight.reshape(layer.weight.shape))
        if module.bias is not None:
            out[-1].bias.copy_(module.bias.detach())
    error = F.relative_error(module.weight.detach(), F.reconstruct(scheme, fs))
    return out, error

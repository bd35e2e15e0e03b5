"""How: the per-layer-type rewrite table. Given the channels a layer keeps along its output and input,
its tensors are sliced and its shape attributes updated in place (the module keeps its type, so the
model's forward runs unchanged). `apply` rebuilds a pruned model from the kept indices alone: the
method uses it after choosing them, and `replay` uses it on load, so both build the same shapes.

| layer | out: kept output channels | in: kept input channels |
|---|---|---|
| Linear | weight rows, bias | weight columns |
| Conv1d/2d/3d, groups 1 | weight[out], bias | weight[:, in] |
| Conv, depthwise (groups = in = out) | weight, bias, groups: out and in are the same channels | |
| Conv, grouped | weight rows; the same count must stay in each group | per group, its local columns |
| BatchNorm1d/2d/3d | weight, bias, running_mean, running_var (out and in are the same channels) | |
| LayerNorm (over the last dimension) | weight, bias | |
| Embedding | weight columns (embedding_dim) | |
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["supported", "is_depthwise", "along", "apply", "KINDS"]

_Conv = nn.modules.conv._ConvNd
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "Embedding")


def supported(module: nn.Module) -> bool:
    if isinstance(module, _CONVS):
        return True  # ConvTranspose* store (in, out) weights: not in the table
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    return isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.Embedding))


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _Conv) and 1 < module.groups == module.in_channels == module.out_channels


def along(module: nn.Module, dim: str, grad: bool = False) -> torch.Tensor | None:
    """The weight (or its gradient) as (channels, -1) rows along `dim`, in the layer's own channel
    numbering: row c holds every weight that disappears with channel c. None: nothing to score."""
    w = module.weight.grad if grad else module.weight
    if w is None:
        return None
    w = w.detach()
    if isinstance(module, nn.Linear):
        return w if dim == "out" else w.t()  # (out, in) / (in, out)
    if isinstance(module, _Conv):
        if dim == "out" or is_depthwise(module):
            return w.flatten(1)  # (Cout, Cin/g * k...)
        g = module.groups
        # (Cout, Cin/g, k...) -> (g, Cout/g, Cin/g, K) -> (Cin, Cout/g * K): input c of group j feeds only
        # the outputs of group j.
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).permute(0, 2, 1, 3).reshape(g * w.shape[1], -1)
    if isinstance(module, nn.Embedding):
        return w.t() if dim == "out" else None
    return w.reshape(-1, 1)  # norms: gamma per channel


def _param(old: nn.Parameter | None, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=True if old is None else old.requires_grad)


def _index(n: int, kept: list[int] | None) -> torch.Tensor | None:
    if kept is None:
        return None
    if not kept:
        raise ModelError("prune_channels: a layer would keep no channel (internal error: selection must refuse this)")
    if kept[-1] >= n or kept != sorted(set(kept)) or kept[0] < 0:
        raise ModelError(f"prune_channels: kept indices {kept[:8]}... do not fit a dimension of {n} channels "
                         f"(they must be increasing, from 0 to {n - 1}); the replay data is corrupted")
    return torch.tensor(kept, dtype=torch.long)


def _linear(m: nn.Linear, out: list[int] | None, inp: list[int] | None) -> None:
    o, i = _index(m.out_features, out), _index(m.in_features, inp)
    w = m.weight
    if o is not None:
        w = w[o]
        if m.bias is not None:
            m.bias = _param(m.bias, m.bias[o])
        m.out_features = len(o)
    if i is not None:
        w = w[:, i]
        m.in_features = len(i)
    m.weight = _param(m.weight, w)


def _per_group(kept: torch.Tensor, size: int, groups: int, what: str, name: str) -> list[torch.Tensor]:
    """The kept channels of each of `groups` equal slices of `size` channels, as local indices."""
    per = size // groups
    parts = [kept[(kept >= j * per) & (kept < (j + 1) * per)] - j * per for j in range(groups)]
    if len({len(p) for p in parts}) != 1:
        raise ModelError(f"prune_channels: {name} is a convolution with groups={groups}, and the kept {what} "
                         f"channels are not the same number in every group ({[len(p) for p in parts]}); "
                         f"protect it or use a ratio that leaves whole groups")
    return parts


def _conv(m: nn.Module, out: list[int] | None, inp: list[int] | None, name: str = "") -> None:
    if is_depthwise(m):
        kept = out if out is not None else inp
        if out is not None and inp is not None and out != inp:
            raise ModelError(f"prune_channels: depthwise convolution {name} must keep the same input and output channels")
        k = _index(m.out_channels, kept)
        if k is None:
            return
        m.weight = _param(m.weight, m.weight[k])
        if m.bias is not None:
            m.bias = _param(m.bias, m.bias[k])
        m.in_channels = m.out_channels = m.groups = len(k)
        return
    g, w = m.groups, m.weight
    o, i = _index(m.out_channels, out), _index(m.in_channels, inp)
    if o is None:
        o = torch.arange(m.out_channels)
    if i is None:
        i = torch.arange(m.in_channels)
    out_parts = _per_group(o, m.out_channels, g, "output", name)
    in_parts = _per_group(i, m.in_channels, g, "input", name)
    per_out = m.out_channels // g
    blocks = [w[j * per_out + out_parts[j]][:, in_parts[j]] for j in range(g)]
    m.weight = _param(m.weight, torch.cat(blocks))
    if m.bias is not None:
        m.bias = _param(m.bias, m.bias[o])
    m.out_channels, m.in_channels = len(o), len(i)


def _norm(m: nn.Module, out: list[int] | None, inp: list[int] | None, name: str = "") -> None:
    n = m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.normalized_shape[0]
    if out is not None and inp is not None and out != inp:
        raise ModelError(f"prune_channels: {name} ({type(m).__name__}) must keep the same channels on both sides")
    k = _index(n, out if out is not None else inp)
    if k is None:
        return
    for attr in ("weight", "bias"):
        p = getattr(m, attr, None)
        if isinstance(p, nn.Parameter):
            setattr(m, attr, _param(p, p[k]))
    for attr in ("running_mean", "running_var"):
        b = getattr(m, attr, None)
        if isinstance(b, torch.Tensor):
            setattr(m, attr, b[k].clone())
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (len(k),)
    else:
        m.num_features = len(k)


def _embedding(m: nn.Embedding, out: list[int] | None, inp: list[int] | None, name: str = "") -> None:
    k = _index(m.embedding_dim, out if out is not None else inp)
    if k is not None:
        m.weight = _param(m.weight, m.weight[:, k])
        m.embedding_dim = len(k)


def _rewrite(module: nn.Module) -> Callable[..., None]:
    if isinstance(module, nn.Linear):
        return lambda m, o, i, name: _linear(m, o, i)
    if isinstance(module, _CONVS):
        return _conv
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
        return _norm
    if isinstance(module, nn.Embedding):
        return _embedding
    raise ModelError(f"prune_channels: {type(module).__name__} is not a layer kind the surgery knows "
                     f"({', '.join(KINDS)}); the replay data names a layer it cannot rebuild")


def apply(model: nn.Module, layers: dict[str, dict[str, Any]], attrs: dict[str, dict[str, Any]] | None = None) -> nn.Module:
    """Rewrite the layers of `model` IN PLACE to the kept channels: `layers[name] = {"out": [...] | None,
    "in": [...] | None}` (None: that side unchanged); `attrs[name]` are attributes to set (attention head
    counts). A module registered under several names is rewritten once."""
    done: set[int] = set()
    for name, kept in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"prune_channels: the model has no layer {name!r}; the replay data does not "
                             f"belong to this architecture") from None
        if id(module) in done:
            continue
        done.add(id(module))
        _rewrite(module)(module, kept.get("out"), kept.get("in"), name)
    for name, values in (attrs or {}).items():
        module = model.get_submodule(name)
        for key, value in values.items():
            if not hasattr(module, key):
                raise ModelError(f"prune_channels: {name} has no attribute {key!r} to set; the replay data does "
                                 f"not belong to this architecture")
            setattr(module, key, value)
    return model

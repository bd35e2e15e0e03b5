"""What: the importance of each channel of a group, `score(group) -> (size,)` tensor, higher = keep.

A channel's score sums over every layer of its group, because removing the channel removes all of
those weights at once (the group-level criterion of DepGraph, Fang et al. 2023):

- l1 / l2: sum of |w| / w^2 of all the weights tied to the channel (Li et al. 2017, "Pruning Filters
  for Efficient ConvNets", extended to the whole group);
- bn_scale: |gamma| of the group's BatchNorms (Liu et al. 2017, "Learning Efficient Convolutional
  Networks through Network Slimming"); groups without BatchNorm fall back to l1, with a warning;
- taylor: |sum of w * dL/dw| over the channel's weights, gradients summed over labelled batches
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", first order);
- activation: E[x_c^2] * ||W[:, c]||^2 over the layers that read channel c, i.e. the energy channel c adds
  to their outputs on real inputs, cross terms left out (the per-weight |w| * ||x|| of Wanda, Sun et al.
  2023, "A Simple and Effective Pruning Approach for Large Language Models", taken per input channel).
  Weight norms alone treat a neuron that never fires like one that always does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import data as D
from ..core.capture import capture_inputs
from ..core.progress import track
from ..errors import DataError
from .config import Importance
from .graph import Group
from .surgery import along, is_depthwise
from ..core.layers import visible_modules

__all__ = ["group_scores", "accumulate_gradients", "input_energies"]

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def _member_scores(member, kind: Importance) -> torch.Tensor | None:
    rows = along(member.module, member.dim)
    if rows is None:
        return None
    rows = rows[member.idxs].double()  # (len(idxs), K)
    if kind == Importance.TAYLOR:
        grads = along(member.module, member.dim, grad=True)
        if grads is None:
            return None
        return (rows * grads[member.idxs].double()).sum(dim=1).abs()
    if kind == Importance.L2:
        return rows.pow(2).sum(dim=1)
    return rows.abs().sum(dim=1)


def _activation_scores(group: Group, energies: dict[str, torch.Tensor], scores: torch.Tensor) -> bool:
    """Add E[x_c^2] * ||W[:, c]||^2 of every reading member; False when no member was measured."""
    found = False
    for member in group.members:
        energy = energies.get(member.name)
        if member.dim != "in" or energy is None or is_depthwise(member.module):
            continue
        rows = along(member.module, "in")
        if rows is None or rows.shape[0] != energy.shape[0]:
            continue
        idx = torch.tensor(member.idxs, dtype=torch.long)
        s = rows[idx].double().pow(2).sum(dim=1) * energy[idx]
        scores.index_add_(0, torch.tensor(member.root_idxs, dtype=torch.long), s)
        found = True
    return found


def group_scores(group: Group, kind: Importance, warn: Callable[[str], None],
                 energies: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per root channel of `group` (float64). `energies`: activation only, from `input_energies`."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    if kind == Importance.ACTIVATION:
        if _activation_scores(group, energies or {}, scores):
            return scores
        warn(f"prune_channels: no layer reading the channels of {group.root} ran on the data (or reads them "
             f"depthwise), so activation cannot rank them; ranked by l2 instead")
        kind = Importance.L2
    members = group.members
    if kind == Importance.BN_SCALE:
        norms = [m for m in members if isinstance(m.module, _NORMS)]
        if not norms:
            warn(f"prune_channels: group {group.root} has no BatchNorm, so bn_scale cannot rank its channels; "
                 f"ranked by l1 instead")
            kind = Importance.L1
        else:
            members = norms
    for member in members:
        if kind == Importance.BN_SCALE:
            s = member.module.weight.detach()[member.idxs].double().abs()
        else:
            s = _member_scores(member, kind)
        if s is None:
            continue
        # A flatten ties several inputs of the next Linear to one channel: index_add sums them.
        scores.index_add_(0, torch.tensor(member.root_idxs, dtype=torch.long), s)
    return scores


def input_energies(model: nn.Module, data: Any, batches: int, progress: bool) -> dict[str, torch.Tensor]:
    """E[x_c^2] of every input channel of every Linear and (ungrouped or grouped) convolution of `model`, by
    name, over `batches` batches: a Linear's rows are every position of its last dimension, minus padding
    tokens when a dict batch has an `attention_mask` (B, T) matching the input; a conv's over batch and space."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def reduce(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = x.double()
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = x.movedim(-module.weight.dim() + 1, -1).reshape(-1, x.shape[-module.weight.dim() + 1])
        sums[name] = sums.get(name, 0) + rows.pow(2).sum(0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    layers = {name: m for name, m in visible_modules(model) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    seen = capture_inputs(model, layers, D.take(data, batches), reduce, label="activation importance", progress=progress)
    if not seen:
        raise DataError("prune_channels: importance 'activation' got no batch; pass data= (a few batches of real "
                        "inputs, no labels needed)")
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def accumulate_gradients(model: nn.Module, data: Any, batches: int, progress: bool) -> None:
    """Sum dL/dw over `batches` labelled batches into the weights' .grad (cross-entropy)."""
    model.zero_grad(set_to_none=True)
    seen = 0
    with torch.enable_grad():
        for batch in track(list(D.take(data, batches)), "taylor importance", enabled=progress):
            inputs, target = D.split(batch)
            if target is None:
                raise DataError("prune_channels: importance 'taylor' needs labelled batches ((inputs, target) "
                                "tuples or dicts with 'labels') to compute the loss's gradients; pass labelled "
                                "data, or use importance l1, l2 or bn_scale, which need none")
            out = D.first_tensor(D.forward(model, inputs))
            F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1)).backward()
            seen += 1
    if not seen:
        raise DataError("prune_channels: importance 'taylor' got no batch; pass data")

"""What: the importance of each channel of a group, `score(group) -> (size,)` tensor, higher = keep.

A channel's score sums over every layer of its group, because removing the channel removes all of
those weights at once (the group-level criterion of DepGraph, Fang et al. 2023):

- l1 / l2: sum of |w| / w^2 of all the weights tied to the channel (Li et al. 2017, "Pruning Filters
  for Efficient ConvNets", extended to the whole group);
- bn_scale: |gamma| of the group's BatchNorms (Liu et al. 2017, "Learning Efficient Convolutional
  Networks through Network Slimming"); groups without BatchNorm fall back to l1, with a warning;
- taylor: |sum of w * dL/dw| over the channel's weights, gradients summed over labelled batches
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", first order).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import data as D
from ..core.progress import track
from ..errors import DataError
from .config import Importance
from .graph import Group
from .surgery import along

__all__ = ["group_scores", "accumulate_gradients"]

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


def group_scores(group: Group, kind: Importance, warn: Callable[[str], None]) -> torch.Tensor:
    """One score per root channel of `group` (float64)."""
    scores = torch.zeros(group.size, dtype=torch.float64)
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

"""Refit: after channels are removed, re-solve each Linear that read them so that it computes, from the
channels it kept, the best linear estimate of what it computed from all of them on real inputs.

A Linear y = W x + b loses input channels D and keeps K. On the calibration inputs, the least-squares affine
estimate of the dropped inputs from the kept ones is x_D ~ mu_D + A (x_K - mu_K) with A = C_DK C_KK^-1 (C the
covariance of x, mu its mean). Substituting it:

    y ~ (W_K + W_D A) x_K + b + W_D (mu_D - A mu_K)

so W_K and b are replaced by those: the layer's output error on the calibration inputs is the least any
weights on x_K can reach. This is the layer-wise reconstruction of structured pruning for transformers
(Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers", least-squares mask tuning;
FLAP, An et al. 2024, keeps the mean term only). Without a bias the mean cannot move into one, and the
uncentered second moment takes the covariance's place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..core.capture import capture_inputs

__all__ = ["input_moments", "refit_layers"]


def input_moments(model: nn.Module, names: list[str], data: Any, batches: int,
                  progress: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """(sum of x, sum of x x^T, rows) of the inputs of the named Linears, float64, padding tokens dropped
    when a dict batch has an `attention_mask` (B, T) matching a (B, T, D) input."""
    out: dict[str, list[Any]] = {}

    def reduce(name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = x.double().reshape(-1, x.shape[-1])
        acc = out.setdefault(name, [0, 0, 0])
        acc[0] = acc[0] + rows.sum(0)
        acc[1] = acc[1] + rows.T @ rows
        acc[2] += rows.shape[0]

    layers = {name: model.get_submodule(name) for name in names}
    capture_inputs(model, layers, D.take(data, batches), reduce, label="refit: measuring inputs", progress=progress)
    return {k: (v[0], v[1], v[2]) for k, v in out.items() if v[2] > 0}


def _solve(w: torch.Tensor, keep: list[int], moments, has_bias: bool, damping: float):
    """(new weight on the kept inputs, bias change) of a Linear of weight w (out, in), in float64."""
    s, g, n = moments
    in_features = w.shape[1]
    k = torch.tensor(keep, dtype=torch.long)
    d = torch.tensor([i for i in range(in_features) if i not in set(keep)], dtype=torch.long)
    mu = s / n
    c = g / n - (torch.outer(mu, mu) if has_bias else 0)  # covariance, or the uncentered second moment
    ckk = c[k][:, k]
    ridge = damping * float(ckk.diagonal().mean().clamp_min(1e-12))
    ckk = ckk + ridge * torch.eye(len(keep), dtype=torch.float64)
    # (D, K): C_DK C_KK^-1; least squares (gelsd) copes with collinear kept channels when damping is 0
    a = torch.linalg.lstsq(ckk, c[k][:, d], driver="gelsd").solution.T
    w = w.double()
    new_w = w[:, k] + w[:, d] @ a
    shift = w[:, d] @ (mu[d] - a @ mu[k]) if has_bias else None
    return new_w, shift


def refit_layers(pruned: nn.Module, original: nn.Module, layers: dict[str, dict[str, Any]],
                 moments: dict[str, tuple[torch.Tensor, torch.Tensor, int]], damping: float) -> list[str]:
    """Refit every pruned Linear that lost inputs and has moments; the names refitted."""
    done = []
    for name, entry in layers.items():
        keep = entry.get("in")
        if keep is None or name not in moments:
            continue
        new, old = pruned.get_submodule(name), original.get_submodule(name)
        if not (isinstance(new, nn.Linear) and isinstance(old, nn.Linear)):
            continue
        w = old.weight.detach()
        rows = entry.get("out")
        if rows is not None:
            w = w[torch.tensor(rows, dtype=torch.long)]
        with torch.no_grad():
            prev = torch.get_num_threads()
            torch.set_num_threads(1)  # small solves: see decompose.factorize.one_thread
            try:
                weight, shift = _solve(w, list(keep), moments[name], new.bias is not None, damping)
            finally:
                torch.set_num_threads(prev)
            new.weight.copy_(weight.to(new.weight.dtype))
            if shift is not None:
                new.bias.add_(shift.to(new.bias.dtype))
        done.append(name)
    return done

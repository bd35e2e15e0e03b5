"""One pass of calibration data that hands each watched layer's real input to a reducer.

Pruning's activation importance, its least-squares refit and decomposition's whitening all need
statistics of what a layer reads on real inputs; they differ only in what they sum. Padding tokens are
not real inputs: no output is ever read at those positions, so for a Linear whose input is shaped
(B, T, ...) like the batch's `attention_mask` (B, T), only the rows of real tokens are passed on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import data as D
from .progress import track

__all__ = ["capture_inputs", "batch_mask"]

Reducer = Callable[[str, nn.Module, torch.Tensor], None]


def batch_mask(inputs: Any) -> torch.Tensor | None:
    """The (B, T) `attention_mask` of a dict batch's inputs, or None."""
    kwargs = inputs[1] if isinstance(inputs, tuple) and len(inputs) == 2 else None
    m = kwargs.get("attention_mask") if isinstance(kwargs, dict) else None
    return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def capture_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Any], reduce: Reducer, *,
                   label: str = "measuring layer inputs", progress: bool = False) -> int:
    """Run `batches` through `model` without gradients; each time a module of `modules` (name -> module)
    runs, call `reduce(name, module, x)` with its first positional input, detached, as (N, ...) rows of
    real tokens for a Linear reading a (B, T, ...) input that the batch's attention mask matches, as is
    otherwise. Returns the number of batches run."""
    mask: list[torch.Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        m = mask[0]
        if m is not None and isinstance(module, nn.Linear) and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            x = x[m.bool()]
        reduce(name, module, x)

    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
             for name, module in modules.items()]
    seen = 0
    try:
        with torch.no_grad():
            for batch in track(list(batches), label, enabled=progress):
                inputs, _ = D.split(batch)
                mask[0] = batch_mask(inputs)
                D.forward(model, inputs)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    return seen

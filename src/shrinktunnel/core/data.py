"""Data adapters: every method and measurement sees batches through these few functions.

A batch is one of
- a tensor: the model's only input, no target;
- a tuple or list `(inputs, target)`: `inputs` a tensor or a tuple of tensors;
- a dict of tensors (as a Hugging Face tokenizer gives): keyword inputs; a `labels` key is the target.
`data` is an iterable of batches; a lone tensor, tuple or dict counts as one batch.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import DataError

__all__ = ["Inputs", "batches", "reiterable", "split", "forward", "first_tensor", "check_model_runs", "take"]

Inputs = tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


def batches(data: Any) -> Iterator[Any]:
    """Iterate batches of `data`; raise DataError if it is not iterable or yields nothing."""
    if data is None:
        raise DataError("no data given: pass an iterable of batches (tensors, (x, y) tuples or dicts)")
    if isinstance(data, (torch.Tensor, dict)) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    ):
        data = [data]
    try:
        it = iter(data)
    except TypeError:
        raise DataError(
            f"data of type {type(data).__name__} is not iterable: pass a list or DataLoader of batches"
        ) from None
    try:
        first = next(it)
    except StopIteration:
        raise DataError("data is empty: it yielded no batch; pass at least one batch") from None
    return itertools.chain([first], it)


def reiterable(data: Any) -> Any:
    """`data` itself when it can be iterated more than once (a list, a DataLoader), else its batches
    gathered into a list once: a generator would otherwise be used up by the first pass (the check
    run), leaving nothing for calibration and measurement."""
    if data is None:
        return None
    try:
        one_shot = iter(data) is data
    except TypeError:
        return data  # batches() raises the readable error
    return list(batches(data)) if one_shot else data


def take(data: Any, n: int | None) -> Iterator[Any]:
    """At most `n` batches of `data` (all of them when n is None)."""
    it = batches(data)
    return it if n is None else itertools.islice(it, n)


def split(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """((args, kwargs), target) of one batch."""
    if isinstance(batch, torch.Tensor):
        return ((batch,), {}), None
    if isinstance(batch, dict):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return ((), kwargs), batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        return (args, {}), y
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return ((batch[0],), {}), None
    raise DataError(
        f"cannot read a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        + ": a batch must be a tensor, an (inputs, target) pair or a dict of tensors"
    )


def forward(model: nn.Module, inputs: Inputs) -> Any:
    args, kwargs = inputs
    return model(*args, **kwargs)


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: itself, the first of a tuple, or a HF field."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise DataError(f"the model returned {type(output).__name__}, which holds no tensor to measure")


def batch_size(inputs: Inputs) -> int:
    """Size of dimension 0 of the first tensor input (1 when there is none)."""
    args, kwargs = inputs
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return 1


def describe(inputs: Inputs) -> str:
    args, kwargs = inputs
    shown = [f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args if isinstance(a, torch.Tensor)]
    shown += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return ", ".join(shown) or "no tensors"


def check_model_runs(model: nn.Module, data: Any) -> Inputs:
    """Run the model on the first batch; turn a failure into a DataError naming shapes and fix."""
    batch = next(batches(data))
    inputs, _ = split(batch)
    try:
        with torch.no_grad():
            forward(model, inputs)
    except Exception as exc:  # any failure here means model and data disagree
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"the model's forward failed on the first batch of data (inputs: {describe(inputs)}): "
            f"{type(exc).__name__}: {first}; check that the data has the shape and dtype the model expects"
        ) from exc
    return inputs

"""Quality: accuracy on labelled batches, and fidelity to a reference model without labels.

`model` may be any callable taking the batch inputs, e.g. an nn.Module or an ONNX Runtime adapter
(export/runtime.py), so the same code scores PyTorch and the runtime.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..core import data as D
from ..core.progress import track
from ..errors import DataError

__all__ = ["accuracy", "fidelity"]


@torch.no_grad()
def accuracy(model: Callable, data: Any, *, progress: bool = False, description: str = "evaluating") -> float:
    """Top-1 accuracy in [0, 1] over every (inputs, target) batch of `data`."""
    correct = total = 0
    n_batches = len(data) if hasattr(data, "__len__") and not isinstance(data, (tuple, dict)) else None
    for batch in track(D.batches(data), description, total=n_batches, enabled=progress):
        inputs, target = D.split(batch)
        if target is None:
            raise DataError("accuracy needs labelled batches (inputs, target); use fidelity() for unlabelled data")
        logits = D.first_tensor(D.forward(model, inputs))
        correct += int((logits.argmax(dim=-1) == target.to(logits.device)).sum())
        total += int(target.numel())
    return correct / max(total, 1)


@torch.no_grad()
def fidelity(model: Callable, reference: Callable, data: Any) -> dict[str, float]:
    """How closely `model` follows `reference`: mean per-sample cosine of the outputs, and top-1
    agreement (share of samples whose argmax is the same; meaningful for classifiers)."""
    cos_sum = agree = n = 0.0
    for batch in D.batches(data):
        inputs, _ = D.split(batch)
        a = D.first_tensor(D.forward(model, inputs)).float()
        b = D.first_tensor(D.forward(reference, inputs)).float()
        if a.shape != b.shape:
            raise DataError(f"outputs differ in shape: {tuple(a.shape)} vs reference {tuple(b.shape)}")
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        cos_sum += float(F.cosine_similarity(a2, b2, dim=1, eps=1e-12).sum())
        agree += float((a.argmax(dim=-1) == b.argmax(dim=-1)).float().reshape(a.shape[0], -1).mean(dim=1).sum())
        n += a.shape[0]
    return {"cosine": cos_sum / max(n, 1), "top1_agreement": agree / max(n, 1)}

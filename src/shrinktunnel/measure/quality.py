"""Quality: accuracy on labelled batches, and fidelity to a reference model without labels.

`model` may be any callable taking the batch inputs, e.g. an nn.Module or an ONNX Runtime adapter
(export/runtime.py), so the same code scores PyTorch and the runtime.
"""

from __future__ import annotations

import math
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
    """How closely `model` follows `reference`, without labels:
    - cosine: mean over samples of the cosine between output vectors (for outputs of one value per
      sample, e.g. a probability, cosine says nothing; read sqnr_db and max_abs_error instead);
    - top1_agreement: share of samples whose argmax agrees (classifiers);
    - sqnr_db: 10 log10(signal power / error power) over every output value;
    - max_abs_error: the largest absolute difference of any output value."""
    cos_sum = agree = n = 0.0
    signal = noise = max_err = 0.0
    for batch in D.batches(data):
        inputs, _ = D.split(batch)
        a = D.first_tensor(D.forward(model, inputs)).float()
        b = D.first_tensor(D.forward(reference, inputs)).float()
        if a.shape != b.shape:
            raise DataError(f"outputs differ in shape: {tuple(a.shape)} vs reference {tuple(b.shape)}")
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        cos_sum += float(F.cosine_similarity(a2, b2, dim=1, eps=1e-12).sum())
        agree += float((a2.argmax(dim=1) == b2.argmax(dim=1)).float().sum())
        signal += float((b2 * b2).sum())
        noise += float(((a2 - b2) ** 2).sum())
        max_err = max(max_err, float((a2 - b2).abs().max()))
        n += a.shape[0]
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return {"cosine": cos_sum / max(n, 1), "top1_agreement": agree / max(n, 1), "sqnr_db": sqnr, "max_abs_error": max_err}

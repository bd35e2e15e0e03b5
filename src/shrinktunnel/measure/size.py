"""Sizes: bytes on disk and weight counts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

__all__ = ["artifact_bytes", "count_weights", "float_safetensors_bytes", "bits_per_weight"]


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an artifact: its manifest plus its tensors file (reports or ONNX files kept
    beside them are not part of it). For any other directory, every file; for a file, its size."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    manifest = p / "manifest.json"
    if manifest.is_file():
        tensors = p / "model.safetensors"
        return manifest.stat().st_size + (tensors.stat().st_size if tensors.is_file() else 0)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def count_weights(model: nn.Module) -> int:
    """Learned values: parameters, and the integer weights of compressed layers (not their scales)."""
    total = 0
    seen: set[int] = set()  # a parameter tied between modules (shared embeddings) counts once
    for module in model.modules():  # modules() itself yields a module used twice only once
        own = getattr(module, "num_weights", None)
        if callable(own):
            total += own()
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def float_safetensors_bytes(model: nn.Module) -> int:
    """Size of the model's float state dict written as one safetensors file: the size baseline."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file(tensors, str(path))
        return path.stat().st_size


def bits_per_weight(nbytes: int, weights: int) -> float:
    return 8.0 * nbytes / max(weights, 1)

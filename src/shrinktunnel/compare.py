"""Side-by-side figures of an original model and its compressed form, in PyTorch and ONNX Runtime.

Used by `shrink demo` and `shrink eval`. Latencies of all variants are measured in one run,
alternated, so that the machine's slow spells hit every contender alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import data as D
from .export import OrtModel, export_onnx
from .measure import accuracy, count_macs, count_weights, onnx_latency, torch_latency
from .measure.latency import interleaved
from .measure.quality import fidelity
from .report import Table, fmt_bytes, fmt_ms, fmt_pct

__all__ = ["Variant", "compare_variants", "variants_table"]


@dataclass
class Variant:
    name: str
    model: nn.Module
    size_bytes: int  # bytes on disk of its artifact (or float safetensors for the original)
    onnx_path: Path | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def _latency_batch(data: Any, batch: int) -> D.Inputs:
    (args, kwargs), _ = D.split(next(D.batches(data)))
    cut = lambda t: t[:batch] if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def compare_variants(
    variants: list[Variant],
    test_data: Any,
    workdir: Path,
    *,
    threads: int = 2,
    latency_batch: int = 64,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> list[Variant]:
    """Fill each variant's figures: weights, MACs, size, accuracy (or fidelity to `reference` when the
    data has no labels) in PyTorch and ONNX Runtime, and latency in both."""
    inputs = _latency_batch(test_data, latency_batch)
    example = next(D.batches(test_data))
    labelled = D.split(example)[1] is not None
    torch.set_num_threads(threads)
    for v in variants:
        if v.onnx_path is None:
            v.onnx_path = export_onnx(v.model, workdir / f"{v.name}.onnx", example)
        v.figures.update(weights=count_weights(v.model), macs=count_macs(v.model, inputs), bytes=v.size_bytes,
                         onnx_bytes=v.onnx_path.stat().st_size)
        runtime = OrtModel(v.onnx_path, threads=threads)
        if labelled:
            v.figures["accuracy_torch"] = accuracy(v.model, test_data, progress=progress, description=f"{v.name}: PyTorch")
            v.figures["accuracy_onnx"] = accuracy(runtime, test_data, progress=progress, description=f"{v.name}: ONNX Runtime")
        elif reference is not None:
            v.figures["fidelity_torch"] = fidelity(v.model, reference, test_data)
            v.figures["fidelity_onnx"] = fidelity(runtime, reference, test_data)
        v.figures["_runtime"] = runtime
    contenders = {}
    for v in variants:
        runtime = v.figures["_runtime"]
        contenders[f"{v.name}/torch"] = lambda v=v: torch_latency(v.model, inputs, threads=threads)
        contenders[f"{v.name}/onnx"] = lambda r=runtime: onnx_latency(r.session, r.feed(*inputs[0], **inputs[1]))
    stats = interleaved(contenders, rounds=3)
    for v in variants:
        v.figures.pop("_runtime")
        v.figures["latency_torch"] = stats[f"{v.name}/torch"].to_dict()
        v.figures["latency_onnx"] = stats[f"{v.name}/onnx"].to_dict()
    return variants


def variants_table(variants: list[Variant], title: str, threads: int) -> Table:
    """One row per figure, one column per variant (narrow enough for a terminal)."""
    base = variants[0].figures
    batch = base["latency_onnx"]["batch"]
    table = Table(
        title,
        ["", *(v.name for v in variants)] + (["change"] if len(variants) == 2 else []),
        note=f"Latency: batch {batch}, {threads} threads, median of 30 runs after 5 warm-up runs, "
        f"best of 3 alternated rounds.",
    )
    last = variants[-1].figures

    def row(label: str, get, fmt, change=None) -> None:
        cells = [fmt(get(v.figures)) for v in variants]
        if len(variants) == 2:
            cells.append(change(get(base), get(last)) if change else "")
        table.add(label, *cells)

    ratio = lambda a, b: f"{b / a:.3f}x"  # noqa: E731
    speed = lambda a, b: f"{a / b:.2f}x faster" if b < a else f"{b / a:.2f}x slower"  # noqa: E731
    points = lambda a, b: f"{100 * (b - a):+.2f} pt"  # noqa: E731
    if "accuracy_torch" in base:
        row("accuracy, PyTorch", lambda f: f["accuracy_torch"], fmt_pct, points)
        row("accuracy, ONNX Runtime", lambda f: f["accuracy_onnx"], fmt_pct, points)
    elif "fidelity_torch" in base:
        row("cosine to reference, PyTorch", lambda f: f["fidelity_torch"]["cosine"], lambda x: f"{x:.4f}")
        row("cosine to reference, ONNX Runtime", lambda f: f["fidelity_onnx"]["cosine"], lambda x: f"{x:.4f}")
    row("size on disk", lambda f: f["bytes"], fmt_bytes, ratio)
    row("ONNX file", lambda f: f["onnx_bytes"], fmt_bytes, ratio)
    row("weights", lambda f: f["weights"], lambda x: f"{x:,}")
    row("MACs per sample", lambda f: f["macs"], lambda x: f"{x:,}")
    row("latency, PyTorch", lambda f: f["latency_torch"]["median_ms"], fmt_ms, speed)
    row("latency, ONNX Runtime", lambda f: f["latency_onnx"]["median_ms"], fmt_ms, speed)
    return table

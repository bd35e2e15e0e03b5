"""Exporting a module read by load_onnx as the original graph looked from outside: the same input and
output names, the same dynamic dimensions (one torch.export Dim per ONNX dim name), the same order.

export/onnx.export_onnx calls `OnnxModule.export_onnx_as_original`, which comes here; the capture, the
operator translations (QDQ, integer matmuls), the clean-up and the ONNX Runtime check are export's own.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..errors import ExportError, one_line

__all__ = ["export_like_original", "example_inputs", "restore_io"]


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    names = module.onnx_original.input_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise ExportError(f"example_inputs lack the ONNX inputs {missing}; give one batch with all of {names}")
    return tuple(bound[n] for n in names)


def _dim_names(module: nn.Module, args: tuple) -> dict[str, list[tuple[int, int]]]:
    """{dim name: [(input index, dim)]}: the original's dynamic dims (unnamed ones named after their input)."""
    names: dict[str, list[tuple[int, int]]] = {}
    for k, ((name, shape, _), a) in enumerate(zip(module.onnx_original.inputs, args)):
        if not isinstance(a, torch.Tensor):
            continue
        for d, label in enumerate(shape[: a.dim()]):
            if isinstance(label, int):
                continue
            key = re.sub(r"\W", "_", label if label != "?" else f"{name}_{d}").strip("_") or f"d{d}"
            names.setdefault("d_" + key if key[0].isdigit() else key, []).append((k, d))
    return names


def _grown(args: tuple, where: list[tuple[int, int]]) -> tuple:
    out = list(args)
    for k, d in where:
        out[k] = torch.cat([out[k], out[k]], dim=d)
    return tuple(out)


def _runs_at_other_sizes(module: nn.Module, args: tuple, names: dict) -> dict:
    """The dims the module accepts at twice the example's size (an eager probe: a dim the graph's
    code fixes, such as a text recognizer's height that must pool to 1, fails here)."""
    keep = {}
    for key, where in names.items():
        try:
            with torch.no_grad():
                module(*_grown(args, where))
            keep[key] = where
        except Exception:  # noqa: BLE001 - the dim stays fixed, and the export says so
            pass
    return keep


def _shapes(args: tuple, names: dict) -> tuple[tuple, dict | None]:
    """The example grown where a dynamic dim has size 1 (torch.export would specialise it), and the
    dynamic shapes {"inputs": (spec per input)}: one torch.export.Dim per original dim name."""
    specs: list[dict] = [{} for _ in args]
    grow = []
    for key, where in names.items():
        dim = torch.export.Dim(key, min=1)
        for k, d in where:
            specs[k][d] = dim
            if args[k].shape[d] == 1:
                grow.append((k, d))
    return _grown(args, grow), ({"inputs": tuple(s or None for s in specs)} if names else None)


def example_inputs(module: nn.Module, *, batch: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    """One batch of zeros shaped as the original graph's inputs (dynamic dims: `batch` for the first,
    `size` for the rest), keyed by input name: enough to trace or export, not to calibrate."""
    from .ops_tensor import DTYPES

    out = {}
    for name, shape, elem in module.onnx_original.inputs:
        dims = [d if isinstance(d, int) else (batch if i == 0 else size) for i, d in enumerate(shape)]
        out[name] = torch.zeros(dims, dtype=DTYPES.get(elem, torch.float32))
    return out


def _restore_dim_names(values, original: list[tuple[str, list, int]]) -> None:
    """Dims dynamic in both the export and the original get the original's dim names."""
    for v, (_, shape, _) in zip(values, original):
        for dim, label in zip(v.type.tensor_type.shape.dim, shape):
            if dim.dim_param and isinstance(label, str) and label != "?":
                dim.dim_param = label


def restore_io(path: str | os.PathLike, io) -> None:
    """Rename the exported graph's inputs and outputs, by position, to the original's names and dim
    names (an internal value already named so is renamed out of the way first)."""
    import onnx

    input_names, output_names = io.input_names, io.output_names
    proto = onnx.load(str(path))
    g = proto.graph
    _restore_dim_names(g.input, io.inputs)
    _restore_dim_names(g.output, io.outputs)
    if len(g.input) != len(input_names) or len(g.output) != len(output_names):
        raise ExportError(f"the exported graph has {len(g.input)} inputs / {len(g.output)} outputs where the original had "
                          f"{len(input_names)} / {len(output_names)}")
    mapping = {v.name: new for v, new in zip(list(g.input) + list(g.output), input_names + output_names)}
    wanted = set(mapping.values())
    used = {o for n in g.node for o in n.output} | {i.name for i in g.initializer} | {v.name for v in g.input}
    for name in list(used):
        if name in wanted and name not in mapping:
            mapping[name] = f"{name}__st{uuid.uuid4().hex[:6]}"

    def rename(graph) -> None:
        for v in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
            v.name = mapping.get(v.name, v.name)
        for n in graph.node:
            n.input[:] = [mapping.get(i, i) for i in n.input]
            n.output[:] = [mapping.get(o, o) for o in n.output]
            for a in n.attribute:
                if a.HasField("g"):
                    rename(a.g)

    rename(g)
    onnx.save(proto, str(path))


def export_like_original(module: nn.Module, path: str | os.PathLike, example: Any, *, opset: int | None = None) -> Path:
    from ..export import onnx as E

    (args, kwargs), _ = D.split(example)
    args = _positional(module, tuple(args), dict(kwargs))
    module = module.eval()
    for note in E._export_notes(module):
        warnings.warn(note, UserWarning, stacklevel=3)
    opset = opset or E._needed_opset(module)
    io = module.onnx_original
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        wanted = _dim_names(module, args)
        names = _runs_at_other_sizes(module, args, wanted)
        for attempt in (names, {k: v for k, v in names.items() if all(d == 0 for _, d in v)}, {}):
            grown, shapes = _shapes(args, attempt)
            try:
                E._export(module, grown, {}, shapes, tmp, opset)
                break
            except Exception:  # noqa: BLE001 - fewer dynamic dims next; the last attempt (none) raises
                if not attempt:
                    raise
        fixed = sorted(set(wanted) - set(attempt))
        if fixed:
            warnings.warn(f"export_onnx: dims {', '.join(fixed)} of the original graph kept at the example's sizes "
                          "(the graph's code fixes them for PyTorch's exporter)", UserWarning, stacklevel=3)
        restore_io(tmp, io)
        E._postprocess(tmp)
        E._check_runs(tmp)
        os.replace(tmp, target)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of the imported graph failed: {one_line(exc)}; run with --debug for the full trace") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target

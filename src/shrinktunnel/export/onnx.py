"""QDQ ONNX export through torch's exporter (torch.export + onnxscript).

Quantized layers simulate with `quantized_decomposed` operators, which the exporter writes as
QuantizeLinear / DequantizeLinear with the layer's own scales and zero points, and integer weight
initializers: ONNX Runtime's QDQ transformers then fuse DQ -> Conv/MatMul -> Q into integer kernels.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..errors import ExportError, one_line

__all__ = ["export_onnx"]


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Path:
    """Write `model` (an nn.Module or a Result) as ONNX at `path`, atomically; return the path.

    `example_inputs` is one batch in the data convention (tensor, (inputs, target) or dict). The batch
    dimension (0) of every input is dynamic unless `dynamic_batch=False`.
    """
    module: nn.Module = getattr(model, "model", model)
    if not isinstance(module, nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module or a Result, got {type(model).__name__}")
    if example_inputs is None:
        raise ExportError("export_onnx needs example_inputs: one batch the model accepts, e.g. torch.randn(2, 1, 28, 28)")
    (args, kwargs), _ = D.split(example_inputs)
    args, kwargs = _batch_at_least_two(args, kwargs)
    module = module.eval()
    for note in _export_notes(module):
        warnings.warn(note, UserWarning, stacklevel=2)
    dynamic = _dynamic_shapes(module, args, kwargs) if dynamic_batch else None

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet():
            torch.onnx.export(
                module, args, str(tmp), kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic,
                opset_version=opset or _needed_opset(module), external_data=False, optimize=True, verbose=False,
                custom_translation_table=_translations(),
            )
        _postprocess(tmp)
        _check_runs(tmp)
        os.replace(tmp, target)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {one_line(exc)}; run with --debug for the full trace") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _export_notes(module: nn.Module, shown: int = 4) -> list[str]:
    """Layers that export differently from how they are stored (quantized layers with sub-8-bit or
    per-group weights) prepare themselves and say how (`prepare_export() -> note or None`); one
    warning per kind of note, naming the layers."""
    names_by_note: dict[str, list[str]] = {}
    for name, sub in module.named_modules():
        prepare = getattr(sub, "prepare_export", None)
        note = prepare() if callable(prepare) else None
        if note:
            names_by_note.setdefault(note, []).append(name or type(sub).__name__)
    notes = []
    for note, names in names_by_note.items():
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        notes.append(f"export_onnx: {listed}: {note}")
    return notes


def _translations() -> dict:
    # Our custom operators (the integer matmul of dynamic quantization, fused attention) and the ONNX they become.
    from ..fuse import attention
    from ..quant import dynamic, nbits

    return {**dynamic.onnx_translations(), **nbits.onnx_translations(), **attention.onnx_translations()}


_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def _needed_opset(module: nn.Module) -> int:
    """20, or 21 when a tensor is float8 (ONNX types float8 from opset 19 on, and its Cast to float8
    needs 21 here). 20 rather than 18: opset 20's Gelu is one ONNX Runtime kernel where 18 spells GELU
    in five elementwise ops (Div, Erf, Add, Mul, Mul); on all-MiniLM-L6-v2 int8 that is 12 % of the
    kernel time (32.3 -> 28.6 ms, docs/benchmarks.md)."""
    has_fp8 = any(t.dtype in _FP8 for t in module.state_dict().values())
    return 21 if has_fp8 else 20


def _batch_at_least_two(args, kwargs):
    # torch.export specialises a dimension of size 1, which would pin the batch size.
    def grow(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            return torch.cat([t, t])
        return t

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _dynamic_shapes(module: nn.Module, args, kwargs):
    """Dimension 0 of every tensor input is the dynamic batch; keyed by the forward's parameter
    names, which is what torch.export expects whether inputs come positionally or by keyword (a
    `*args` parameter takes a tuple of specs, a `**kwargs` one a dict)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(v):
        return {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs).arguments
    out = {}
    for name, v in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(a) for a in v)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(a) for k, a in v.items()}
        else:
            out[name] = spec(v)
    return out


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warns about optional torchvision ops; keep them out."""
    names = ("torch", "torch.onnx", "torch.export", "torch._export", "torch._subclasses.fake_tensor", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # a failure surfaces as our one-line ExportError instead
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _postprocess(path: Path) -> None:
    """Drop the exporter's per-node metadata (Python stack traces with this machine's absolute
    paths, FX node text): about 10 % of a small model's file, and nothing a runtime reads; then
    fold constant scales into earlier constant factors (graph_passes.fold_constant_scales)."""
    import onnx

    from .graph_passes import fold_constant_scales

    proto = onnx.load(str(path))
    fold_constant_scales(proto)
    graphs = [proto.graph] + [f for f in proto.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(proto, str(path))


def _check_runs(path: Path) -> None:
    from .runtime import ort_session

    try:
        ort_session(path, threads=1)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime rejects the exported model: {one_line(exc)}") from exc

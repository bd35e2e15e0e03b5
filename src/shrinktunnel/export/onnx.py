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
from typing import Any, Mapping, Sequence

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
    dynamic_dims: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    opset: int | None = None,
) -> Path:
    """Write `model` (an nn.Module or a Result) as ONNX at `path`, atomically; return the path.

    `example_inputs` is one batch in the data convention (tensor, (inputs, target) or dict). The batch
    dimension (0) of every input is dynamic unless `dynamic_batch=False`. Other dynamic dimensions:
    `dynamic_dims` {input name: {dim: name}} (or {input name: [dims]}); dims given the same name are one
    dimension (Hugging Face Optimum's `dynamic_axes`, e.g. `{"input_ids": {1: "sequence"},
    "attention_mask": {1: "sequence"}}`). Left as None, they are inferred: the dims beyond the batch of
    integer inputs of rank 2 (token ids, attention masks, token types, positions) are one dynamic
    `sequence` dimension, so a text model exported from a 64-token example runs on any length; a model
    that cannot export with them gets them fixed, with a warning. `{}`: only the batch is dynamic.
    """
    # A Result holds its model in `.model`; a module is exported as it is, even if it has a `.model` child.
    module: nn.Module = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    if not isinstance(module, nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module or a Result, got {type(model).__name__}")
    if example_inputs is None:
        raise ExportError("export_onnx needs example_inputs: one batch the model accepts, e.g. torch.randn(2, 1, 28, 28)")
    as_original = getattr(module, "export_onnx_as_original", None)  # a graph read by st.load_onnx (onnx_input)
    if callable(as_original) and dynamic_dims is None:  # exports with the original's I/O names and dynamic dims
        return as_original(path, example_inputs, opset=opset)
    (args, kwargs), _ = D.split(example_inputs)
    args, kwargs = _batch_at_least_two(args, kwargs)
    module = module.eval()
    for note in _export_notes(module):
        warnings.warn(note, UserWarning, stacklevel=2)
    inputs = _bound_inputs(module, args, kwargs)
    extra = _inferred_dims(inputs) if dynamic_dims is None else _given_dims(inputs, dynamic_dims)
    opset = opset or _needed_opset(module)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        why = "the model's code fixes them (torch.export specialised them to the example)"
        try:
            _export(module, args, kwargs, _dynamic_shapes(module, args, kwargs, dynamic_batch, extra), tmp, opset)
            fixed = _fixed_dims(tmp, extra)
        except Exception as exc:
            if not extra or dynamic_dims is not None:
                raise
            # Inferred dims the model's code cannot take dynamic: export again with them static.
            fixed, why = extra, one_line(exc)[:200]
            _export(module, args, kwargs, _dynamic_shapes(module, args, kwargs, dynamic_batch, {}), tmp, opset)
        if fixed:
            dims = ", ".join(f"{name}[{d}]" for name, ds in fixed.items() for d in ds)
            if dynamic_dims is not None:
                raise ExportError(f"dynamic_dims: {dims} cannot be dynamic: {why}; leave them out of dynamic_dims")
            warnings.warn(f"export_onnx: {dims} kept at the example's length: {why}; pass dynamic_dims to "
                          "choose the dynamic dimensions", UserWarning, stacklevel=2)
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


def _export(module: nn.Module, args, kwargs, dynamic, tmp: Path, opset: int) -> None:
    with _quiet():
        program = _capture(module, args, kwargs, dynamic)
        torch.onnx.export(
            program if program is not None else module, args, str(tmp), kwargs=kwargs or None, dynamo=True,
            dynamic_shapes=dynamic, opset_version=opset, external_data=False, optimize=True, verbose=False,
            custom_translation_table=_translations(),
        )


def _capture(module: nn.Module, args, kwargs, dynamic) -> torch.export.ExportedProgram | None:
    """torch.export as torch.onnx's first strategy runs it (non-strict, sizes 0/1 not specialised, a
    dimension refined from the exporter's suggested fixes), then every `aten.contiguous` made an
    explicit contiguous `clone`. Why: `contiguous()` is a no-op or a copy depending on the strides the
    fake tensors have when the graph is decomposed, and ONNX's decomposition and its type-promotion
    pass disagree about the strides of attention outputs (scaled_dot_product_attention's output
    strides); the no-op leaves a `view` of a transposed tensor, which fails ("Cannot view a tensor
    with shape [s, 12, 4, 8] and strides (384, 8, 96, 1)": T5 and Swin, fp32 and int8). A copy is
    always right, and ONNX has no strides: it costs nothing in the graph. None when capture fails here:
    torch.onnx.export then tries its own strategies on the module."""
    def export(shapes):
        return torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)

    try:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            try:
                program = export(dynamic)
            except torch._dynamo.exc.UserError as exc:
                refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(exc.msg, dynamic)
                program = export(refined)
    except Exception:  # noqa: BLE001 - the exporter's own strategies report the failure
        return None
    contiguous, clone = torch.ops.aten.contiguous.default, torch.ops.aten.clone.default
    changed = False
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target is contiguous:
            fmt = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else torch.contiguous_format)
            node.target, node.args, node.kwargs = clone, node.args[:1], {"memory_format": fmt}
            changed = True
    # Dead nodes (a pooler whose output the wrapper drops) would otherwise come out as extra graph outputs.
    changed |= program.graph_module.graph.eliminate_dead_code()
    if changed:
        program.graph_module.recompile()
    return program


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
    # The custom operators method packages declare (register_onnx_translations: the integer matmul of
    # dynamic quantization, MatMulNBits, fused attention...) and the ONNX they become.
    from ..core.registry import onnx_translations

    return onnx_translations()


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


def _fixed_dims(path: Path, wanted: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
    """The dims of `wanted` that the exported graph holds at a fixed size (torch.export refines a
    dynamic dim to the example's size when the model's code needs that size)."""
    import onnx

    if not wanted:
        return {}
    shapes = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(path), load_external_data=False).graph.input}
    fixed: dict[str, dict[int, str]] = {}
    for name, dims in wanted.items():
        shape = shapes.get(name)
        for d, n in dims.items():
            if shape is not None and d < len(shape) and not shape[d].dim_param:
                fixed.setdefault(name, {})[d] = n
    return fixed


def _bound_inputs(module: nn.Module, args, kwargs) -> dict[str, Any]:
    """{input name: value} for the tensors passed, named as the forward names them (a `*args`
    parameter's tensors as `args_0`, ...; a `**kwargs` parameter's by their keys)."""
    signature = inspect.signature(module.forward)
    out: dict[str, Any] = {}
    for name, v in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out.update({f"{name}_{i}": a for i, a in enumerate(v)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        else:
            out[name] = v
    return out


def _inferred_dims(inputs: dict[str, Any]) -> dict[str, dict[int, str]]:
    """Token inputs: integer or bool tensors of rank 2, (batch, tokens). Their token dims are one
    `sequence` dimension when they share a length (one per length otherwise); length 1 stays fixed
    (torch.export specialises it)."""
    lengths: dict[int, str] = {}
    out: dict[str, dict[int, str]] = {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.dtype.is_floating_point \
                and not v.dtype.is_complex and v.shape[1] > 1:
            n = int(v.shape[1])
            lengths.setdefault(n, "sequence" if not lengths else f"sequence_{len(lengths)}")
            out[name] = {1: lengths[n]}
    return out


def _given_dims(inputs: dict[str, Any], given: Mapping) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for name, dims in given.items():
        value = inputs.get(name)
        if not isinstance(value, torch.Tensor):
            tensors = sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
            raise ExportError(f"dynamic_dims names {name!r}, which is not a tensor input of this batch; "
                              f"the inputs are {tensors}")
        named = dict(dims) if isinstance(dims, Mapping) else {int(d): f"{name}_{int(d)}" for d in dims}
        for d in named:
            if not isinstance(d, int) or not 0 < d < value.dim():
                raise ExportError(f"dynamic_dims[{name!r}]: dim {d!r} is not a dimension beyond the batch of "
                                  f"its shape {tuple(value.shape)}; use 1..{value.dim() - 1}")
        out[name] = {int(d): str(n) for d, n in named.items()}
    return out


def _dynamic_shapes(module: nn.Module, args, kwargs, batch_dynamic: bool = True,
                    extra: dict[str, dict[int, str]] | None = None):
    """torch.export's dynamic shapes, keyed by the forward's parameter names (what torch.export
    expects whether inputs come positionally or by keyword; a `*args` parameter takes a tuple of specs,
    a `**kwargs` one a dict): dimension 0 of every tensor input is the batch when `batch_dynamic`,
    and `extra` {input: {dim: name}} adds more, one torch Dim per name. None when nothing is dynamic."""
    extra = extra or {}
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str, size: int):
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1, max=1 << 16) if name == "batch" else torch.export.Dim(name, min=1)
        return dims[name]

    def spec(key: str, v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        out = {0: dim("batch", v.shape[0])} if batch_dynamic else {}
        out.update({d: dim(n, v.shape[d]) for d, n in extra.get(key, {}).items()})
        return out or None

    signature = inspect.signature(module.forward)
    result = {}
    for name, v in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            result[name] = tuple(spec(f"{name}_{i}", a) for i, a in enumerate(v))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            result[name] = {k: spec(k, a) for k, a in v.items()}
        else:
            result[name] = spec(name, v)
    if not dims:
        return None
    return result


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warns about optional torchvision ops; keep them out."""
    # onnxscript: its constant folding logs "Evaluation failed" for shapes it cannot fold (dynamic dims), harmlessly
    names = ("torch", "torch.onnx", "torch.export", "torch._export", "torch._subclasses.fake_tensor", "torch.fx",
             "onnxscript")
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
    fold constant scales into earlier constant factors (graph_passes.fold_constant_scales), and
    write what makes the file fast in a default ONNX Runtime session (default_session)."""
    import onnx

    from .default_session import for_default_session
    from .graph_passes import fold_constant_scales

    proto = onnx.load(str(path))
    fold_constant_scales(proto)
    for_default_session(proto)
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

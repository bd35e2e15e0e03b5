"""ExecuTorch export: a `.pte` program lowered to the XNNPACK delegate, and its Python runtime.

Static int8 layers (W8A8) lower as they are, with the project's own scales: their forward is
`quantized_decomposed` quantize / dequantize around conv / linear, the pattern XNNPACK's partitioner
takes into its integer kernels. XNNPACK's int8 activations are signed, ours unsigned (0..255 with a
zero point); the two are the same quantizer shifted by 128 (q - 128 with zero point - 128 dequantizes to
the same values), so the graph's uint8 quantize / dequantize nodes are rewritten to int8 before lowering
(exact; without it XNNPACK refuses the tensors: "Failed to define tensor 0 with code:
xnn_status_invalid_parameter").

Dynamic int8 layers compute with the project's integer-matmul operator, which ExecuTorch has no kernel
for: each is written in the operators XNNPACK's partitioner lowers to its dynamic int8 GEMM (what
ExecuTorch's own XNNPACKQuantizer emits for dynamic quantization): the input quantized to int8 with a scale
chosen at run time, the project's int8 weight dequantized per channel (SmoothQuant's input factor kept).
XNNPACK quantizes such inputs per row, so the numerics are those of `per_token: true` (a tiny BERT's
per-token int8 model ran in ExecuTorch within 6e-7 of PyTorch).

The program keeps the example's shapes (XNNPACK programs here are static); the input names go into the
program as a constant method, so the session can be called with keywords.
"""

from __future__ import annotations

import copy
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import data as D
from ..errors import ExportError, one_line
from .packages import require

__all__ = ["export_executorch", "load_program", "signed_activations"]

_NAMES = "input_names"  # constant method: the forward's input names, as UTF-8 code points


def export_executorch(model: Any, path: str | os.PathLike, example_inputs: Any) -> Path:
    """Write `model` as an ExecuTorch program lowered to XNNPACK at `path` (.pte), atomically."""
    require("executorch")
    import executorch.kernels.quantized  # noqa: F401 - registers the out-variants of quantize / dequantize
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    target = Path(path)
    if target.suffix != ".pte":
        raise ExportError(f"--executorch {str(target)!r}: an ExecuTorch program is a .pte file; give a path ending in .pte")
    module = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    if not isinstance(module, nn.Module):
        raise ExportError(f"export_executorch needs an nn.Module or a Result, got {type(model).__name__}")
    if example_inputs is None:
        raise ExportError("export_executorch needs example_inputs: one batch the model accepts")
    (args, kwargs), _ = D.split(example_inputs)
    names, flat = _positional(module, args, kwargs)
    wrapped, dynamic = _for_xnnpack(module, names, len(args))
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, tuple(flat), strict=False)
            signed_activations(program)
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                               constant_methods={_NAMES: [ord(c) for c in ",".join(names)]})
            buffer = edge.to_executorch().buffer
    except Exception as exc:
        raise ExportError(f"ExecuTorch export failed: {one_line(exc)}; run with --debug for the full trace") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_bytes(buffer)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_program(path: str | os.PathLike, threads: int = 2):
    """(forward method, input names) of a .pte program, through ExecuTorch's Python runtime."""
    require("executorch")
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    names: list[str] = []
    if _NAMES in program.method_names:
        codes = program.load_method(_NAMES).execute([])
        names = "".join(chr(int(c)) for c in codes).split(",") if codes else []
    method = program.load_method("forward")
    if not names:
        names = [f"input_{i}" for i in range(method.metadata.num_inputs())]
    return method, names


def signed_activations(program: torch.export.ExportedProgram) -> int:
    """Rewrite uint8 per-tensor quantize / dequantize (0..255, zero point z) as int8 (-128..127, z - 128),
    in place: the same quantizer, in the signed form XNNPACK takes. Returns the count rewritten."""
    qd = torch.ops.quantized_decomposed
    targets = (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)
    count = 0
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in targets and node.args[5] == torch.uint8:
            x, scale, zero, qmin, qmax, _ = node.args[:6]
            node.args = (x, scale, int(zero) - 128, int(qmin) - 128, int(qmax) - 128, torch.int8, *node.args[6:])
            count += 1
    if count:
        program.graph_module.recompile()
    return count


class _Positional(nn.Module):
    """The model called with its inputs as positional tensors in a fixed order (ExecuTorch has no names)."""

    def __init__(self, inner: nn.Module, names: list[str], n_args: int) -> None:
        super().__init__()
        self.inner, self.names, self.n_args = inner, names, n_args

    def forward(self, *flat):
        out = self.inner(*flat[: self.n_args], **dict(zip(self.names[self.n_args:], flat[self.n_args:])))
        return D.first_tensor(out) if not isinstance(out, torch.Tensor) else out


class _DynamicLinear(nn.Module):
    """A dynamic int8 Linear in the operators XNNPACK's partitioner lowers to its dynamic int8 GEMM (what
    ExecuTorch's own quantizer writes): the input quantized per tensor to int8 with scale and zero point
    chosen at run time, the project's int8 weight dequantized per output channel. SmoothQuant kept."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if layer._format["bits"] != 8 or layer._format["granularity"] != "per_channel" or not layer._format["symmetric"]:
            raise ExportError("ExecuTorch: dynamic int8 layers need 8-bit symmetric per-channel weights (XNNPACK's "
                              f"dynamic GEMM); got {layer._format['bits']}-bit {layer._format['granularity']}")
        self.register_buffer("qweight", layer.integer_weight().to(torch.int8).clone())
        self.register_buffer("weight_scale", layer.weight_scale.detach().reshape(-1).float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(self.qweight.shape[0], dtype=torch.int64))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        smooth = layer.input_smooth if layer._spec.get("input_smooth") else None
        self.register_buffer("input_smooth", None if smooth is None else smooth.detach().clone())

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        if self.input_smooth is not None:
            x = x * self.input_smooth
        scale, zero = qd.choose_qparams.tensor(x, -128, 127, torch.finfo(torch.float32).eps, torch.int8)
        x = qd.dequantize_per_tensor.tensor(qd.quantize_per_tensor.tensor(x, scale, zero, -128, 127, torch.int8),
                                            scale, zero, -128, 127, torch.int8)
        w = qd.dequantize_per_channel(self.qweight, self.weight_scale, self.weight_zero_point, 0, -127, 127, torch.int8)
        return F.linear(x, w, self.bias)


def _positional(module: nn.Module, args, kwargs) -> tuple[list[str], list[torch.Tensor]]:
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    flat = [*args, *kwargs.values()]
    if not all(isinstance(t, torch.Tensor) for t in flat):
        raise ExportError("export_executorch: every input must be a tensor")
    return names, flat


def _for_xnnpack(module: nn.Module, names: list[str], n_args: int) -> tuple[nn.Module, bool]:
    """A copy with its dynamic int8 Linears in XNNPACK's dynamic-quantization pattern (_DynamicLinear)."""
    from ..quant.modules import QuantizedLayer

    copy_ = copy.deepcopy(module).eval()
    dynamic = False
    for name, sub in list(copy_.named_modules()):
        if isinstance(sub, QuantizedLayer) and sub.input_dynamic is not None and sub.kind == "linear":
            parent, _, child = name.rpartition(".")
            setattr(copy_.get_submodule(parent) if parent else copy_, child, _DynamicLinear(sub))
            dynamic = True
    return _Positional(copy_, names, n_args).eval(), dynamic

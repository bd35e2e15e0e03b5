"""Real int8 in PyTorch: `st.compile(model)` lowers a quantized model's layers to PyTorch's integer
kernels, so a model that stays in PyTorch runs int8, not a simulation of it.

`QuantizedLayer` computes in float with dequantized weights and fake-quantized activations (the QDQ
graph it exports to). This module copies the model, replaces each layer that PyTorch can run with
integer kernels by a lean module built from the layer's own integers and scales, and compiles the
copy with inductor, weights frozen (`torch._inductor.config.freezing` on at every call) and elementwise
results of more than 10 ops stored once rather than recomputed in every loop that reads them
(`realize_opcount_threshold`, see REALIZE_OPCOUNT):

| layer | lowered to | kernel |
|---|---|---|
| static int8 activations, symmetric 2-8 bit weights per tensor or channel, Linear / Conv1d / Conv2d | the same `quantized_decomposed` dq -> conv/linear -> (relu) -> q pattern, weights as int8 constants | inductor's x86 int8 passes (the ones torchao's PT2E path relies on): `onednn.qconv_pointwise` / `qlinear_pointwise` with prepacked weights, ReLU fused; `MaxPool2d` and reshapes between them run on uint8 |
| dynamic activations (per token or per tensor), Linear | the uint8 codes of `quant/dynamic.py` shifted to int8 (q - 128), computed in float with one cast (vectorizable), `aten._int_mm`, the zero point and the shift corrected by one rank-1 term | inductor's `_int_mm` pattern -> `onednn.qlinear_pointwise` (s8 x s8 -> s32), the quantization fused into one vectorized C++ loop |
| weight-only, <= 4-bit codes, Linear, output features a multiple of 16, groups of 32 / 64 / 128 / 256 (or per channel with K divisible by 32) | below 64 input rows `aten._weight_int4pack_mm_for_cpu` on the codes packed once; from 64 rows (where the inputs split into whole groups) the codes, packed two per byte, dequantized to bfloat16 at every call and one bfloat16 GEMM | PyTorch's int4 weight-only GEMM in bfloat16 (its float32 path is 24x slower than a float32 GEMM here) / oneDNN's bfloat16 GEMM; outputs carry bfloat16 rounding |

Everything else keeps its simulated layer, compiled: weight-only convolutions and 5-8 bit weight-only
Linears (their dequantized weight is constant-folded at compile time and runs float kernels:
PyTorch's int8 weight-only GEMM for float32 inputs, `aten._weight_int8pack_mm`, was 7x slower than
the float GEMM here), per-group or asymmetric weights with int8 activations (the oneDNN kernels take
symmetric weights with one scale per output channel), binary activations. Each such layer is listed
in one warning per reason. Embeddings already gather int8 rows and dequantize only those.

Outputs match the simulated model: static layers compute the same integers (an output may differ by
one quantization step where the float result lies on a rounding boundary), dynamic layers the same
int32 accumulators (float rounding), int4 layers within bfloat16 rounding. `tests/quant/test_torch_int8.py`
states each tolerance.
"""

from __future__ import annotations

import copy
import platform
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import Context
from ..core.select import names_by_module, set_submodule
from ..errors import ConfigError, ModelError
from .binary import BinaryActivation
from .dynamic import _TINY  # the smallest scale (an all-zero row)
from .modules import QuantizedLayer, apply_layer, weight_format
from .ops import dequantize_weight, fake_quant_activation

__all__ = ["BACKENDS", "compile_int8", "lower", "Int8Compiled", "StaticInt8", "DynamicInt8", "Int4WeightOnly",
           "missing_backend"]

BACKENDS = ("inductor",)
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten._weight_int4pack_mm_for_cpu accepts


# -- what this torch build can run ------------------------------------------------------------------
def missing_backend(backend: str) -> list[str]:
    """What the running torch lacks to lower quantized layers with `backend` (empty: nothing)."""
    missing = []
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        missing.append(f"an x86 CPU (inductor's int8 patterns are x86 only; this is {platform.machine()})")
    if not torch.backends.mkldnn.is_available():
        missing.append("oneDNN (torch.backends.mkldnn.is_available() is False: a torch built without MKLDNN)")
    for op in ("qconv_pointwise", "qlinear_pointwise", "qconv_prepack", "qlinear_prepack"):
        if not hasattr(torch.ops.onednn, op):
            missing.append(f"torch.ops.onednn.{op}")
    for op in ("_int_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"):
        if not hasattr(torch.ops.aten, op):
            missing.append(f"torch.ops.aten.{op}")
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor's CPU code generation compiles C++
        missing.append(f"a C++ compiler for inductor's CPU code ({type(exc).__name__}: {exc})")
    return missing


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"compile: backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    missing = missing_backend(backend)
    if missing:
        raise ConfigError(f"compile: backend {backend!r} needs what this torch {torch.__version__} build lacks: "
                          f"{'; '.join(missing)}. Run the simulated model as it is, or export it with "
                          "st.export_onnx and run it in ONNX Runtime")


# -- the lowered layers ---------------------------------------------------------------------------
class _Lowered(nn.Module):
    """What every lowered layer takes over from its QuantizedLayer: the float bias and SmoothQuant's 1 / s."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        if layer._spec.get("input_smooth"):
            self.register_buffer("input_smooth", layer.input_smooth.detach().clone())
        else:
            self.input_smooth = None

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_smooth is None else x * self.input_smooth


class StaticInt8(_Lowered):
    """Static int8: the QuantizedLayer's own QDQ pattern on plain int8 buffers, which inductor's x86
    passes fuse into oneDNN int8 conv / linear. A Conv1d runs as a Conv2d of height 1 (the passes
    match 2-D convolutions)."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__(layer)
        spec, w = layer._spec, layer._format
        self.spec = dict(spec)
        q = layer.integer_weight().detach().to(torch.int8).clone()
        self.conv1d = spec["kind"] == "conv1d"
        if self.conv1d:  # (out, in/groups, k) -> (out, in/groups, 1, k)
            q = q.unsqueeze(2)
            self.spec.update(kind="conv2d", stride=[1, *spec["stride"]], dilation=[1, *spec["dilation"]],
                             padding=spec["padding"] if isinstance(spec["padding"], str) else [0, *spec["padding"]])
            if "explicit_padding" in spec:  # F.pad of the last dim: unchanged for the unsqueezed input
                self.spec["explicit_padding"] = list(spec["explicit_padding"])
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", layer.weight_scale.detach().float().clone())
        self.register_buffer("weight_zero_point", layer.weight_zero_point.detach().to(torch.int32).clone())
        self.qmin, self.qmax = int(w["qmin"]), int(w["qmax"])
        self.input_quant, self.output_quant = layer.input_quant, layer.output_quant
        self.relu = spec.get("activation") == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        if self.conv1d:
            x = x.unsqueeze(2)
        a = self.input_quant
        x = fake_quant_activation(x, a.scale, a.zero_point, a.qmin, a.qmax, _dtype(a.dtype))
        w = dequantize_weight(self.qweight, self.weight_scale, self.weight_zero_point, self.qmin, self.qmax)
        y = apply_layer(self.spec, x, w, self.bias)
        if self.relu:
            y = F.relu(y)
        if (o := self.output_quant) is not None:
            y = fake_quant_activation(y, o.scale, o.zero_point, o.qmin, o.qmax, _dtype(o.dtype))
        return y.squeeze(2) if self.conv1d else y

    def extra_repr(self) -> str:
        return f"{'conv1d' if self.conv1d else self.spec['kind']}, weight={tuple(self.qweight.shape)}, int8 activations"


class DynamicInt8(_Lowered):
    """Dynamic int8 Linear with the arithmetic of quant/dynamic.py: x quantized to uint8 per row (or
    per tensor) with a zero point, then acc = (q - zp) @ Wq^T in int32 and y = acc * scale * w_scale + b.

    oneDNN's int8 GEMM takes one zero point per tensor, so the uint8 codes are shifted to int8
    (q - 128, exact) and the shift and each row's zero point come back as one rank-1 term:
        (q - zp) @ Wq^T = (q - 128) @ Wq^T + (128 - zp) * colsum(Wq)
    The first is `aten._int_mm` scaled by the row and column scales, the shape inductor lowers to
    `onednn.qlinear_pointwise`; the second is a (rows, 1) x (out,) product fused into the epilogue."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__(layer)
        q = layer.integer_weight().detach().to(torch.int8)
        scale = layer.weight_scale.detach().float()
        self.register_buffer("weight_t", q.t().contiguous())  # (in, out): _int_mm's right operand
        self.register_buffer("weight_scale", scale.clone())
        # colsum(Wq) * w_scale, (out,): what each unit of (128 - zp) adds to a row, in output units
        self.register_buffer("colsum_scaled", q.to(torch.int32).sum(dim=1).float() * scale)
        self.per_token = bool(layer.input_dynamic["per_token"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        a, scale, zero_point = quantize_dynamic_s8_shifted(x2, self.per_token)  # scale, zp: (M, 1) or ()
        scale = scale.reshape(-1, 1)  # (M, 1) or (1, 1)
        y = torch._int_mm(a, self.weight_t).to(torch.float32) * scale * self.weight_scale  # (M, N)
        y = y + ((128 - zero_point).reshape(-1, 1).to(torch.float32) * scale) * self.colsum_scaled
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        k, n = self.weight_t.shape
        return f"linear, weight=({n}, {k}), dynamic int8 {'per token' if self.per_token else 'per tensor'}"


def quantize_dynamic_s8_shifted(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant/dynamic.py's `quantize_dynamic_u8` with its codes shifted to int8 (q - 128), computed so
    that inductor vectorizes the loop: the same float operations, the shift applied in float (exact:
    integers below 2^24) and one float -> int8 cast. Going through uint8 and int16 (`(q.to(int16) - 128)
    .to(int8)`) made inductor emit a scalar loop per element, GELU's erf included, which took more
    time than the int8 GEMMs on all-MiniLM-L6-v2. Returns (codes int8, scale, zero point int32)."""
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.min(), x.max()
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=_TINY)
    zero_point = torch.round(-lo / scale).clamp(0, 255)
    a = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - 128.0).to(torch.int8)
    return a, scale, zero_point.to(torch.int32)


class Int4WeightOnly(_Lowered):
    """Weight-only Linear with codes of 4 bits or fewer: codes c in [0, 15], w = (c - 8) * scale + zero
    per group. Our integers map exactly: signed q -> c = q + 8, zero 0; unsigned q with zero point zp
    -> c = q, zero = (8 - zp) * scale.

    Two kernels, chosen by the number of input rows (static at trace time):
    - fewer than `DENSE_ROWS` (token-by-token decoding): `aten._weight_int4pack_mm_for_cpu` on the codes
      packed once in its layout; it reads 4 bits per weight;
    - `DENSE_ROWS` or more (a batch of sequences): the codes, packed two per byte in a layout of our
      own, dequantized to a bfloat16 weight in one fused loop at every call, then one bfloat16 GEMM
      (oneDNN; AMX where the CPU has it). The int4 kernel is compute-bound there: at 1,024 rows it took
      13 ms where a bfloat16 GEMM took 0.8 ms and float32 5.9 ms (384 x 1536, one thread, AMX CPU).
      Inductor's freezing does not constant-fold an int8 constant converted to bfloat16, so the
      dequantization stays in the graph and memory keeps 4-bit codes (two copies: 1 byte per weight).
    Both compute in bfloat16 (input, weight, output) with the same bfloat16 scales; the result is
    returned in float32."""

    DENSE_ROWS = 64

    def __init__(self, layer: QuantizedLayer, group: int) -> None:
        super().__init__(layer)
        w = layer._format
        q = layer.integer_weight().detach().to(torch.int32)  # (N, K)
        n, k = q.shape
        scale = layer.weight_scale.detach().float()
        zp = layer.weight_zero_point.detach().to(torch.int32)
        if scale.dim() == 1:  # per channel (or tensor): the same scale repeated over groups of `group`
            scale = scale[:, None].expand(n, k // group)
            zp = zp[:, None].expand(n, k // group)
        signed = w["dtype"] == "int8"
        codes = q + 8 if signed else q
        zero = torch.zeros_like(scale) if signed else (8 - zp).float() * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        # (K / group, N, 2): scale and zero of each group, the kernel's layout
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16))
        self.group, self.out_features, self.in_features = group, n, k
        self.dense = k % (2 * group) == 0  # each half of the inputs holds whole groups
        if self.dense:
            # (K / 2, N) int8: byte [j, n] = c[n, j] + 16 (c[n, j + K/2] - 8), in [-128, 127]
            ct = codes.t()
            self.register_buffer("codes_t", (ct[: k // 2] + 16 * (ct[k // 2:] - 8)).to(torch.int8).contiguous())

    def _weight_t(self) -> torch.Tensor:
        """(K, N) bfloat16: (c - 8) * scale + zero with the int4 kernel's bfloat16 scales and zeros."""
        k, n, g = self.in_features, self.out_features, self.group
        # int8 -> bfloat16 (exact for |v| <= 128): inductor keeps this conversion of a constant in the graph
        v = self.codes_t.to(torch.bfloat16).to(torch.float32)  # (K/2, N)
        hi = torch.floor(v / 16)  # c[n, j + K/2] - 8, exactly
        lo = v - 16 * hi - 8  # c[n, j] - 8
        sz = self.scales_zeros.to(torch.float32).reshape(2, k // (2 * g), 1, n, 2)  # halves of the groups
        halves = [(c.reshape(k // (2 * g), g, n) * sz[i, ..., 0] + sz[i, ..., 1]).reshape(k // 2, n)
                  for i, c in enumerate((lo, hi))]
        return torch.cat(halves).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.smoothed(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.dense and x2.shape[0] >= self.DENSE_ROWS:
            y = torch.mm(x2, self._weight_t()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"linear, out={self.out_features}, int4 weight-only, group={self.group}, bfloat16 compute"
                f"{f', bfloat16 GEMM from {self.DENSE_ROWS} rows' if self.dense else ''}")


def _dtype(name: str) -> torch.dtype:
    return {"int8": torch.int8, "uint8": torch.uint8}[name]


# -- choosing ------------------------------------------------------------------------------------
def _plan(layer: QuantizedLayer) -> tuple[str, Any]:
    """('static' | 'dynamic' | ('int4', group) | 'simulated', reason)."""
    spec, w = layer._spec, weight_format(layer._spec)
    kind = spec["kind"]
    if w.get("format") == "log2":  # codes are exponents, not integers to multiply (quant/log2.py)
        return "simulated", "log2 weights: no PyTorch shift kernel; simulated with the float powers of two"
    if kind == "embedding":
        return "embedding", None
    if layer.input_dynamic is not None:  # Linear, symmetric int8 per tensor / channel by construction
        return "dynamic", None
    symmetric_channel = w["dtype"] == "int8" and w["granularity"] != "per_group" and bool(
        (layer.weight_zero_point == 0).all())
    if layer.input_quant is not None:
        if isinstance(layer.input_quant, BinaryActivation) or isinstance(layer.output_quant, BinaryActivation):
            return "simulated", "binary activations: no PyTorch kernel, simulated"
        if not symmetric_channel:
            fmt = "per-group" if w["granularity"] == "per_group" else "asymmetric (zero-point)"
            return "simulated", (f"{fmt} weights with int8 activations: PyTorch's oneDNN int8 conv/linear take "
                                 "symmetric weights with one scale per output channel; simulated")
        if layer.input_quant.dtype != "uint8" or (layer.output_quant is not None and layer.output_quant.dtype != "uint8"):
            return "simulated", ("signed int8 activations (symmetric: true): inductor's int8 patterns take uint8 "
                                 "activations; simulated")
        if kind in ("conv1d", "conv2d") and isinstance(spec["padding"], str):
            return "simulated", f"padding={spec['padding']!r}: inductor's int8 conv pattern needs explicit padding; simulated"
        return "static", None
    if layer.output_quant is not None:
        return "simulated", "output quantized without an input quantizer: no int8 kernel; simulated"
    # weight-only
    if kind != "linear":
        return "simulated", ("weight-only convolution: PyTorch has no weight-only int8 conv; its weight is "
                             "dequantized once at compile time and runs float kernels")
    n, k = spec["weight_shape"]
    if w["bits"] > 4:
        return "simulated", (f"{w['bits']}-bit weight-only Linear: PyTorch's int8 weight-only GEMM for float32 "
                             "inputs (aten._weight_int8pack_mm) is slower than float; dequantized once at compile "
                             "time, float kernels")
    if n % 16:
        return "simulated", (f"int4 weight-only Linear with {n} outputs: the int4 kernel needs a multiple of 16; "
                             "dequantized once at compile time, float kernels")
    if w["granularity"] == "per_group":
        g = int(w["group_size"])
        if g in INT4_GROUPS:
            return "int4", g
        return "simulated", (f"int4 weight-only Linear with group_size {g}: the int4 kernel takes groups of "
                             f"{'/'.join(map(str, sorted(INT4_GROUPS)))}; dequantized once at compile time, float kernels")
    g = next((g for g in INT4_GROUPS if k % g == 0), None)
    if g is None:
        return "simulated", (f"int4 weight-only Linear with {k} inputs: per channel it needs a multiple of 32; "
                             "dequantized once at compile time, float kernels")
    return "int4", g


def lower(model: nn.Module, ctx: Context | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A copy of `model` (eval mode) with every QuantizedLayer that PyTorch can run with integer
    kernels replaced by StaticInt8 / DynamicInt8 / Int4WeightOnly; `{name: how}` for every quantized
    layer ('static int8', 'dynamic int8', 'int4 weight-only', 'embedding', or 'simulated: <reason>').
    Layers left simulated go through `ctx.skip` (one warning per reason at `ctx.flush_skips`)."""
    model = copy.deepcopy(model).eval()
    names = names_by_module(model)
    plan: dict[str, str] = {}
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLayer) or id(module) in replaced:
            continue
        how, arg = _plan(module)
        new: nn.Module | None = None
        if how == "static":
            new, label = StaticInt8(module), "static int8"
        elif how == "dynamic":
            new, label = DynamicInt8(module), "dynamic int8"
        elif how == "int4":
            new, label = Int4WeightOnly(module, arg), "int4 weight-only"
        elif how == "embedding":
            label = "embedding (int8 rows gathered, then dequantized)"
        else:
            label = f"simulated: {arg}"
            if ctx is not None:
                ctx.skip(name, arg)
        for alias in names[id(module)]:
            plan[alias] = label
            if new is not None:
                set_submodule(model, alias, new)
        replaced[id(module)] = new if new is not None else module
    return model, plan


# -- compiling -----------------------------------------------------------------------------------
_VIEWS = ("view", "reshape", "permute", "t", "transpose", "unsqueeze", "squeeze", "expand", "clone")
# Inductor inlines an elementwise result into every loop that reads it unless it is "large" (more than
# 50 ops on CPU) or uses exp / log / tanh. A dynamic layer's input is read by three loops (the row
# minimum, maximum and the quantization), so a GELU (erf, not on that list) with the previous layer's
# rescale (about 15 ops) ran three times. At 10 it is stored once: all-MiniLM-L6-v2 took about 20 %
# less CPU time (docs/benchmarks.md).
REALIZE_OPCOUNT = 10


class _Int8Census:
    """An inductor post-grad pass that only counts: oneDNN int8 conv / linear nodes (patterns matched)
    and integer computations left unmatched (an `_int_mm`, or a float conv / matmul reading a
    dequantized activation). Counted on the graph inductor compiles, so a layer the compiler drops as
    dead code (a BERT pooler under mean pooling) is in neither count."""

    def __init__(self) -> None:
        self.lowered = 0
        self.unmatched = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten, qd = torch.ops.aten, torch.ops.quantized_decomposed
        dequant = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor}
        compute = {aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default}

        def from_dequant(node: Any) -> bool:
            while isinstance(node, torch.fx.Node) and node.op == "call_function":
                if node.target in dequant:
                    return True
                if getattr(node.target, "__name__", "").split(".")[0] not in _VIEWS:
                    return False
                node = node.args[0] if node.args else None
            return False

        for node in graph.nodes:
            if node.op != "call_function":
                continue
            # Matched patterns are oneDNN ops, or (static layers) inductor's lowering functions
            # `functools.partial(<..._register_quantized_conv_lowering.<locals>.qconv>, Match(...))`.
            name = str(node.target)
            func = getattr(getattr(node.target, "func", None), "__name__", "")
            if "onednn.qconv" in name or "onednn.qlinear" in name or func.startswith(("qconv", "qlinear")):
                self.lowered += 1
            elif node.target is aten._int_mm.default:
                self.unmatched += 1
            elif node.target in compute and any(from_dequant(a) for a in node.args):
                self.unmatched += 1

    def uuid(self) -> str:
        # Part of inductor's cache key. A graph served from the cache is not counted again (it was
        # when first compiled, warning included), and the compile takes seconds instead of minutes.
        return "shrinktunnel-int8-census-1"


class Int8Compiled(nn.Module):
    """The lowered model compiled by inductor with frozen weights; inference only (every call runs
    under `torch.no_grad`: freezing, and so the int8 lowering, applies only without autograd).

    `lowered`: the eager lowered model (integer buffers, same outputs, no compile); `plan`: how each
    quantized layer runs; `compile_seconds`: the first call's time (tracing, lowering, C++ compile);
    `int8_matched` / `int8_unmatched`: oneDNN int8 conv / linear nodes in the first compiled graph, and
    integer computations inductor left unmatched there (a warning names the lowered layers then); None
    when inductor's on-disk cache served the graph (counted when it was first compiled)."""

    def __init__(self, lowered: nn.Module, plan: dict[str, str], compiled: Any, expected: int) -> None:
        super().__init__()
        self.lowered = lowered
        self.plan = plan
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: it wraps `lowered` itself
        self._expected = expected
        self.compile_seconds: float | None = None
        self.int8_matched: int | None = None
        self.int8_unmatched: int | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config as inductor_config

        # Freezing must be on when dynamo traces (it decides whether weights are graph inputs or
        # constants), at the first call and at any recompilation: torch.compile(options=...) applies
        # it too late, and the weight prepacking then fails on non-constant weights.
        with torch.no_grad(), inductor_config.patch(freezing=True, realize_opcount_threshold=REALIZE_OPCOUNT):
            if self.compile_seconds is not None:
                return self._compiled(*args, **kwargs)
            return self._first_call(*args, **kwargs)

    def _first_call(self, *args: Any, **kwargs: Any) -> Any:
        import time

        from torch._inductor import config as inductor_config

        census = _Int8Census()
        t0 = time.perf_counter()
        with inductor_config.patch(post_grad_custom_post_pass=census):
            out = self._compiled(*args, **kwargs)
        self.compile_seconds = time.perf_counter() - t0
        if census.lowered or census.unmatched or not self._expected:
            self.int8_matched, self.int8_unmatched = census.lowered, census.unmatched
        # else: inductor's cache served the graph, counted (and warned about) when first compiled
        if census.unmatched:
            # A layer whose pattern inductor did not match runs the simulated ops, compiled.
            warnings.warn(f"compile: inductor left {census.unmatched} int8 conv/linear computation(s) of the "
                          f"{self._expected} lowered layers unmatched (it matched {census.lowered}); those run "
                          "simulated (fake-quantized float kernels), with the same outputs. Lowered layers: "
                          f"{', '.join(n for n, how in self.plan.items() if how in ('static int8', 'dynamic int8'))}",
                          stacklevel=3)
        return out


def compile_int8(model: nn.Module, backend: str = "inductor", *, dynamic: bool = False) -> Int8Compiled:
    """Return a NEW module that runs `model`'s quantized layers with PyTorch's integer kernels
    (`model` is not changed); see the module docstring for which layers and how.

    `backend`: "inductor" (torch.compile, x86 CPU, weights frozen). `dynamic`: passed to
    torch.compile. False (the default): each new input shape compiles once more; with dynamic shapes
    torch 2.13's int8 conv lowering fails an output stride assertion (the MNIST CNN at a second batch size).
    Compilation happens at the first call (tens of seconds on 2 cores). A backend this torch build
    lacks (no oneDNN, no C++ compiler, not x86) is a ConfigError naming what is missing."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"compile expects a torch.nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    devices = {p.device.type for p in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise ConfigError(f"compile: backend {backend!r} runs on the CPU; the model is on {sorted(devices)}: "
                          "move it with model.cpu() first")
    ctx = Context(progress=False)
    lowered, plan = lower(model, ctx)
    ctx.flush_skips("compile")
    expected = sum(1 for m in {id(m): m for m in lowered.modules()}.values() if isinstance(m, (StaticInt8, DynamicInt8)))
    compiled = torch.compile(lowered, backend="inductor", dynamic=dynamic)
    out = Int8Compiled(lowered, plan, compiled, expected)
    out.warnings = list(ctx.warnings)
    return out

"""Quantized layers: integer weights with per-tensor, per-channel or per-group scales, optional
activation fake-quant.

A `QuantizedLayer` replaces one Linear / Conv1d / Conv2d. It stores the weight as integers (the
artifact's payload) and computes in float with the dequantized weight, which is exactly what ONNX
Runtime's QDQ graph computes before it fuses the pattern into integer kernels. 8-bit integers are
stored as they are (`qweight`, int8 or uint8, the weight's shape); narrower ones packed at their own
width (`qweight_packed`, uint8, see codec/bitpack), unpacked once into a cache that is not part of the
state dict. With `coding: huffman` the integers are Huffman-coded instead (`qweight_code`, its code
lengths in `qweight_code_lengths`; codec/huffman): the grid is the same, the bytes approach the
entropy of the integers (about 3.1 bits for int4 and 5.2 for int6 on all-MiniLM-L6-v2's weights),
as Deep Compression codes its codebook indices. Everything needed to rebuild the layer (shapes, format, conv geometry, activation scales)
is in `spec()`, a JSON-ready dict; `from_spec(spec)` builds an empty layer of the right shapes and
dtypes that `load_state_dict` then fills.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import huffman, pack, packed_nbytes, unpack
from . import log2
from .dynamic import dynamic_linear
from .nbits import exports_as_nbits, matmul_nbits, nbits_layout
from .ops import dequantize_weight, fake_quant_activation, lookup_dequantized

__all__ = ["QuantizedLayer", "ActQuant", "SUPPORTED", "WEIGHT_ONLY", "SpecAttributes"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
WEIGHT_ONLY = (nn.Embedding,)  # a lookup table: its weight is quantized (per row), its input is an index
_KIND = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32}


class ActQuant:
    """Per-tensor activation quantization parameters (plain Python numbers: they are constants of
    the exported graph and JSON numbers in the manifest)."""

    __slots__ = ("scale", "zero_point", "qmin", "qmax", "dtype")

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, dtype: str) -> None:
        self.scale, self.zero_point, self.qmin, self.qmax, self.dtype = (
            float(scale), int(zero_point), int(qmin), int(qmax), dtype
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_activation(x, self.scale, self.zero_point, self.qmin, self.qmax, _DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ActQuant | None":
        if d is not None and d.get("format") == "binary":  # two levels, offset +- scale (quant/binary.py)
            from .binary import BinaryActivation

            return BinaryActivation.from_dict(d)
        return None if d is None else cls(**d)


def weight_format(spec: dict[str, Any]) -> dict[str, Any]:
    """The `weight` entry of a spec with the keys older artifacts lack filled in (they wrote 8-bit,
    symmetric, unpacked weights with one scale per output channel)."""
    w = dict(spec["weight"])
    w.setdefault("symmetric", True)
    w.setdefault("group_size", None)
    w.setdefault("packed", False)
    w.setdefault("zero_point_dtype", "int32")
    w.setdefault("coding", "plain")
    _check_format(w, spec["weight_shape"])
    return w


def _check_format(w: dict[str, Any], shape: list[int]) -> None:
    """Reject a weight format this version cannot honour (ValueError; replay reports it as an
    ArtifactError) instead of building a layer that would misread its tensors."""
    bits, dtype = w["bits"], w["dtype"]
    problems = []
    fmt = w.get("format", "int")
    if fmt not in ("int", "ternary", "binary", "log2"):
        problems.append(f"format={fmt!r} (int, ternary, binary or log2)")
    elif fmt == "log2":  # codes in [-n, n], n = 2^(bits-1) - 1, signed and packed below 8 bits; quant/log2.py
        n = (1 << (bits - 1)) - 1 if isinstance(bits, int) and 2 <= bits <= 8 else None
        if n is None or (dtype, w["qmin"], w["qmax"], bool(w["packed"])) != ("int8", -n, n, bits < 8) \
                or w["granularity"] == "per_group":
            problems.append(f"log2 weights with bits/dtype/qmin/qmax/packed/granularity={bits!r}/{dtype!r}/"
                            f"{w['qmin']!r}/{w['qmax']!r}/{w['packed']!r}/{w['granularity']!r} (bits 2 to 8, 'int8', "
                            "-n, n = 2^(bits-1) - 1, packed below 8 bits, per_tensor or per_channel)")
    elif fmt == "binary":
        # Binary weights are q in {-1, +1}, stored one bit each (1: +1, 0: -1); quant/binary.py.
        if (bits, dtype, w["qmin"], w["qmax"], bool(w["packed"])) != (1, "int8", -1, 1, True):
            problems.append(f"binary weights with bits/dtype/qmin/qmax/packed={bits!r}/{dtype!r}/{w['qmin']!r}/"
                            f"{w['qmax']!r}/{w['packed']!r} (must be 1/'int8'/-1/1/True)")
    elif not (isinstance(bits, int) and 2 <= bits <= 8):
        problems.append(f"bits={bits!r} (2 to 8 are supported)")
    elif dtype not in ("int8", "uint8"):
        problems.append(f"dtype={dtype!r} (int8 or uint8)")
    else:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if dtype == "int8" else (0, (1 << bits) - 1)
        if not lo <= w["qmin"] <= w["qmax"] <= hi:
            problems.append(f"qmin/qmax={w['qmin']}/{w['qmax']} outside a {bits}-bit {dtype[:-1]} range")
        if bool(w["packed"]) != (bits < 8):
            problems.append(f"packed={w['packed']!r} with bits={bits} (packed exactly when bits < 8)")
    if w["coding"] == "huffman":
        if fmt != "int":
            problems.append(f"coding=huffman with format={fmt!r} (integer weights only)")
        if not (isinstance(w.get("code_bytes"), int) and w["code_bytes"] >= 0):
            problems.append(f"code_bytes={w.get('code_bytes')!r} (the Huffman stream's length, an integer >= 0)")
    elif w["coding"] != "plain":
        problems.append(f"coding={w['coding']!r} (plain or huffman)")
    if w["zero_point_dtype"] not in _DTYPES:
        problems.append(f"zero_point_dtype={w['zero_point_dtype']!r}")
    if w["granularity"] == "per_group":
        k = int(torch.Size(shape[1:]).numel())
        g = w["group_size"]
        if not (isinstance(g, int) and g >= 2 and k % g == 0):
            problems.append(f"group_size={g!r} for an input dimension of {k}")
    elif w["granularity"] not in ("per_tensor", "per_channel"):
        problems.append(f"granularity={w['granularity']!r}")
    if problems:
        raise ValueError(f"unsupported quantized weight format: {'; '.join(problems)}; "
                         "this artifact needs a newer shrinktunnel, or it is corrupted")


def apply_layer(spec: dict[str, Any], x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Linear / Conv1d / Conv2d that `spec` (see `QuantizedLayer.geometry`) describes, with weight `w`."""
    if spec["kind"] == "linear":
        return F.linear(x, w, bias)
    if spec["kind"] == "embedding":
        return F.embedding(x, w, spec.get("padding_idx"))
    conv = F.conv2d if spec["kind"] == "conv2d" else F.conv1d
    padding = spec["padding"]
    if spec.get("padding_mode", "zeros") != "zeros":
        # Non-zero padding is applied by F.pad before a conv without padding, as torch does.
        x = F.pad(x, spec["explicit_padding"], mode=spec["padding_mode"])
        padding = 0
    return conv(x, w, bias, spec["stride"], padding, spec["dilation"], spec["groups"])


def _layer_attributes(spec: dict[str, Any]) -> dict[str, Any]:
    """The constructor attributes of the torch layer that `spec` describes (nn.Linear's in_features, ...)."""
    shape, kind = spec["weight_shape"], spec["kind"]
    if kind == "linear":
        return {"in_features": shape[1], "out_features": shape[0]}
    if kind == "embedding":
        return {"num_embeddings": shape[0], "embedding_dim": shape[1], "padding_idx": spec.get("padding_idx")}
    pad = spec["padding"]
    return {"in_channels": shape[1] * spec["groups"], "out_channels": shape[0], "kernel_size": tuple(shape[2:]),
            "stride": tuple(spec["stride"]), "padding": pad if isinstance(pad, str) else tuple(pad),
            "dilation": tuple(spec["dilation"]), "groups": spec["groups"],
            "padding_mode": spec.get("padding_mode", "zeros")}


class SpecAttributes:
    """Mixin for the methods' replacement layers (sparse, clustered, float-format, fake-quant): the replaced
    torch layer's constructor attributes (`stride`, `kernel_size`, `in_features`, ...), answered from the
    layer's `_spec`. Model code reads them outside the layer's forward (MobileNetV2's TF padding, Whisper's
    encoder read `conv.stride`); without them the compressed model's own forward fails."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module's: parameters, buffers, children
        except AttributeError:
            spec = self.__dict__.get("_spec")
            if isinstance(spec, dict) and "kind" in spec and "weight_shape" in spec:
                attrs = _layer_attributes(spec)
                if name in attrs:
                    return attrs[name]
            raise


def explicit_padding(conv: nn.Module) -> list[int]:
    """F.pad's argument for a conv whose padding_mode is not "zeros", as torch's own conv pads: last
    dimension first, (left, right) each; "same" puts the odd element on the right."""
    pad: list[int] = []
    for i in reversed(range(len(conv.kernel_size))):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pad += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pad += [0, 0]
        else:
            pad += [conv.padding[i]] * 2
    return pad


class QuantizedLayer(nn.Module):
    """Linear or convolution with integer weights. Buffers: `qweight` (weight shape, int8 or uint8)
    or, below 8 bits, `qweight_packed` (uint8, ceil(numel * bits / 8) bytes), or, Huffman-coded,
    `qweight_code` (uint8) and `qweight_code_lengths` (uint8, 2^bits); `weight_scale` (float32)
    and `weight_zero_point` (int32; per group, the weight's int8 / uint8), of shape (out,) or, per group,
    (out, n_groups); parameter `bias` (float32) if any."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = spec
        w = weight_format(spec)
        self._format = w
        dtype = _DTYPES[w["dtype"]]
        shape = list(spec["weight_shape"])
        out, numel = shape[0], int(torch.Size(shape).numel())
        if w["coding"] == "huffman":
            self.register_buffer("qweight_code", torch.zeros(w["code_bytes"], dtype=torch.uint8))
            self.register_buffer("qweight_code_lengths", torch.zeros(1 << w["bits"], dtype=torch.uint8))
        elif w["packed"]:
            self.register_buffer("qweight_packed", torch.zeros(packed_nbytes(numel, w["bits"]), dtype=torch.uint8))
        if self._stored_coded:
            # The integers, refreshed from the stored bytes when they change (see integer_weight).
            self.register_buffer("qweight_unpacked", torch.zeros(shape, dtype=dtype), persistent=False)
            self._unpacked_from: tuple | None = None  # (data_ptr, version) of the stored bytes decoded
        else:
            self.register_buffer("qweight", torch.zeros(shape, dtype=dtype))
        qshape = (out,)
        if w["granularity"] == "per_group":
            qshape = (out, numel // out // int(w["group_size"]))
        self.register_buffer("weight_scale", torch.ones(qshape, dtype=torch.float32))
        self.register_buffer("weight_zero_point", torch.zeros(qshape, dtype=_DTYPES[w["zero_point_dtype"]]))
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if spec["bias"] else None
        self.input_quant = ActQuant.from_dict(spec.get("input"))
        self.output_quant = ActQuant.from_dict(spec.get("output"))
        # {"per_token": bool}: the input is quantized at run time (quant/dynamic.py), Linear only.
        self.input_dynamic: dict[str, Any] | None = spec.get("input_dynamic")
        if self.input_dynamic is not None and (spec["kind"] != "linear" or w["dtype"] != "int8"
                                               or w["granularity"] == "per_group"):
            raise ValueError("dynamic activations need a Linear with symmetric int8 weights per tensor or channel")
        if spec["kind"] == "embedding" and (spec.get("input") or spec.get("output") or self.input_dynamic):
            raise ValueError("an embedding is quantized weight-only: its input is an index")
        if spec.get("input_smooth"):
            # SmoothQuant (quant/smooth.py): the input is multiplied by 1 / s per channel, the weight holds W * s.
            if spec["kind"] != "linear":
                raise ValueError("input smoothing applies to Linear layers only")
            self.register_buffer("input_smooth", torch.ones(shape[1], dtype=torch.float32))

    def __getattr__(self, name: str) -> Any:
        """The replaced layer's attributes that model code reads outside its forward, answered from the
        spec: transformers' ViT and T5 read `layer.weight.dtype`, MobileNetV2's TF padding and Whisper's
        encoder read `conv.stride` / `kernel_size` / `dilation`. Without them the quantized model's own
        forward (and so its export) fails with an AttributeError. `weight` is the dequantized float weight."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            spec = self.__dict__.get("_spec")
            if spec is not None:
                if name == "weight":
                    return self.dequantized_weight()
                attrs = _layer_attributes(spec)
                if name in attrs:
                    return attrs[name]
            raise

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def geometry(module: nn.Module) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "kind": _KIND[type(module)],
            "weight_shape": list(module.weight.shape),
            "bias": getattr(module, "bias", None) is not None,
        }
        if isinstance(module, nn.Embedding):
            spec["padding_idx"] = module.padding_idx
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            pad = module.padding
            spec.update(
                stride=list(module.stride),
                padding=pad if isinstance(pad, str) else list(pad),
                dilation=list(module.dilation),
                groups=module.groups,
                padding_mode=module.padding_mode,
            )
            if module.padding_mode != "zeros":
                # Non-zero padding is applied by F.pad before a conv without padding, as torch does.
                spec["explicit_padding"] = explicit_padding(module)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "QuantizedLayer":
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        spec = dict(self._spec)
        spec["input"] = self.input_quant.to_dict() if self.input_quant else None
        spec["output"] = self.output_quant.to_dict() if self.output_quant else None
        return spec

    @property
    def kind(self) -> str:
        return self._spec["kind"]

    @property
    def activation(self) -> str | None:
        return self._spec.get("activation")

    @property
    def packed(self) -> bool:
        return bool(self._format["packed"])

    @property
    def _stored_coded(self) -> bool:
        """The integers are stored as bytes to decode (bit-packed or Huffman-coded), not as they are."""
        return self._format["coding"] == "huffman" or bool(self._format["packed"])

    def _symbol_offset(self) -> int:
        """Huffman symbols are q + offset in [0, 2^bits): signed integers shifted by 2^(bits-1)."""
        return 1 << (self._format["bits"] - 1) if self._format["dtype"] == "int8" else 0

    def num_weights(self) -> int:
        return int(torch.Size(self._spec["weight_shape"]).numel()) + (self.bias.numel() if self.bias is not None else 0)

    # -- integer weights ----------------------------------------------------------------------
    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store integer weights (weight shape, in [qmin, qmax]) with their scales and zero points."""
        w = self._format
        if w.get("format") == "log2" and not log2.is_pow2(scale):
            raise ValueError("log2 weights need power-of-two scales (2^e_max per channel)")
        if w.get("format") == "binary":
            if not bool(((q == 1) | (q == -1)).all()):
                raise ValueError("binary weights must be -1 or +1")
            self.qweight_packed.copy_(pack((q > 0).to(torch.uint8), 1, signed=False))
            self._unpacked_from = None
        elif w["coding"] == "huffman":
            code, lengths = huffman.encode_symbols(q.reshape(-1).to(torch.int64) + self._symbol_offset(), 1 << w["bits"])
            self.qweight_code, self.qweight_code_lengths = code, lengths
            # The stream's length is part of the layer's format: replay allocates it before loading.
            self._format["code_bytes"] = int(code.numel())
            self._spec = {**self._spec, "weight": {**self._spec["weight"], "code_bytes": int(code.numel())}}
            self._unpacked_from = None
        elif w["packed"]:
            self.qweight_packed.copy_(pack(q, w["bits"], signed=w["dtype"] == "int8"))
            self._unpacked_from = None
        else:
            self.qweight.copy_(q)
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)

    def integer_weight(self) -> torch.Tensor:
        """The integer weight, in the weight's shape (int8 or uint8). Packed weights are unpacked once
        and cached; the cache is refreshed whenever `qweight_packed` is replaced or changed in place
        (load_state_dict, .to(), copy_)."""
        if not self._stored_coded:
            return self.qweight
        packed = self.qweight_code if self._format["coding"] == "huffman" else self.qweight_packed
        if torch.compiler.is_exporting():
            # Traced buffers hold no data: the cache, a buffer too, becomes the exported constant.
            # st.export_onnx refreshes it first (prepare_export).
            if self._unpacked_from is None:
                raise RuntimeError(f"{self.kind} layer: packed weights not unpacked yet; run the model once "
                                   "or export with st.export_onnx, which unpacks them")
            return self.qweight_unpacked
        # Inference tensors (made under torch.inference_mode) have no version counter.
        key = (packed.data_ptr(), None if packed.is_inference() else packed._version, packed.device)
        if self._unpacked_from != key:
            w = self._format
            if w.get("format") == "binary":  # stored bit b is the weight 2b - 1
                q = unpack(packed, 1, False, self.qweight_unpacked.numel()).to(torch.int8) * 2 - 1
            elif w["coding"] == "huffman":
                q = huffman.decode(packed, self.qweight_code_lengths, self.qweight_unpacked.numel()) - self._symbol_offset()
            else:
                q = unpack(packed, w["bits"], w["dtype"] == "int8", self.qweight_unpacked.numel())
            self.qweight_unpacked = q.view(self.qweight_unpacked.shape).to(self.qweight_unpacked.dtype)
            self._unpacked_from = key
        return self.qweight_unpacked

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._stored_coded:
            self._unpacked_from = None  # new bytes: decode again on next use

    def dequantized_weight(self) -> torch.Tensor:
        """(q - zero_point) * scale, per output channel or per group: the float weight the layer uses."""
        w = self._format
        if w.get("format") == "log2":
            return log2.layer_weight(self)
        return dequantize_weight(self.integer_weight(), self.weight_scale, self.weight_zero_point, w["qmin"], w["qmax"])

    def prepare_export(self) -> str | None:
        """Called by st.export_onnx before tracing: brings the unpacked cache up to date and returns a
        note when the layer does not export as int8 QuantizeLinear/DequantizeLinear (None when it does)."""
        w = self._format
        if self._stored_coded:
            self.integer_weight()
        if w.get("format") == "log2":
            return log2.prepare_export(self)
        if self.kind == "embedding":
            return None  # any width or granularity: integer rows gathered, then dequantized (forward)
        if exports_as_nbits(self.kind, w["bits"], w["granularity"], w["group_size"]) and self.input_dynamic is None:
            # Traced as ONNX Runtime's MatMulNBits (quant/nbits.py): these buffers become its initializers.
            b, scales, zero_points = nbits_layout(self.integer_weight(), self.weight_scale, self.weight_zero_point,
                                                  signed=w["dtype"] == "int8")
            for name, t in (("nbits_b", b), ("nbits_scales", scales), ("nbits_zero_points", zero_points)):
                self.register_buffer(name, t, persistent=False)
            return ("4-bit per-group weights export as ONNX Runtime's com.microsoft MatMulNBits (4-bit blocks "
                    "dequantized inside its GEMM); runtimes other than ONNX Runtime do not know this operator")
        if w["granularity"] == "per_group":
            return (f"{w['bits']}-bit per-group weights export dequantized (opset 20 has no blocked "
                    "DequantizeLinear): ONNX Runtime folds them into float weights and runs these layers in "
                    "float, with PyTorch's numerics and at float speed")
        if w["bits"] < 8:
            return (f"{w['bits']}-bit weights export unpacked, one {w['dtype']} byte per weight, with "
                    "QuantizeLinear/DequantizeLinear; ONNX Runtime has no int4 (or other sub-byte) conv/gemm "
                    "for QDQ graphs and runs them with its 8-bit kernels, or in float when activations are not quantized")
        return None

    def lookup_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the weight the layer stands for: an embedding's lookup, or a tied head read as
        its embedding (core/tied.py). Integer rows are gathered first and only they are dequantized."""
        w = self._format
        if w.get("format") == "log2":
            rows = self.dequantized_weight()[index]
        else:  # symmetric signed weights have zero points of 0 by construction
            zero_point = None if w["symmetric"] and w["dtype"] == "int8" else self.weight_zero_point
            rows = lookup_dequantized(index, self.integer_weight(), self.weight_scale, zero_point)
        if self._spec.get("input_smooth"):  # a Linear holding W * s per input column stores 1 / s
            rows = rows * self.input_smooth
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._spec.get("input_smooth"):
            x = x * self.input_smooth
        if self.kind == "embedding":  # weight-only: look the integer rows up, then dequantize them
            return self.lookup_rows(x)
        if self.input_dynamic is not None:
            y = dynamic_linear(x, self.integer_weight(), self.weight_scale, self.bias, self.input_dynamic["per_token"])
        else:
            if self.input_quant is not None:
                x = self.input_quant(x)
            if torch.compiler.is_exporting() and hasattr(self, "nbits_b"):
                k, n = self._spec["weight_shape"][1], self._spec["weight_shape"][0]
                y = matmul_nbits(x, self.nbits_b, self.nbits_scales, self.nbits_zero_points, k, n, self._format["group_size"])
                y = y if self.bias is None else y + self.bias
            else:
                y = apply_layer(self._spec, x, self.dequantized_weight(), self.bias)
        s = self._spec
        if s.get("activation") == "relu":
            y = F.relu(y)
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y

    def extra_repr(self) -> str:
        w = self._format
        act = self._spec.get("activation")
        fmt = f"{w['bits']}-bit {'log2' if w.get('format') == 'log2' else w['dtype']}" + (" packed" if w["packed"] else "")
        gran = f"per_group({w['group_size']})" if w["granularity"] == "per_group" else w["granularity"]
        return (
            f"{self.kind}, weight={tuple(self._spec['weight_shape'])} {fmt} {gran}"
            + (f", in_q=({self.input_quant.scale:.4g}, {self.input_quant.zero_point})" if self.input_quant else "")
            + (f", out_q=({self.output_quant.scale:.4g}, {self.output_quant.zero_point})" if self.output_quant else "")
            + (f", in_q=dynamic {'per token' if self.input_dynamic['per_token'] else 'per tensor'}" if self.input_dynamic else "")
            + (", smoothed" if self._spec.get("input_smooth") else "")
            + (f", fused={act}" if act else "")
        )

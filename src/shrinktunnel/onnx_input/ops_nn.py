"""ONNX operators with weights or windows: Conv, ConvTranspose, Gemm, MatMul, LSTM, normalizations,
pooling, Pad and Resize.

A Conv / ConvTranspose / Gemm / MatMul whose weight is a constant becomes a real torch layer
(nn.Conv1d/2d/3d, nn.ConvTranspose, nn.Linear; `make_layer`), so quantize / prune / cluster /
decompose see it; LSTM becomes nn.LSTM (gates reordered from ONNX's i, o, f, c to torch's i, f, g, o).
ONNX pads that torch cannot express in the layer (begin != end, auto_pad) are applied before it with
F.pad, keeping the layer canonical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dims import as_list, tensor
from .ops_tensor import OPS, op

__all__ = ["make_layer", "LAYER_OPS"]

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM")


def _spatial_pads(node, x: torch.Tensor, kernel: list, strides: list, dilations: list) -> list[tuple]:
    """(begin, end) per spatial dim, auto_pad resolved against the input's size."""
    n = len(kernel)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(n):
            size = x.shape[2 + i]
            total = max((-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * n
    pads = node.attrs.get("pads") or [0] * (2 * n)
    return [(pads[i], pads[i + n]) for i in range(n)]


def _geometry(node, kernel_rank: int):
    k = node.attrs.get("kernel_shape")
    strides = node.attrs.get("strides") or [1] * kernel_rank
    dilations = node.attrs.get("dilations") or [1] * kernel_rank
    return k, strides, dilations


def _split_pads(pads: list[tuple]) -> tuple[tuple, list | None]:
    """The padding a torch layer takes (symmetric), and the F.pad list for the rest (or None)."""
    if all(isinstance(b, int) and b == e for b, e in pads):
        return tuple(b for b, _ in pads), None
    flat = []
    for b, e in reversed(pads):
        flat += [b, e]
    return tuple(0 for _ in pads), flat


def _static_pads(node, rank: int):
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return None
    pads = node.attrs.get("pads") or [0] * (2 * rank)
    return [(0, 0)] * rank if auto == "VALID" else [(pads[i], pads[i + rank]) for i in range(rank)]


def make_layer(node, consts: dict[str, torch.Tensor]) -> nn.Module | None:
    """The torch layer for `node` when its weights are constants and torch has the layer, else None."""
    w = consts.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or not w.dtype.is_floating_point:
        return None
    bias = consts.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if len(node.inputs) > 2 and node.inputs[2] and bias is None:
        return None
    if node.op in ("Conv", "ConvTranspose"):
        return _conv_layer(node, w, bias)
    if node.op == "Gemm":
        return _gemm_layer(node, w, bias)
    if node.op == "MatMul" and w.dim() == 2:
        layer = nn.Linear(w.shape[0], w.shape[1], bias=False)
        layer.weight.data = w.T.contiguous().float()
        return layer
    if node.op == "LSTM":
        return _lstm_layer(node, consts)
    return None


def _conv_layer(node, w: torch.Tensor, bias):
    rank = w.dim() - 2
    pads = _static_pads(node, rank)
    if rank not in (1, 2, 3) or pads is None:
        return None
    _, strides, dilations = _geometry(node, rank)
    padding, _ = _split_pads(pads)
    groups = node.attrs.get("group", 1)
    if node.op == "Conv":
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        layer = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(strides), padding=padding,
                    dilation=tuple(dilations), groups=groups, bias=bias is not None)
    else:
        if node.attrs.get("output_shape") or any(b != e for b, e in pads):
            return None
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[rank - 1]
        layer = cls(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=tuple(strides), padding=padding,
                    output_padding=tuple(node.attrs.get("output_padding") or [0] * rank), groups=groups,
                    dilation=tuple(dilations), bias=bias is not None)
    layer.weight.data = w.float().contiguous()
    if bias is not None:
        layer.bias.data = bias.float().reshape(-1).contiguous()
    return layer


def _gemm_layer(node, w: torch.Tensor, c):
    if node.attrs.get("transA", 0) or w.dim() != 2:
        return None
    weight = w if node.attrs.get("transB", 0) else w.T  # (N, K)
    n = weight.shape[0]
    if c is not None and (c.numel() != n or c.dim() > 2):
        return None
    layer = nn.Linear(weight.shape[1], n, bias=c is not None)
    layer.weight.data = (weight * node.attrs.get("alpha", 1.0)).float().contiguous()
    if c is not None:
        layer.bias.data = (c.reshape(-1) * node.attrs.get("beta", 1.0)).float().contiguous()
    return layer


def _lstm_layer(node, consts):
    a = node.attrs
    names = list(node.inputs) + [""] * (8 - len(node.inputs))
    w, r, b = consts.get(names[1]), consts.get(names[2]), consts.get(names[3]) if names[3] else None
    if w is None or r is None or (names[3] and b is None) or names[7] or a.get("clip") or a.get("input_forget", 0) \
            or a.get("layout", 0) or (a.get("activations") and a["activations"] not in (["Sigmoid", "Tanh", "Tanh"] * 2,
                                                                                        ["Sigmoid", "Tanh", "Tanh"])):
        return None
    dirs, h4, size = w.shape
    hidden = h4 // 4
    if a.get("direction", "forward") == "reverse":
        return None
    layer = nn.LSTM(size, hidden, bidirectional=dirs == 2)

    def order(t):  # ONNX gates i, o, f, c -> torch i, f, g(c), o
        i, o, f, c = t.split(hidden, dim=0)
        return torch.cat([i, f, c, o]).float().contiguous()

    for d in range(dirs):
        suffix = "_l0" + ("_reverse" if d else "")
        getattr(layer, "weight_ih" + suffix).data = order(w[d])
        getattr(layer, "weight_hh" + suffix).data = order(r[d])
        bias = b[d] if b is not None else torch.zeros(8 * hidden)
        getattr(layer, "bias_ih" + suffix).data = order(bias[: 4 * hidden])
        getattr(layer, "bias_hh" + suffix).data = order(bias[4 * hidden:])
    return layer


# -- handlers ------------------------------------------------------------------------------------------

def _conv_functional(node, x, w, b, pads, strides, dilations):
    groups = node.attrs.get("group", 1)
    padding, extra = _split_pads(pads)
    if extra:
        x = F.pad(x, extra)
    rank = w.dim() - 2
    if node.op == "Conv":
        fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
        return fn(x, w, b, tuple(strides), padding, tuple(dilations), groups)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    outpad = tuple(node.attrs.get("output_padding") or [0] * rank)
    return fn(x, w, b, tuple(strides), padding, outpad, groups, tuple(dilations))


@op("Conv", "ConvTranspose")
def _conv(m, node, ins):
    x = tensor(ins[0])
    if node.layer:
        layer = getattr(m, node.layer)
        rank = layer.weight.dim() - 2
        k, strides, dilations = list(layer.kernel_size), list(layer.stride), list(layer.dilation)
        _, extra = _split_pads(_spatial_pads(node, x, k, strides, dilations))
        return [layer(F.pad(x, extra) if extra else x)]
    w = tensor(ins[1])
    b = tensor(ins[2]) if len(ins) > 2 else None
    rank = w.dim() - 2
    _, strides, dilations = _geometry(node, rank)
    pads = _spatial_pads(node, x, list(w.shape[2:]), strides, dilations)
    if node.op == "ConvTranspose" and any(p != q for p, q in pads):
        raise NotImplementedError("ConvTranspose with unequal begin / end pads")
    return [_conv_functional(node, x, w, b, pads, strides, dilations)]


@op("Gemm")
def _gemm(m, node, ins):
    a = tensor(ins[0])
    if node.layer:
        return [getattr(m, node.layer)(a)]
    b = tensor(ins[1])
    a = a.T if node.attrs.get("transA", 0) else a
    b = b.T if node.attrs.get("transB", 0) else b
    out = node.attrs.get("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        out = out + node.attrs.get("beta", 1.0) * tensor(ins[2])
    return [out]


@op("MatMul")
def _matmul(m, node, ins):
    a = tensor(ins[0])
    if node.layer:
        return [getattr(m, node.layer)(a)]
    return [torch.matmul(a, tensor(ins[1]))]


@op("LSTM")
def _lstm(m, node, ins):
    layer = getattr(m, node.layer)
    x = tensor(ins[0])  # (seq, batch, input)
    dirs, hidden = 2 if layer.bidirectional else 1, layer.hidden_size
    h0 = tensor(ins[5]) if len(ins) > 5 and ins[5] is not None else x.new_zeros(dirs, x.shape[1], hidden)
    c0 = tensor(ins[6]) if len(ins) > 6 and ins[6] is not None else x.new_zeros(dirs, x.shape[1], hidden)
    y, (h, c) = layer(x, (h0, c0))
    y = y.reshape(y.shape[0], y.shape[1], dirs, hidden).permute(0, 2, 1, 3)  # (seq, dirs, batch, hidden)
    return [y, h, c]


@op("BatchNormalization")
def _batch_norm(m, node, ins):
    x, scale, bias, mean, var = (tensor(v) for v in ins[:5])
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))]


@op("InstanceNormalization")
def _instance_norm(m, node, ins):
    x, scale, bias = (tensor(v) for v in ins[:3])
    return [F.instance_norm(x, weight=scale, bias=bias, eps=node.attrs.get("epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(m, node, ins):
    x = tensor(ins[0])
    axis = node.attrs.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    w = tensor(ins[1])
    b = tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    return [F.layer_norm(x, tuple(x.shape[axis:]), w, b, node.attrs.get("epsilon", 1e-5))]


@op("GroupNormalization")
def _group_norm(m, node, ins):
    x, scale, bias = (tensor(v) for v in ins[:3])
    groups = node.attrs["num_groups"]
    if scale.numel() == groups and x.shape[1] != groups:  # opset 18: per group
        scale = scale.repeat_interleave(x.shape[1] // groups)
        bias = bias.repeat_interleave(x.shape[1] // groups)
    return [F.group_norm(x, groups, scale, bias, node.attrs.get("epsilon", 1e-5))]


@op("MaxPool", "AveragePool", "LpPool")
def _pool(m, node, ins):
    x = tensor(ins[0])
    rank = x.dim() - 2
    k, strides, dilations = _geometry(node, rank)
    pads = _spatial_pads(node, x, k, strides, dilations)
    padding, extra = _split_pads(pads)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if node.op == "MaxPool":
        if extra:
            x = F.pad(x, extra, value=-math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return [fn(x, tuple(k), tuple(strides), padding, tuple(dilations), ceil_mode=ceil)]
    include = bool(node.attrs.get("count_include_pad", 0))
    if extra:
        if not include and any(extra):
            raise NotImplementedError("AveragePool with unequal pads and count_include_pad=0")
        x = F.pad(x, extra)
    if node.op == "LpPool":
        p = node.attrs.get("p", 2)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return [(fn(x.abs() ** p, tuple(k), tuple(strides), padding, ceil, True) * math.prod(k)) ** (1 / p)]
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return [fn(x, tuple(k), tuple(strides), padding, ceil, include)]


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(m, node, ins):
    x = tensor(ins[0])
    dims = tuple(range(2, x.dim()))
    return [x.mean(dims, keepdim=True) if node.op == "GlobalAveragePool" else x.amax(dims, keepdim=True)]


@op("Pad")
def _pad(m, node, ins):
    x = tensor(ins[0])
    pads = as_list(ins[1]) if len(ins) > 1 and ins[1] is not None else node.attrs["pads"]
    value = tensor(ins[2]) if len(ins) > 2 and ins[2] is not None else node.attrs.get("value", 0.0)
    value = value.reshape(-1)[0].item() if isinstance(value, torch.Tensor) and value.numel() else (0.0 if isinstance(value, torch.Tensor) else value)
    axes = as_list(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    n = len(axes)
    full = [(0, 0)] * x.dim()
    for i, a in enumerate(axes):
        full[a + x.dim() if a < 0 else a] = (pads[i], pads[i + n])
    while full and full[0] == (0, 0):  # F.pad lists the last dims first; reflect / replicate pad only the trailing ones
        full = full[1:]
    flat = []
    for b, e in reversed(full):
        flat += [b, e]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[node.attrs.get("mode", "constant")]
    return [F.pad(x, flat, mode=mode, value=value) if mode == "constant" else F.pad(x, flat, mode=mode)]


@op("Resize", "Upsample")
def _resize(m, node, ins):
    x = tensor(ins[0])
    a = node.attrs
    mode = a.get("mode", "nearest")
    scales = sizes = None
    if "_scales" in a:
        scales = a["_scales"]
    elif node.op == "Upsample":
        scales = as_list(tensor(ins[1]).float()) if len(ins) > 1 else a.get("scales")
    else:
        if len(ins) > 2 and ins[2] is not None and tensor(ins[2]).numel():
            scales = tensor(ins[2]).float().tolist()
    if len(ins) > 3 and ins[3] is not None:
        sizes = as_list(ins[3])
    spatial = x.dim() - 2
    transform = a.get("coordinate_transformation_mode", "half_pixel" if node.opset >= 11 else "asymmetric")
    kw = {}
    if sizes is not None:
        kw["size"] = tuple(sizes[2:])
    else:
        if scales[:2] != [1.0, 1.0]:
            raise NotImplementedError("Resize scaling the batch or channel dimension")
        kw["scale_factor"] = tuple(scales[2:])
    if mode == "nearest":
        nearest = a.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and nearest == "floor":
            return [F.interpolate(x, mode="nearest", **kw)]
        if transform in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
            return [F.interpolate(x, mode="nearest-exact", **kw)]
        raise NotImplementedError(f"Resize nearest with {transform} / {nearest}")
    if mode == "linear" and spatial in (1, 2, 3) and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = ("linear", "bilinear", "trilinear")[spatial - 1]
        return [F.interpolate(x, mode=torch_mode, align_corners=transform == "align_corners", **kw)]
    if mode == "cubic" and spatial == 2 and transform in ("half_pixel", "align_corners") and a.get("cubic_coeff_a", -0.75) == -0.75:
        return [F.interpolate(x, mode="bicubic", align_corners=transform == "align_corners", **kw)]
    raise NotImplementedError(f"Resize mode {mode} with {transform}")

"""Operator fusion (`fuse_ops`): BatchNorm folded into the Conv / Linear before it, and two Linears
with nothing between them merged into one.

Where: torch.fx finds the patterns on the traced graph (a layer whose output only the next one reads,
neither module called twice); a model fx cannot trace falls back to module order inside plain
nn.Sequential containers (a child's output feeds only the next child), with a warning. What: the
arithmetic below, done in float64. How: the layer keeps its name with new values (a bias added
where it had none); the BatchNorm / second Linear becomes nn.Identity, so forward code runs as before.

BN folding (Ioffe & Szegedy 2015; the inference identity every runtime applies):
    s = gamma / sqrt(var + eps);  W' = W * s (per output channel);  b' = (b - mean) * s + beta
Linear merging: B(A(x)) = W_B (W_A x + b_A) + b_B = (W_B W_A) x + (W_B b_A + b_B).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core import data as D
from ..core.registry import Context, register_method
from ..core.layers import WRAP_CHILD, Wrapped
from ..core.select import matches, names_by_module, set_submodule
from .attention import _hf_models, fuse_attention
from .config import FuseOpsConfig, LinearMerge

__all__ = ["fuse_ops", "replay_fuse_ops", "fold_bn", "fold_batchnorms", "merge_linears", "symbolic_trace",
           "BatchNormTail", "bypass_bn"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}
_PLAIN_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormTail(nn.Module):
    """What is left of a BatchNorm that also runs its children after normalising (timm's BatchNormAct2d:
    batch_norm, then `drop`, then `act`) once its normalisation is folded into the layer before it: those
    children, in order, under the same names (so their parameters keep their state-dict keys)."""

    def __init__(self, children: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


def _probe_shape(bn: nn.modules.batchnorm._BatchNorm) -> tuple[int, ...]:
    dims = 2 if isinstance(bn, nn.BatchNorm2d) else 3 if isinstance(bn, nn.BatchNorm3d) else 0
    return (2, bn.num_features, *([3] * dims))


def bn_remainder(bn: nn.modules.batchnorm._BatchNorm) -> tuple[nn.Module | None, str | None]:
    """(what replaces `bn` once folded, why not): nn.Identity for a torch BatchNorm; for a subclass with
    its own forward, a BatchNormTail of its children when its forward is found, on a probe input in eval
    mode, to be exactly batch_norm followed by its children in order (timm's BatchNormAct2d)."""
    if type(bn) in _PLAIN_BNS or type(bn).forward is nn.modules.batchnorm._BatchNorm.forward:
        return nn.Identity(), None
    probe = copy.deepcopy(bn).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_probe_shape(bn), generator=g)
    try:
        with torch.no_grad():
            want = probe(x)
            plain = torch.nn.functional.batch_norm(x, probe.running_mean, probe.running_var, probe.weight, probe.bias,
                                                   False, 0.0, probe.eps)
            got = BatchNormTail(dict(probe.named_children()))(plain)
    except Exception as exc:  # noqa: BLE001  a forward that fails on the probe is a reason, not a crash
        return None, f"{type(bn).__name__}'s forward did not run on a probe input ({type(exc).__name__})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(want, got, atol=1e-6, rtol=1e-5):
        return None, (f"{type(bn).__name__}'s forward does more than normalise and then run its children "
                      f"({', '.join(n for n, _ in bn.named_children()) or 'none'}); kept")
    return BatchNormTail(dict(bn.named_children())), None


def bypass_bn(model: nn.Module, entry: dict[str, Any]) -> None:
    """A folded BatchNorm's place IN PLACE: nn.Identity, or its children (`entry["tail"]`) for a BatchNorm
    that runs an activation after normalising (replays build it from the base model, without probing)."""
    bn = model.get_submodule(entry["bn"])
    set_submodule(model, entry["bn"], BatchNormTail(dict(bn.named_children())) if entry.get("tail") else nn.Identity())


def fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold `bn` (eval statistics) into `layer` IN PLACE; `bn` must then be bypassed."""
    w = layer.weight.detach().double()  # (out, in/groups, *k) or (out, in)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # (out,)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    dtype = layer.weight.dtype
    layer.weight.data = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(dtype)
    new_bias = ((bias - mean) * scale + beta).to(dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.data = new_bias


def merge_linears(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """One Linear computing second(first(x))."""
    wa, wb = first.weight.detach().double(), second.weight.detach().double()  # (mid, in), (out, mid)
    bias = None
    if first.bias is not None:
        bias = wb @ first.bias.detach().double()
    if second.bias is not None:
        bias = second.bias.detach().double() if bias is None else bias + second.bias.detach().double()
    merged = nn.Linear(first.in_features, second.out_features, bias=bias is not None, dtype=first.weight.dtype)
    merged.weight.data = (wb @ wa).to(first.weight.dtype)
    if bias is not None:
        merged.bias.data = bias.to(first.weight.dtype)
    return merged


def _add_bias(layer: nn.Module) -> None:
    if layer.bias is None:
        out = layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype))


def replay_fuse_ops(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the fused structure: biases where folding added them, Identity for folded BNs and
    second Linears, merged Linears of the recorded shape."""
    for entry in replay["bn"]:
        _add_bias(model.get_submodule(entry["layer"]))
        bypass_bn(model, entry)
    for name in replay.get("attention", []):
        fuse_attention(model.get_submodule(name) if name else model, check=False)
    for entry in replay["linear"]:
        first = model.get_submodule(entry["first"])
        set_submodule(model, entry["first"], nn.Linear(entry["in"], entry["out"], bias=entry["bias"], dtype=first.weight.dtype))
        set_submodule(model, entry["second"], nn.Identity())
    return model


# ------------------------------------------------------------------------------------------------
# Finding the patterns
# ------------------------------------------------------------------------------------------------
def _as_layer(modules: dict[str, nn.Module], name: str) -> tuple[str, nn.Module | None]:
    """A wrapped module (core/layers.py) whose forward returns its weight call's output stands for
    its `compute` layer: a BatchNorm after it folds into that layer."""
    module = modules.get(name)
    if isinstance(module, Wrapped) and module.call.get("returns"):
        return f"{name}.{WRAP_CHILD}", module.compute
    return name, module


class _Tracer(fx.Tracer):
    """torch.fx's tracer with wrapped modules as leaves (their forward routes a call through a mode)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # BatchNorm subclasses (timm's BatchNormAct2d) too: one node a layer's output feeds, to fold into it
        return isinstance(m, (Wrapped, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _Tracer().trace(model))


def _pairs_fx(model: nn.Module, gm: fx.GraphModule, first_kinds, second_kinds, through_identity: bool = False):
    """(first name, second name) where the second module's only input is the first's output, read by
    nothing else (nn.Identity modules in between are looked through when `through_identity`)."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) not in second_kinds:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        while (through_identity and prev.op == "call_module" and type(modules.get(prev.target)) is nn.Identity
               and len(prev.users) == 1 and len(prev.args) == 1 and isinstance(prev.args[0], fx.Node)):
            prev = prev.args[0]
        if prev.op != "call_module" or type(_as_layer(modules, prev.target)[1]) not in first_kinds:
            continue
        # the chain from prev to node must have no other reader
        chain_ok, n = True, prev
        while n is not node:
            if len(n.users) != 1:
                chain_ok = False
                break
            n = next(iter(n.users))
        if chain_ok and calls[prev.target] == 1 and calls[node.target] == 1:
            out.append((_as_layer(modules, prev.target)[0], node.target))
    return out


# `.padding`: a string padding ("same", "valid": Hugging Face EfficientNet's convs)
_CAPTURED_LAYERS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default",
                    "aten.convolution.default", "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")


def _pairs_export(model: nn.Module, ctx: Context, first_kinds, second_kinds) -> list[tuple[str, str]] | None:
    """(layer, BatchNorm) pairs from a torch.export capture on one example (None without an example or
    when the capture fails): the BatchNorm's input is the layer's output and nothing else reads it; both
    modules are found by the graph's module stack and must each run once."""
    example = ctx.example_inputs if ctx.example_inputs is not None else (
        next(D.batches(ctx.data)) if ctx.data is not None else None)
    if example is None:
        return None
    (args, kwargs), _ = D.split(example)
    try:
        with torch.no_grad():
            graph = torch.export.export(model, tuple(args), kwargs or None, strict=False).graph
    except Exception:  # noqa: BLE001  any capture failure: the caller falls back to nn.Sequential order
        return None
    modules = dict(model.named_modules())

    def owner(node) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        return list(stack.values())[-1][0] if stack else None

    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in _CAPTURED_LAYERS and (name := owner(node)):
            calls[name] = calls.get(name, 0) + 1
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target) or not node.args:
            continue
        src, bn_name = node.args[0], owner(node)
        layer_name = owner(src) if getattr(src, "op", None) == "call_function" else None
        if (layer_name is None or bn_name is None or str(src.target) not in _CAPTURED_LAYERS or len(src.users) != 1
                or calls.get(layer_name) != 1 or type(modules.get(layer_name)) not in first_kinds
                or type(modules.get(bn_name)) not in second_kinds):
            continue
        out.append((layer_name, bn_name))
    return out


def _pairs_sequential(model: nn.Module, first_kinds, second_kinds, through_identity: bool):
    out = []
    for pname, parent in model.named_modules():
        if type(parent) is not nn.Sequential:  # a subclass may route its children differently
            continue
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            layer_name, layer = _as_layer(dict(children), name)
            if type(layer) not in first_kinds:
                continue
            j = i + 1
            while through_identity and j < len(children) and type(children[j][1]) is nn.Identity:
                j += 1
            if j < len(children) and type(children[j][1]) in second_kinds:
                prefix = f"{pname}." if pname else ""
                out.append((prefix + layer_name, prefix + children[j][0]))
    return out


def try_trace(model: nn.Module, ctx: Context) -> fx.GraphModule | None:
    try:
        return symbolic_trace(model)
    except Exception as exc:  # any tracing failure: torch.export on an example, else module order
        if ctx.example_inputs is None and ctx.data is None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            ctx.warn(f"fuse_ops: torch.fx cannot trace {type(model).__name__} ({first[:120]}) and there is no example "
                     "to capture it with torch.export; only layers that follow each other inside nn.Sequential "
                     "containers are fused (pass example_inputs or data)")
        return None


def _linear_output_dims(model: nn.Module, names: list[str], ctx: Context) -> dict[str, int]:
    """Number of dimensions of each named Linear's output on one example batch (BN1d after a Linear
    normalises the Linear's features only when that output is (N, C))."""
    example = ctx.example_inputs if ctx.example_inputs is not None else (
        next(D.batches(ctx.data)) if ctx.data is not None else None)
    if example is None or not names:
        return {}
    dims, hooks = {}, []
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: dims.__setitem__(name, o.dim())))
    try:
        with torch.no_grad():
            D.forward(model, D.split(example)[0])
    finally:
        for h in hooks:
            h.remove()
    return dims


def fold_batchnorms(model: nn.Module, gm: fx.GraphModule | None, ctx: Context, ok=lambda *names: True,
                    skip: list[str] = ()) -> list[dict[str, str]]:
    """Fold every BatchNorm that directly follows a Conv / Linear into it, IN PLACE (the BN becomes
    nn.Identity); returns the replay entries [{layer, bn}]. `gm`: the traced model, or None to look
    inside nn.Sequential only. `ok(layer, bn)`: whether the pair may be fused."""
    entries: list[dict[str, str]] = []
    kinds = (*CONVS, nn.Linear)
    # torch's BatchNorms and their subclasses in this model (timm's BatchNormAct2d: checked per module below)
    bn_kinds = (*_PLAIN_BNS, *{type(m) for m in model.modules() if isinstance(m, _PLAIN_BNS)})
    if gm is not None:
        pairs = _pairs_fx(model, gm, kinds, bn_kinds)
    else:  # torch.fx cannot trace it (most Hugging Face models): torch.export on an example can
        pairs = _pairs_export(model, ctx, kinds, bn_kinds)
        if pairs is None:
            pairs = _pairs_sequential(model, kinds, bn_kinds, False)
    linear_dims = _linear_output_dims(model, [a for a, _ in pairs if isinstance(model.get_submodule(a), nn.Linear)], ctx)
    folded = set()
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        why, remainder = None, None
        if not ok(layer_name, bn_name):
            why = "skipped by the config or shared by several names"
        elif not isinstance(bn, BNS[type(layer)]) or bn.num_features != layer.weight.shape[0]:
            why = f"{type(bn).__name__}({bn.num_features}) does not normalise the output channels of {type(layer).__name__}"
        elif not bn.track_running_stats or bn.running_mean is None:
            why = "the BatchNorm keeps no running statistics (it normalises with batch statistics)"
        elif isinstance(layer, nn.Linear) and linear_dims.get(layer_name) != 2:
            why = ("a BatchNorm1d after a Linear folds only on (N, C) outputs; pass data or example_inputs so the "
                   "shape can be checked" if layer_name not in linear_dims else "the Linear's output is not (N, C)")
        else:
            remainder, why = bn_remainder(bn)
        if why:
            if not matches(layer_name, skip) and not matches(bn_name, skip):
                ctx.warn(f"fuse_ops: {bn_name} not folded into {layer_name}: {why}")
            continue
        entry = {"layer": layer_name, "bn": bn_name}
        if isinstance(remainder, BatchNormTail):
            entry["tail"] = True  # the activation it ran after normalising stays, under the BatchNorm's name
        entries.append(entry)
        fold_bn(layer, bn)
        set_submodule(model, bn_name, remainder)
        folded.add(bn_name)
    if gm is not None:
        modules = dict(model.named_modules())
        for node in gm.graph.nodes:
            if (node.op == "call_module" and node.target not in folded and isinstance(modules.get(node.target), bn_kinds)
                    and not any(node.target == b for _, b in pairs) and not matches(node.target, skip)):
                ctx.warn(f"fuse_ops: {node.target} ({type(modules[node.target]).__name__}) does not directly follow "
                         f"a Conv or Linear whose output only it reads; kept")

    return entries


@register_method("fuse_ops", FuseOpsConfig, replay=replay_fuse_ops)
def fuse_ops(model: nn.Module, cfg: FuseOpsConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Fold BatchNorms into the Conv/Linear before them and merge consecutive Linears, on a copy."""
    model = copy.deepcopy(model).eval()
    shared = {n for names in names_by_module(model).values() if len(names) > 1 for n in names}
    ok = lambda *names: not any(n in shared or matches(n, cfg.skip) for n in names)  # noqa: E731
    replay: dict[str, Any] = {"bn": [], "linear": [], "attention": []}
    if cfg.attention:
        example = ctx.example_inputs if ctx.example_inputs is not None else (
            next(D.batches(ctx.data)) if ctx.data is not None else None)
        replay["attention"] = fuse_attention(model, example, warn=ctx.warn)  # checked on the example; refusals warned
        if not replay["attention"] and not _hf_models(model):  # refused ones were warned with their reasons
            ctx.warn("fuse_ops: attention: no Hugging Face encoder in the model (transformers' PreTrainedModel "
                     "with bidirectional attention); its attention is left as it is")
    gm = try_trace(model, ctx) if cfg.bn or cfg.linear != LinearMerge.NEVER else None

    if cfg.bn:
        replay["bn"] = fold_batchnorms(model, gm, ctx, ok, cfg.skip)

    if cfg.linear != LinearMerge.NEVER:
        traced = gm is not None
        refused: set[tuple[str, str]] = set()
        while True:  # a chain of Linears merges pair by pair until none is left
            gm = symbolic_trace(model) if traced else None  # folded BNs and merged Linears are Identity now
            pairs = (_pairs_fx(model, gm, (nn.Linear,), (nn.Linear,), True) if traced
                     else _pairs_sequential(model, (nn.Linear,), (nn.Linear,), True))
            pairs = [p for p in pairs if p not in refused and ok(*p)]
            if not pairs:
                break
            a_name, b_name = pairs[0]
            a, b = model.get_submodule(a_name), model.get_submodule(b_name)
            pair_weights = a.weight.numel() + b.weight.numel()
            merged_weights = a.in_features * b.out_features
            if cfg.linear == LinearMerge.SMALLER and merged_weights > pair_weights:
                ctx.warn(f"fuse_ops: {a_name} and {b_name} not merged: the product would have {merged_weights:,} "
                         f"weights against their {pair_weights:,} (a low-rank pair); set linear: always to merge anyway")
                refused.add((a_name, b_name))
                continue
            merged = merge_linears(a, b)
            set_submodule(model, a_name, merged)
            set_submodule(model, b_name, nn.Identity())
            replay["linear"].append({"first": a_name, "second": b_name, "in": merged.in_features,
                                     "out": merged.out_features, "bias": merged.bias is not None})
    if not replay["bn"] and not replay["linear"] and not replay["attention"]:
        ctx.warn("fuse_ops: nothing to fuse (no BatchNorm after a Conv/Linear, no pair of Linears); the model is unchanged")
    return model, replay

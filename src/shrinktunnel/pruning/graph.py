"""Where: which channels are tied together across layers (the dependency groups).

The analysis is Torch-Pruning's DependencyGraph (Fang et al. 2023, "DepGraph: Towards Any Structural
Pruning"): it traces one forward pass through autograd, so it sees every op the model runs (residual
additions, torch.cat / split, views and flattens, a module called twice), and maps channel indices
through them. We use only its groups; importance, selection and the rewriting of layers are ours
(importance.py, structured.py, surgery.py), and so is the decision of what is safe to prune:

- a group whose channels reach the model's output is kept (the output shape must not change);
- a group whose channels meet another activation in a matrix product (attention scores) is kept,
  unless it is a BERT-style attention, pruned by whole heads: elsewhere the head layout is unknown,
  and channels taken unevenly from the heads would still run, silently computing something else;
- a group holding a layer kind the surgery table does not know is kept, and reported;
- BERT-style multi-head attention (q/k/v Linears with `num_attention_heads`) is pruned by whole heads.

A group combined with a tensor no layer computes (the model's input in `x + conv(x)`, a buffer) is not
seen by the trace; the method's forward check after rewriting finds it and keeps that group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..errors import ModelError
from .surgery import is_depthwise, supported
from ..core.layers import Wrapped, visible_modules

__all__ = ["Member", "Group", "Heads", "build_groups", "OUTPUT_REASON"]

OUTPUT_REASON = "its channels reach the model's output"


@dataclass
class Member:
    """One layer's share of a group: `idxs[j]` (in the layer's own channel numbering, along `dim`) is
    tied to root channel `root_idxs[j]`. A flatten ties several inputs of a Linear to one root channel."""

    name: str
    module: nn.Module
    dim: str  # "out" | "in"
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class Heads:
    """A BERT-style attention whose q/k/v output channels form this group: pruned by whole heads."""

    module: str  # the attention module (it holds num_attention_heads / all_head_size)
    count: int
    size: int


@dataclass
class Group:
    root: str  # the layer whose output channels define the group
    size: int  # number of root channels
    members: list[Member] = field(default_factory=list)
    blocked: str | None = None  # why the group is kept whole (None: prunable)
    unknown_kind: bool = False  # blocked because of a layer the surgery does not know (reported as skipped)
    chunks: int = 1  # grouped convolutions: the same number of channels must stay in each of `chunks` slices
    heads: Heads | None = None

    @property
    def out_names(self) -> list[str]:
        return [m.name for m in self.members if m.dim == "out"]

    def describe(self) -> str:
        names = sorted({m.name for m in self.members})
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"{self.root} ({self.size} channels{'; ' + shown if shown else ''})"


def _tp():
    try:
        import torch_pruning
    except ImportError:  # only the missing package itself: any other failure is a real error
        raise ModelError("structured pruning needs the torch-pruning package for its dependency graph; "
                         "install it with: pip install --no-deps torch-pruning") from None
    return torch_pruning


_PRODUCTS = ("Bmm", "Mm", "Matmul", "ScaledDotProduct", "_ScaledDotProduct", "Einsum", "Baddbmm")  # autograd Node.name() prefixes


def _is_activation_product(grad_fn) -> bool:
    """A matrix product of two activations (q @ k^T, att @ v), not one inside a layer: a Linear on 3-D
    inputs runs an (add)mm whose other operand is the layer's weight, a leaf reached in one or two steps."""
    if grad_fn is None or not grad_fn.name().startswith(_PRODUCTS):
        return False

    def reaches_leaf(fn, depth: int) -> bool:
        if fn is None:
            return False
        if fn.name().endswith("AccumulateGrad"):  # torch::autograd::AccumulateGrad
            return True
        return depth > 0 and any(reaches_leaf(f, depth - 1) for f, _ in getattr(fn, "next_functions", ()))

    return not any(reaches_leaf(f, 1) for f, _ in grad_fn.next_functions)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def build_groups(model: nn.Module, example: Any) -> list[Group]:
    """The dependency groups of `model` (changed in nothing), traced on one example batch."""
    tp = _tp()
    inputs, _ = D.split(example)
    modules = {n: m for n, m in visible_modules(model) if n}
    names = {id(m): n for n, m in modules.items()}
    # Autograd records the graph only for tensors that need gradients: frozen weights would hide it.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    was_training = model.training
    outputs: list[torch.Tensor] = []

    def forward(m: nn.Module, x: D.Inputs) -> Any:
        # The output tensors only: Torch-Pruning cannot walk a model's own output types (a Hugging Face
        # decoder's cache object inside its ModelOutput raised "'tuple' object has no attribute 'grad_fn'").
        tensors = _tensors(D.forward(m, x))
        outputs.extend(tensors)
        return tuple(tensors)

    try:
        with torch.enable_grad():
            # A wrapped module's `inner` returns its `compute` layer's output: tracing must see the layer.
            inners = [m.inner for m in model.modules() if isinstance(m, Wrapped)]
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=forward, verbose=False,
                                                       ignored_layers=inners or None)
            raw_groups, stuck = _all_groups(dg, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding), tp)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001  (the trace runs the user's forward: anything can fail there)
        raise ModelError(f"prune_channels: tracing the model's forward for its channel dependencies failed: "
                         f"{type(exc).__name__}: {exc}; check that example_inputs (or the first batch) runs the model") from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    # Layers whose own output is a model output (TP adds an output node only after a functional op).
    out_fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
    at_output = {id(node.module) for node in dg.module2node.values() if node.grad_fn in out_fns}
    groups = [_convert(g, dg, names, modules, at_output, tp) for g in raw_groups]
    groups += [Group(root=names[id(m)], size=size, blocked=NO_CONVERGENCE) for m, size in stuck if id(m) in names]
    return [g for g in groups if g is not None]


NO_CONVERGENCE = ("Torch-Pruning's dependency search did not converge from this layer (its channel indices keep "
                  "changing around a cycle of the graph, as rotary embeddings' rotate_half with grouped-query "
                  "attention does); kept whole")


def _all_groups(dg, root_types: tuple, tp, limit: int | None = None) -> tuple[list, list[tuple[nn.Module, int]]]:
    """Torch-Pruning's `get_all_groups`, one root at a time, with a bound on each group's size: on some
    graphs (a Llama attention: rotate_half's cat of negated halves after a GQA expand) its fix-point search
    adds new (layer, indices) pairs forever, each slower than the last. A root whose group passes the bound
    is returned in `stuck` with its channel count, kept whole, instead of hanging the method."""
    from torch_pruning.dependency import group as tp_group

    limit = limit or max(2000, 20 * len(dg.module2node))
    original_add = tp_group.Group.add_dep

    class _TooLarge(Exception):
        pass

    def bounded_add(group, dep, idxs):
        if len(group._group) >= limit:
            raise _TooLarge
        return original_add(group, dep, idxs)

    groups, stuck, visited = [], [], set()
    tp_group.Group.add_dep = bounded_add  # restored below: the bound lives only for this call
    try:
        for module in list(dg.module2node):
            if module in dg.IGNORED_LAYERS_IN_TRACING or not isinstance(module, root_types) or module in visited:
                continue
            pruner = dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            channels = pruner.get_out_channels(module)
            try:
                group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
            except _TooLarge:
                stuck.append((module, channels))
                visited.add(module)
                continue
            prunable = True
            for dep, _ in group:
                if dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(dep.target.module)
                    prunable = prunable and dep.target.module not in dg.IGNORED_LAYERS_IN_TRACING
            if prunable:
                groups.append(group)
    finally:
        tp_group.Group.add_dep = original_add
    return groups, stuck


def _convert(raw, dg, names: dict[int, str], modules: dict[str, nn.Module], at_output: set[int], tp) -> Group | None:
    ops = tp.ops
    root_module = raw[0].dep.target.module
    root = names.get(id(root_module))
    if root is None:
        return None
    group = Group(root=root, size=len(raw[0].idxs))
    reasons: list[str] = []
    products: list[str] = []
    for item in raw:
        target = item.dep.target
        module = target.module
        idxs, root_idxs = [int(i) for i in item.idxs], [int(i) for i in item.root_idxs]
        if target.type == ops.OPTYPE.OUTPUT:
            reasons.append(OUTPUT_REASON)
            continue
        if target.type == ops.OPTYPE.PARAMETER:
            pname = dg._param_to_name.get(module, "a parameter")
            owner = pname.rpartition(".")[0] or "the model"
            reasons.append(f"it reaches parameter {pname!r}, used directly by {owner}, a layer kind the surgery does not know")
            group.unknown_kind = True
            continue
        if isinstance(module, ops._ElementWiseOp) and _is_activation_product(target.grad_fn):
            products.append(str(module._grad_fn))
            continue
        name = names.get(id(module))
        if name is None:
            continue  # a functional op (add, cat, view...): nothing to rewrite
        if not supported(module):
            reasons.append(f"{name} is a {type(module).__name__}, a layer kind the surgery does not know")
            group.unknown_kind = True
            continue
        dim = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        if id(module) in at_output and (dim == "out" or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))):
            reasons.append(OUTPUT_REASON)
            continue
        if is_depthwise(module):
            # A depthwise conv's input and output channels are one: both shrink together.
            group.members += [Member(name, module, "out", idxs, root_idxs), Member(name, module, "in", idxs, root_idxs)]
            continue
        group.members.append(Member(name, module, dim, idxs, root_idxs))
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            if sorted(idxs) != sorted(set(root_idxs)) or idxs != root_idxs:
                reasons.append(f"{name} is a grouped convolution reached through a concatenation or split")
            group.chunks = math.lcm(group.chunks, module.groups)
    if group.chunks > 1 and group.size % group.chunks:
        reasons.append(f"its {group.size} channels do not split evenly into the {group.chunks} groups of its grouped convolutions")
    group.heads = _heads(group, modules, reasons)
    if products and group.heads is None:
        reasons.append(f"its channels meet another activation in a matrix product ({products[0]}: attention); "
                       f"only BERT-style attention (query/key/value Linears and num_attention_heads) is pruned, "
                       f"by whole heads")
    if reasons:
        group.blocked = "; ".join(dict.fromkeys(reasons))
    # A layer appears once per dim; Torch-Pruning merges its indices already, so duplicates are exact.
    seen, unique = set(), []
    for m in group.members:
        if (m.name, m.dim) not in seen:
            seen.add((m.name, m.dim))
            unique.append(m)
    group.members = unique
    return group


def _is_bert_attention(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "num_attention_heads", None), int)
            and isinstance(getattr(module, "attention_head_size", None), int)
            and all(isinstance(getattr(module, c, None), nn.Linear) for c in ("query", "key", "value")))


def _heads(group: Group, modules: dict[str, nn.Module], reasons: list[str]) -> Heads | None:
    qkv = [m for m in group.members if m.dim == "out" and m.name.rpartition(".")[2] in ("query", "key", "value")]
    if not qkv:
        return None
    parent = qkv[0].name.rpartition(".")[0]
    owner = modules.get(parent)
    if owner is None or not _is_bert_attention(owner):
        return None
    heads = Heads(parent, owner.num_attention_heads, owner.attention_head_size)
    if group.size != heads.count * heads.size or any(m.idxs != m.root_idxs for m in group.members):
        reasons.append(f"attention {parent}: its q/k/v channels do not map one to one onto {heads.count} heads")
    return heads

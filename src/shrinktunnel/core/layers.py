"""One layer model for every method: find the weights a module computes with by what it does.

Methods work on a small set of canonical layers (`nn.Linear`, `nn.Conv1d/2d/3d`, `nn.Embedding`,
exact classes). Users' models are full of other modules that compute the same thing: subclasses
(timm's `Conv2dSame`, efficientnet_pytorch's `Conv2dStaticSamePadding`, which pad in their own
`forward`), Hugging Face GPT-2's `Conv1D` (a Linear with a transposed weight, run by `torch.addmm`),
custom modules that call `F.linear` / `F.conv2d` on a parameter of their own. `canonicalize` brings
each of them to a canonical layer once, before a method runs, so a layer kind handled here is handled
by every method:

- replaced: the module computes exactly what a canonical layer does (its `forward` is the torch
  base class's, or it is GPT-2's `Conv1D`): an exact canonical copy takes its place, same name.
  `nn.MultiheadAttention` becomes core/mha.py's `Attention`: the same function with q / k / v / out
  as four nn.Linear (its fused op never calls a layer, so nothing could reach its weights).
- wrapped: the module keeps its own `forward`; `Wrapped(inner, compute)` runs it while routing the
  one weight call inside it (`F.conv2d(x, self.weight, ...)`, `torch.addmm(b, x, self.weight)`, ...)
  to `compute`, a canonical layer built from that call's arguments (geometry as the call passes it:
  a `Conv2dSame` calls `F.conv2d` with padding 0 after its own `F.pad`). Methods see `compute`
  under the name `<module>.compute` and replace it as they replace any layer; the padding, reshapes
  and whatever else the module's forward does keep running around it, so the compressed layer's
  outputs are what the module's own forward gives with the compressed weight. The routing is a
  `TorchFunctionMode` entered inside `Wrapped.forward`: torch.export (non-strict) traces through it,
  so ONNX export sees the method's own operators (QDQ, low-rank chain) where the weight call was.
- skipped, with the reason: nothing found the weight's call (a forward that transforms the weight
  first, as weight standardization does), or the call is of a kind no method computes.

This was chosen over `torch.nn.utils.parametrize` because a parametrization can only change the
weight: static activation quantization, dynamic int8 kernels, low-rank chains and channel surgery
need the call itself, and the methods' own layers (with their exports and artifact formats) are reused
unchanged. docs/architecture.md says more.

The canonical record (JSON) goes into each stage's replay, and `restore` redoes it on the rebuilt
base model before the method's own replay, so `st.load` never needs to probe anything.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

__all__ = ["CANONICAL", "Wrapped", "canonicalize", "restore", "eligible_layers", "WRAP_CHILD", "logical_name",
           "visible_modules", "read_for_weight"]

# The layers every method computes with; anything else is brought to one of these.
CANONICAL = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
WRAP_CHILD = "compute"  # the canonical layer inside a Wrapped: `<module>.compute`


_RNN_MATRIX = re.compile(r"\.matrices\.weight_(?:ih|hh|hr)_l\d+(?:_reverse)?$")  # core/recurrent.RecurrentLinears


def read_for_weight(name: str) -> bool:
    """A recurrent matrix held as a Linear (`<rnn>.matrices.weight_ih_l0`): read for its weight, never called,
    so its activations have no range and it is transformed weight-only."""
    return bool(_RNN_MATRIX.search(name))


def logical_name(name: str) -> str:
    """A layer's name as users write it: a wrapped layer's `blocks.0.conv.compute` -> `blocks.0.conv`, a
    recurrent matrix's `encoder.lstm.matrices.weight_ih_l0` -> `encoder.lstm`."""
    suffix = "." + WRAP_CHILD
    if name.endswith(suffix):
        return name[: -len(suffix)]
    return _RNN_MATRIX.sub("", name)


def visible_modules(model: nn.Module):
    """`model.named_modules()` without the `inner` of each Wrapped: that module has no weight of its
    own any more (its `compute` child has it), so no method should see it as a layer. Its children,
    if it has any, stay visible."""
    inner = {id(m.inner) for m in model.modules() if isinstance(m, Wrapped)}
    for name, module in model.named_modules():
        if id(module) not in inner:
            yield name, module


# ------------------------------------------------------------------------------------------------
# The call a module makes with its weight
# ------------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One weight call seen inside a module's forward: which op, whether it passed the module's own
    bias, and the geometry it passed (convs)."""

    op: str  # "linear" | "addmm" | "matmul" | "conv1d" | "conv2d" | "conv3d" | "embedding"
    bias: bool  # the call passed the module's own `bias` parameter
    geometry: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "bias": self.bias, "geometry": self.geometry}


def _norm_tuple(v: Any, n: int) -> list[int] | str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return [v] * n
    return [int(x) for x in v]


def _conv_call(func, args, kwargs) -> tuple[torch.Tensor, dict[str, Any]]:
    """(input, geometry) of an F.convNd call, with the positional / keyword defaults torch uses."""
    n = _CONV_FUNCS[func]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    geometry = {
        "stride": _norm_tuple(bound.get("stride", 1), n),
        "padding": _norm_tuple(bound.get("padding", 0), n),
        "dilation": _norm_tuple(bound.get("dilation", 1), n),
        "groups": int(bound.get("groups", 1)),
    }
    return bound["input"], geometry


def _match(func, args, kwargs, weight: torch.Tensor, bias: torch.Tensor | None):
    """(Call, input tensor) when this torch function call computes with `weight`, else None."""
    kwargs = kwargs or {}
    if func in _CONV_FUNCS:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if w is not weight:
            return None
        x, geometry = _conv_call(func, args, kwargs)
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return Call(f"conv{_CONV_FUNCS[func]}d", b is not None and b is bias, geometry), x
    if func is F.linear:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if w is not weight:
            return None
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return Call("linear", b is not None and b is bias, {}), args[0]
    if func is torch.addmm:
        # GPT-2's Conv1D: addmm(bias, x.view(-1, nx), weight) with weight (nx, nf); beta = alpha = 1.
        if len(args) < 3 or args[2] is not weight or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            return None
        return Call("addmm", args[0] is bias and bias is not None, {}), args[1]
    if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
        if len(args) < 2 or args[1] is not weight:
            return None
        return Call("matmul", False, {}), args[0]
    if func is F.embedding:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if w is not weight:
            return None
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
        if (args[3] if len(args) > 3 else kwargs.get("max_norm")) is not None:
            return None  # renormalises rows in place: not a plain lookup
        return Call("embedding", False, {"padding_idx": padding_idx}), args[0]
    return None


class _Spy(TorchFunctionMode):
    """Records the weight calls a forward makes (probing)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.calls: list[tuple[Call, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        found = _match(func, args, kwargs, self.weight, self.bias)
        out = func(*args, **(kwargs or {}))
        if found is not None:
            self.calls.append((found[0], out))
        return out


def _probe_inputs(module: nn.Module, weight: torch.Tensor) -> list[torch.Tensor]:
    """Small inputs a layer computing with `weight` would accept, most likely first."""
    if isinstance(module, nn.Embedding) or weight.dim() == 2 and isinstance(getattr(module, "num_embeddings", None), int):
        return [torch.tensor([[0, 1]])]
    if weight.dim() == 2:
        a, b = weight.shape
        return [torch.randn(2, b, dtype=weight.dtype), torch.randn(2, a, dtype=weight.dtype)]
    n = weight.dim() - 2
    k = max(weight.shape[2:])
    size = 2 * k + 7
    chans = [getattr(module, "in_channels", None), weight.shape[1]]
    return [torch.randn(1, c, *[size] * n, dtype=weight.dtype) for c in dict.fromkeys(c for c in chans if c)]


def probe(module: nn.Module) -> tuple[Call | None, str | None, bool]:
    """(the weight call, why not, whether the forward returns that call's output) for one module."""
    module = copy.deepcopy(module).eval()  # a user's forward may keep state: probe a copy
    weight = module.weight
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    errors = []
    for x in _probe_inputs(module, weight):
        spy = _Spy(weight, bias)
        try:
            with torch.no_grad(), spy:
                out = module(x)
        except Exception as exc:  # noqa: BLE001  any failure of a user's forward is a reason, not a crash
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        if not spy.calls:
            return None, ("its forward does not pass its weight to a linear / conv / embedding call as it is "
                          "(it transforms the weight first, e.g. weight standardization)"), False
        if len(spy.calls) > 1:
            return None, f"its forward uses its weight in {len(spy.calls)} calls", False
        call, op_out = spy.calls[0]
        return call, None, isinstance(out, torch.Tensor) and out is op_out
    return None, f"its forward did not run on a probe input ({errors[-1] if errors else 'no input shape to try'})", False


# ------------------------------------------------------------------------------------------------
# Canonical layers built from a call
# ------------------------------------------------------------------------------------------------
def _layer_for_call(call: dict[str, Any], shape: list[int], bias: bool, dtype: torch.dtype) -> nn.Module:
    """An empty canonical layer computing `call` with a weight of the module's `shape`."""
    op, g = call["op"], call["geometry"]
    if op == "linear":
        out, inp = shape
        return nn.Linear(inp, out, bias=bias, dtype=dtype)
    if op in ("addmm", "matmul"):  # weight stored (in, out): x @ W
        inp, out = shape
        return nn.Linear(inp, out, bias=bias, dtype=dtype)
    if op == "embedding":
        return nn.Embedding(shape[0], shape[1], padding_idx=g.get("padding_idx"), dtype=dtype)
    n = int(op[4])
    out, in_per_group, *k = shape
    return _CONVS[n](in_per_group * g["groups"], out, k, stride=g["stride"], padding=g["padding"],
                     dilation=g["dilation"], groups=g["groups"], bias=bias, dtype=dtype)


def _transposed(op: str) -> bool:
    return op in ("addmm", "matmul")


class _Route(TorchFunctionMode):
    """Sends the wrapped module's weight call to the canonical layer."""

    def __init__(self, owner: "Wrapped") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        inner = self.owner.inner
        found = _match(func, args, kwargs, inner.weight, getattr(inner, "bias", None))
        if found is None:
            return func(*args, **(kwargs or {}))
        call, x = found
        if call.op.startswith("conv") and call.geometry != self.owner.call["geometry"]:
            raise RuntimeError(f"{type(inner).__name__}: its forward called {call.op} with {call.geometry}, not the "
                               f"geometry it was compressed with ({self.owner.call['geometry']})")
        y = self.owner.compute(x)
        if not self.owner.call["bias"] and call.bias:
            raise RuntimeError(f"{type(inner).__name__}: its forward passed a bias it did not pass when probed")
        return y


class Wrapped(nn.Module):
    """A module that keeps its own forward while its one weight call runs in `compute`, a canonical
    layer (see the module docstring). `inner` holds the module without its weight (and without its
    bias when the call passes it): zero-stride placeholders of the same shape and dtype stand in, so
    code reading `self.weight.shape` still works and nothing is stored twice."""

    def __init__(self, inner: nn.Module, compute: nn.Module, call: dict[str, Any]) -> None:
        super().__init__()
        self.call = call
        for attr in ("weight", "bias") if call["bias"] else ("weight",):
            t = getattr(inner, attr)
            if attr in inner._parameters:
                del inner._parameters[attr]
            object.__setattr__(inner, attr, torch.zeros((), dtype=t.dtype).expand(t.shape))
        self.inner = inner
        self.compute = compute

    def forward(self, *args, **kwargs):
        with _Route(self):
            return self.inner(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.inner).__name__} computing through {self.call['op']}"


# ------------------------------------------------------------------------------------------------
# Which modules, and the pass
# ------------------------------------------------------------------------------------------------
def _own_weight(module: nn.Module) -> torch.Tensor | None:
    w = module._parameters.get("weight")
    return w if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


def _canonical_base(module: nn.Module) -> type | None:
    for base in CANONICAL:
        if isinstance(module, base):
            return base
    return None


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2, and the models that copy it): addmm with a (in, out) weight."""
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
            and isinstance(getattr(module, "nf", None), int))


def _weight_readers(model: nn.Module) -> set[int]:
    """ids of modules whose parent reads their weight directly (nn.MultiheadAttention reads
    `out_proj.weight` inside its fused op): replacing them would change nothing the parent computes."""
    out = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            out.add(id(m.out_proj))
    return out


def classify(model: nn.Module, recurrent: bool = False) -> dict[str, tuple[str, Any]]:
    """{name: (how, detail)} for every module with a weight that is not already canonical:
    ("replace", kind), ("wrap", (Call, returns)), or ("skip", reason). `recurrent`: exact LSTM / GRU / RNN
    become core/recurrent.RecurrentLinears (their matrices as Linears read for their weight)."""
    from .recurrent_linears import RECURRENT, holds_matrices

    from .mha import unsupported_reason

    readers = _weight_readers(model)
    out: dict[str, tuple[str, Any]] = {}
    rewritten: list[str] = []  # modules replaced whole: their children are rebuilt with them
    for name, module in visible_modules(model):
        if not name or isinstance(module, Wrapped) or type(module) in CANONICAL:
            continue
        if any(name.startswith(r + ".") for r in rewritten):
            continue
        if recurrent and type(module) in RECURRENT and holds_matrices(module):
            out[name] = ("replace", "rnn")
            rewritten.append(name)
            continue
        if isinstance(module, nn.MultiheadAttention):
            why = unsupported_reason(module)
            out[name] = ("skip", why) if why else ("replace", "mha")
            if not why:
                rewritten.append(name)
            continue
        base = _canonical_base(module)
        if base is not None and parametrize.is_parametrized(module, "weight") and _inherits_forward(module, base):
            # weight_norm / spectral_norm style reparametrizations: at inference the layer computes with the
            # weight they produce, so an exact canonical copy holds that weight (wav2vec2's positional conv).
            out[name] = ("replace", base.__name__)
            rewritten.append(name)
            continue
        weight = _own_weight(module)
        if weight is None:
            matrices = [n for n, p in module._parameters.items() if isinstance(p, torch.Tensor) and p.dim() >= 2]
            if matrices:  # LSTM / GRU and the like: weights under other names, computed by fused ops
                out[name] = ("skip", _unreachable_reason(module, matrices))
            continue
        if id(module) in readers:
            out[name] = ("skip", "its parent (nn.MultiheadAttention) reads its weight directly")
            continue
        if _is_hf_conv1d(module):
            out[name] = ("replace", "addmm")
        elif base is not None and type(module).forward is base.forward and _plain_params(module):
            out[name] = ("replace", base.__name__)
        else:
            call, why, returns = probe(module)
            out[name] = ("wrap", (call, returns)) if call is not None else ("skip", why)
    return out


def _unreachable_reason(module: nn.Module, matrices: list[str]) -> str:
    """Why no method reaches a module whose matrices are not a `weight` passed to a layer call."""
    held = f"{', '.join(matrices[:2])}{'...' if len(matrices) > 2 else ''}"
    if isinstance(module, nn.RNNBase):
        return (f"{type(module).__name__} computes with {held} inside one fused op: quantize and cast store it "
                "weight-only, prune, cluster and qat take its matrices as Linears (core/recurrent.py); this method "
                "does neither")
    return (f"{type(module).__name__} reads {held} in its own code (indexed or added, not passed to a linear / conv / "
            "embedding call); no method rewrites it")


def _inherits_forward(module: nn.Module, base: type) -> bool:
    """The module's forward is the torch base class's (a parametrized module's class is a generated subclass)."""
    return next(c for c in type(module).__mro__ if "forward" in c.__dict__) is base


def _plain_params(module: nn.Module) -> bool:
    """Only `weight` and `bias` as parameters: nothing else a subclass could compute with."""
    return set(module._parameters) <= {"weight", "bias"}


def _replacement(module: nn.Module, kind: str) -> nn.Module:
    """An exact canonical copy of `module` (values included)."""
    if kind == "mha":  # nn.MultiheadAttention -> q / k / v / out Linears (core/mha.py)
        from .mha import Attention

        return Attention.from_mha(module)
    if kind == "rnn":  # nn.LSTM / GRU / RNN -> its matrices as Linears (core/recurrent.py)
        from .recurrent_linears import RecurrentLinears

        return RecurrentLinears.from_module(module)
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if kind == "addmm":  # weight (in, out) -> Linear's (out, in)
        new = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, dtype=w.dtype)
        new.weight.data = w.t().contiguous()
    else:
        new = _base_copy(module, kind)
        new.weight.data = w.clone()
    if b is not None:
        new.bias.data = b.clone()
    new.weight.requires_grad_(bool(module.weight.requires_grad))
    new.train(module.training)
    return new


def _base_copy(module: nn.Module, kind: str) -> nn.Module:
    """A canonical `kind` (a torch class name) built from the module's own constructor arguments."""
    bias = getattr(module, "bias", None) is not None
    dtype = module.weight.dtype
    if kind == "Linear":
        return nn.Linear(module.in_features, module.out_features, bias=bias, dtype=dtype)
    if kind == "Embedding":
        return nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                            max_norm=module.max_norm, norm_type=module.norm_type,
                            scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, dtype=dtype)
    return getattr(nn, kind)(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, groups=module.groups, bias=bias,
                             padding_mode=module.padding_mode, dtype=dtype)


def _wrap(module: nn.Module, call: Call, returns: bool) -> Wrapped:
    w = module.weight.detach()
    b = module.bias.detach() if call.bias else None
    compute = _layer_for_call(call.to_dict(), list(w.shape), b is not None, w.dtype)
    compute.weight.data = w.t().contiguous() if _transposed(call.op) else w.clone()
    if b is not None:
        compute.bias.data = b.clone()
    compute.train(module.training)
    # `returns`: the forward returns the call's output as it is (a BatchNorm after it may fold into `compute`).
    wrapped = Wrapped(copy.deepcopy(module), compute, {**call.to_dict(), "returns": bool(returns)})
    wrapped.train(module.training)
    return wrapped


def canonicalize(model: nn.Module, recurrent: bool = False) -> tuple[nn.Module, dict[str, Any], dict[str, str]]:
    """(model, record, skipped): a COPY of `model` with every non-canonical weight layer replaced or
    wrapped (or `model` itself when there is none), the JSON record `restore` replays, and
    {name: reason} of the weight layers no method can reach. `recurrent`: recurrent layers' matrices as
    Linears too (for methods that transform a Linear by its weight alone: `register_method(recurrent=True)`)."""
    from .modtree import set_submodule

    plan = classify(model, recurrent)
    todo = {n: v for n, v in plan.items() if v[0] != "skip"}
    skipped = {n: v[1] for n, v in plan.items() if v[0] == "skip"}
    if not todo:
        return model, {}, skipped
    model = copy.deepcopy(model)  # the record a model carries (core/history) is copied with it
    entries = []
    # Deepest first: a module wrapped after its children were canonicalized carries them along.
    for name, (how, detail) in reversed(list(todo.items())):
        module = model.get_submodule(name)
        if how == "replace":
            set_submodule(model, name, _replacement(module, detail))
            entries.append({"name": name, "replace": detail})
        else:
            call, returns = detail
            set_submodule(model, name, _wrap(module, call, returns))
            entries.append({"name": name, "wrap": call.to_dict(), "returns": returns, "shape": list(module.weight.shape)})
    return model, {"layers": entries}, skipped


def restore(model: nn.Module, record: dict[str, Any] | None) -> nn.Module:
    """Redo a canonical record on the rebuilt base model IN PLACE (shapes only; values come from the
    artifact's tensors)."""
    from .modtree import set_submodule

    for entry in (record or {}).get("layers", []):
        name = entry["name"]
        module = model.get_submodule(name)
        if "replace" in entry:
            set_submodule(model, name, _replacement(module, entry["replace"]))
        else:
            call = Call(entry["wrap"]["op"], entry["wrap"]["bias"], entry["wrap"]["geometry"])
            set_submodule(model, name, _wrap(module, call, entry.get("returns", False)))
    return model


# ------------------------------------------------------------------------------------------------
# What a method can reach
# ------------------------------------------------------------------------------------------------
def eligible_layers(model: nn.Module) -> dict[str, int]:
    """{name: weights} of every canonical weight layer of a canonicalized model (what coverage counts)."""
    out = {}
    for name, module in visible_modules(model):
        if name and type(module) in CANONICAL and isinstance(module.weight, torch.Tensor):
            out[name] = int(module.weight.numel())
    return out

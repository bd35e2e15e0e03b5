"""Network fusion: several models reading the same input become one model with a shared trunk and one
head per task, distilled from every teacher at once (multi-task distillation, as in Clark et al. 2019,
"BAM! Born-Again Multi-Task Networks", with the trunk of the first model as the starting point).

Where the trunk ends: the first model's torch.fx graph is cut after one node (`split`); the cut is
valid when nothing after it reads any earlier value but the split's output. What the heads are: each
model's own layers after the same node, so every model must have the first one's graph (same layers in
the same order; widths may differ, e.g. 10 digit classes and 2 parity classes). How it replays: the
first model's architecture is traced and cut again; each head is a copy of its suffix with the layers
whose shapes differ rebuilt from the recorded constructor arguments.
"""

from __future__ import annotations

import inspect

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..core import data as D
from ..core.history import append_stage, get_record, record_inputs, set_model_ref
from ..core.registry import Context, register_method
from ..core.select import set_submodule
from ..core.train import FitConfig, fit
from ..distillation.config import OutputLoss
from ..distillation.losses import embedding_loss, soft_target_loss
from ..errors import ConfigError, DataError, ModelError
from .config import FuseConfig, FuseOutput

__all__ = ["MultiTaskModel", "fuse_networks", "replay_fuse_networks"]


class MultiTaskModel(nn.Module):
    """A shared trunk and one head per task. Subclassed per input signature (see `_task_class`) so
    that `forward` takes the same named inputs as the fused models (export keys inputs by name)."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module], names: list[str], output: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.task_names = list(names)
        self.output = str(output)

    def _tasks(self, features: Any) -> Any:
        outs = tuple(head(features) for head in self.heads)
        return dict(zip(self.task_names, outs)) if self.output == FuseOutput.DICT else outs


_CLASSES: dict[tuple[tuple[str, bool], ...], type] = {}


def _task_class(params: tuple[tuple[str, bool], ...]) -> type:
    """A MultiTaskModel subclass whose forward(self, x, mask=None) names the trunk's inputs: a generic
    forward that binds its arguments to the trunk's parameter names, with that signature declared
    (`__signature__`), which is what torch.export and the ONNX exporter read the input names from."""
    if params not in _CLASSES:
        names = [n for n, _ in params]
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        signature = inspect.Signature([inspect.Parameter("self", kind)] + [
            inspect.Parameter(n, kind, default=None) if has_default else inspect.Parameter(n, kind) for n, has_default in params])

        def forward(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            return self._tasks(self.trunk(*(bound.arguments[n] for n in names)))

        forward.__signature__ = signature
        _CLASSES[params] = type("MultiTaskModel", (MultiTaskModel,), {"forward": forward, "__module__": __name__})
    return _CLASSES[params]


# ------------------------------------------------------------------------------------------------
# Graph surgery
# ------------------------------------------------------------------------------------------------
def _trace(model: nn.Module, i: int) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure is the same answer for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"fuse: model {i} ({type(model).__name__}) cannot be traced by torch.fx ({first}); fusion "
                         f"cuts the models' graphs into trunk and heads, so their forward must be traceable") from None


def _params(gm: fx.GraphModule) -> tuple[tuple[str, bool], ...]:
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.args and node.args[0] is not None:
                raise ModelError(f"fuse: input {node.target!r} has the default {node.args[0]!r}; only None defaults are supported")
            out.append((str(node.target).lstrip("*"), bool(node.args)))
    return tuple(out)


def _find_split(gm: fx.GraphModule, split: str | None) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if split is None:
        modules = dict(gm.named_modules())
        weighted = [n for n in nodes if n.op == "call_module" and any(True for _ in modules[n.target].parameters())]
        if not weighted:
            raise ModelError("fuse: the first model has no layer with weights to make a head of; give split explicitly")
        last = weighted[-1]
        if len(last.args) != 1 or not isinstance(last.args[0], fx.Node) or last.args[0].op == "placeholder":
            raise ModelError(f"fuse: cannot cut before the last layer {last.target}: give split, the name of the layer whose output ends the trunk")
        return last.args[0]
    for n in nodes:
        if n.name == split or (n.op == "call_module" and n.target == split):
            return n
    inside = [n for n in nodes if n.op == "call_module" and str(n.target).startswith(split + ".")]
    if inside:
        return inside[-1]  # a container: its last layer
    names = [str(n.target) if n.op == "call_module" else n.name for n in nodes]
    raise ConfigError(f"fuse: split {split!r} names no layer of the first model; its layers in order: {', '.join(names)}")


def _cut(gm: fx.GraphModule, split: fx.Node) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(trunk, suffix): the graph up to and including `split`, and the rest reading it as `features`."""
    order = list(gm.graph.nodes)
    pos = order.index(split)
    before = set(order[: pos + 1])
    for node in order[pos + 1:]:
        for arg in node.all_input_nodes:
            if arg in before and arg is not split:
                raise ConfigError(f"fuse: cannot split after {split.name!r}: {node.name!r} after it also reads {arg.name!r} "
                                  f"from before it (a skip connection across the cut); choose a layer no branch crosses")
    trunk_graph, env = fx.Graph(), {}
    for node in order[: pos + 1]:
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output(env[split])
    head_graph, env2 = fx.Graph(), {}
    env2[split] = head_graph.placeholder("features")
    for node in order[pos + 1:]:
        env2[node] = head_graph.node_copy(node, lambda n: env2[n])
    return fx.GraphModule(gm, trunk_graph), fx.GraphModule(gm, head_graph)


def _structure(gm: fx.GraphModule) -> list[tuple]:
    modules = dict(gm.named_modules())
    return [(n.op, n.name, str(n.target), type(modules[n.target]).__name__ if n.op == "call_module" else None)
            for n in gm.graph.nodes]


# Layers whose shape may differ between the first model's head and another's: constructor arguments.
_SPECS = {
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    nn.Conv1d: lambda m: _conv_spec(m), nn.Conv2d: lambda m: _conv_spec(m),
    nn.BatchNorm1d: lambda m: {"num_features": m.num_features, "eps": m.eps, "affine": m.affine},
    nn.BatchNorm2d: lambda m: {"num_features": m.num_features, "eps": m.eps, "affine": m.affine},
    nn.LayerNorm: lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine},
}


def _conv_spec(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _build(kind: str, spec: dict[str, Any]) -> nn.Module:
    cls = {c.__name__: c for c in _SPECS}[kind]
    return cls(**spec)


def _head_overrides(template: fx.GraphModule, own: fx.GraphModule, i: int) -> dict[str, dict[str, Any]]:
    """Constructor arguments of the layers of model i's head whose shapes differ from the first model's."""
    out = {}
    mine = dict(own.named_modules())
    for name, module in template.named_modules():
        other = mine.get(name)
        if other is None or not any(True for _ in module.parameters(recurse=False)):
            continue
        if [p.shape for p in module.parameters(recurse=False)] == [p.shape for p in other.parameters(recurse=False)]:
            continue
        if type(other) not in _SPECS:
            raise ModelError(f"fuse: layer {name} of model {i} ({type(other).__name__}) has other shapes than model 0's, and "
                             f"only {', '.join(c.__name__ for c in _SPECS)} layers may differ in shape between heads")
        out[name] = {"kind": type(other).__name__, "args": _SPECS[type(other)](other)}
    return out


def _assemble(base: nn.Module, split: str | None, overrides: list[dict], names: list[str], output: str) -> tuple[nn.Module, str]:
    gm = _trace(base, 0)
    node = _find_split(gm, split)
    trunk, suffix = _cut(gm, node)
    heads = []
    for spec in overrides:
        head = copy.deepcopy(suffix)
        for name, ms in spec.items():
            set_submodule(head, name, _build(ms["kind"], ms["args"]))
        heads.append(head)
    cls = _task_class(_params(gm))
    return cls(copy.deepcopy(trunk), heads, names, output), node.name


def replay_fuse_networks(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the fused model from the first model's architecture (values come from the artifact)."""
    fused, _ = _assemble(model, replay["split"], replay["heads"], replay["names"], replay["output"])
    return fused.eval()


@register_method("fuse_networks", FuseConfig, replay=replay_fuse_networks)
def fuse_networks_stage(model: nn.Module, cfg: FuseConfig, ctx: Context):
    """Fuse several networks into one with a shared trunk (st.fuse; not a recipe stage)."""
    raise ConfigError("fuse_networks takes several models, so it cannot be a recipe stage: call "
                      "st.fuse([model_a, model_b], st.FuseConfig(...), data=...), then compress the result")


# ------------------------------------------------------------------------------------------------
# st.fuse
# ------------------------------------------------------------------------------------------------
def _outputs(out: Any) -> list[torch.Tensor]:
    values = list(out.values()) if isinstance(out, dict) else list(out)
    return [D.first_tensor(v) for v in values]


def _check_models(models: Any, cfg: FuseConfig) -> list[nn.Module]:
    if not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ConfigError(f"fuse needs a list of two or more models, got {type(models).__name__}"
                          + (f" of {len(models)}" if isinstance(models, (list, tuple)) else ""))
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ModelError(f"fuse: model {i} is a {type(m).__name__}, not a torch.nn.Module")
        if get_record(m)["stages"]:
            raise ModelError(f"fuse: model {i} was already compressed ({', '.join(s['method'] for s in get_record(m)['stages'])}); "
                             "fuse the float models, then compress the fused one")
    for what, value in (("names", cfg.names), ("task_weights", cfg.task_weights)):
        if value is not None and len(value) != len(models):
            raise ConfigError(f"fuse: {what} has {len(value)} entries for {len(models)} models; give one per model")
    return list(models)


def fuse_networks(models: list[nn.Module], cfg: FuseConfig, data: Any, *, progress: bool = True) -> nn.Module:
    """A NEW model with the first model's trunk and one head per model, distilled from all of them."""
    models = _check_models(models, cfg)
    if data is None:
        raise DataError("fuse needs data: batches of the input all the models read (labels are not needed)")
    data = D.reiterable(data)
    teachers = [copy.deepcopy(m).eval() for m in models]  # the callers' models are never touched
    graphs = [_trace(m, i) for i, m in enumerate(teachers)]
    signatures = [_params(g) for g in graphs]
    for i, sig in enumerate(signatures[1:], 1):
        if [n for n, _ in sig] != [n for n, _ in signatures[0]]:
            raise ModelError(f"fuse: the models disagree about the input: model 0 takes ({', '.join(n for n, _ in signatures[0])}) "
                             f"and model {i} takes ({', '.join(n for n, _ in sig)}); fusion needs models that read the same input")
    first = next(D.batches(data))
    inputs, _ = D.split(first)
    reference = None
    for i, t in enumerate(teachers):
        try:
            with torch.no_grad():
                out = D.first_tensor(D.forward(t, inputs))
        except Exception as exc:  # the model rejects the shared input
            raise DataError(f"fuse: the models disagree about the input: model {i} ({type(t).__name__}) fails on the batch "
                            f"({D.describe(inputs)}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                            f"every model must accept the same batches") from None
        if reference is None:
            reference = out.shape[0]
        elif out.shape[0] != reference:
            raise DataError(f"fuse: model {i} returns {out.shape[0]} results for a batch where model 0 returns {reference}; "
                            "the models must read the same examples")

    node = _find_split(graphs[0], cfg.split)
    _, template = _cut(graphs[0], node)
    overrides: list[dict] = []
    own_heads = []
    for i, g in enumerate(graphs):
        if i and _structure(g) != _structure(graphs[0]):
            diff = next((a, b) for a, b in zip(_structure(graphs[0]) + [None] * 999, _structure(g)) if a != b)
            raise ModelError(f"fuse: model {i} is not built like model 0 (first difference: {diff[1]} against {diff[0]}); "
                             f"each head is a model's own layers after the split, so the models must share model 0's graph")
        _, own = _cut(g, next(n for n in g.graph.nodes if n.name == node.name))
        overrides.append(_head_overrides(template, own, i) if i else {})
        own_heads.append(own)

    names = cfg.names or [f"task{i}" for i in range(len(models))]
    fused, split_name = _assemble(teachers[0], node.name, overrides, names, cfg.output)
    for head, own in zip(fused.heads, own_heads):
        head.load_state_dict(own.state_dict())  # each head starts as its own teacher's layers
    try:
        with torch.no_grad():
            _outputs(fused.eval()(*inputs[0], **inputs[1]))
    except Exception as exc:  # a head that cannot read model 0's trunk features
        raise ModelError(f"fuse: a head cannot read the shared trunk's output at {split_name!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); the models' trunks give different shapes there: "
                         "choose a split where they agree") from None

    weights = cfg.task_weights or [1.0] * len(models)

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        (args, kwargs), _ = D.split(batch)
        outs = _outputs(model(*args, **kwargs))
        total = outs[0].new_zeros(())
        for w, out, teacher in zip(weights, outs, teachers):
            with torch.no_grad():
                target = D.first_tensor(teacher(*args, **kwargs))
            if cfg.loss == OutputLoss.KL:
                total = total + w * soft_target_loss(out, target, cfg.temperature)
            else:
                total = total + w * embedding_loss(out, target, cfg.loss)
        return total

    params = [p for p in (fused.parameters() if cfg.train_trunk else fused.heads.parameters()) if p.requires_grad]
    fit(fused, data, FitConfig(steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer,
                               description="fusing", progress=progress), loss_fn=loss_fn, params=params)
    fused.eval()
    set_model_ref(fused, get_record(models[0])["model_ref"])
    append_stage(fused, "fuse_networks", cfg.to_dict(),
                 {"split": split_name, "heads": overrides, "names": names, "output": str(cfg.output)})
    record_inputs(fused, first)
    return fused

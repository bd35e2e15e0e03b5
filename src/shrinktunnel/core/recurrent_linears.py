"""Recurrent layers' matrices as Linears: `RecurrentLinears` holds an nn.LSTM / GRU / RNN's matrices as
bias-less `nn.Linear` children `matrices.<name>`, never called, read for the weight each computes with, so a
method that transforms a Linear by its weight alone (prune, cluster, qat: `register_method(recurrent=True)`)
replaces them as it replaces any Linear (canonicalization, core/layers.py). The recurrent op runs on those
weights through `torch.func.functional_call`. Storage of whole recurrent layers: core/recurrent.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dense import dense_weight

__all__ = ["RECURRENT", "RecurrentLayer", "RecurrentLinears", "holds_matrices", "recurrent_matrices", "recurrent_spec"]

RECURRENT = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}  # exact classes: a subclass may compute otherwise
_CLASSES = {v: k for k, v in RECURRENT.items()}


def recurrent_matrices(module: nn.Module) -> list[str]:
    """The names of a recurrent layer's matrices (its biases are vectors)."""
    return [n for n in module._flat_weights_names if getattr(module, n) is not None and getattr(module, n).dim() == 2]


def recurrent_spec(module: nn.Module, storage: str) -> dict[str, Any]:
    cfg = {k: getattr(module, k) for k in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                                           "dropout", "bidirectional")}
    if isinstance(module, nn.LSTM):
        cfg["proj_size"] = module.proj_size
    if isinstance(module, nn.RNN):
        cfg["nonlinearity"] = module.nonlinearity
    return {"kind": RECURRENT[type(module)], "config": cfg, "storage": storage, "matrices": recurrent_matrices(module)}


def holds_matrices(module: nn.Module) -> bool:
    """A recurrent layer with matrices of its own, not the placeholder `rnn` inside a RecurrentLayer."""
    return any(isinstance(p, nn.Parameter) and p.dim() >= 2 for p in module._parameters.values())


def _placeholder_rnn(spec: dict[str, Any]) -> nn.Module:
    """The recurrent layer of `spec` with its matrices removed: zero-stride, non-persistent stand-ins of
    their shapes (the forward passes the real ones), so nothing is stored twice."""
    rnn = _CLASSES[spec["kind"]](**spec["config"])
    for name in spec["matrices"]:
        shape = rnn._parameters[name].shape
        del rnn._parameters[name]
        rnn.register_buffer(name, torch.zeros((), dtype=torch.float32).expand(shape), persistent=False)
    return rnn


class RecurrentLayer(nn.Module):
    """What the layers that stand for a recurrent layer share: `_spec` (kind, config, matrices), the inner
    `rnn` with placeholder matrices, and `matrix(name)`, the float matrix the op runs on. The forward runs
    the recurrent op on those matrices; model code reads the replaced layer's attributes as before."""

    _spec: dict[str, Any]
    rnn: nn.Module

    def matrix(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        matrices = {name: self.matrix(name) for name in self._spec["matrices"]}
        return torch.func.functional_call(self.rnn, matrices, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        """The replaced layer's attributes (hidden_size, weight_ih_l0 as float32, ...), as model code reads them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            spec = self.__dict__.get("_spec")
            if spec is not None and name in spec["matrices"]:
                return self.matrix(name)
            if spec is not None and name in spec["config"]:
                return spec["config"][name]
            rnn = self.__dict__["_modules"].get("rnn")
            if rnn is not None and name in rnn._parameters:  # the biases, kept by the inner layer
                return rnn._parameters[name]
            raise


class RecurrentLinears(RecurrentLayer):
    """An nn.LSTM / GRU / RNN whose matrices are bias-less `nn.Linear` children (`matrices.<name>`, weight
    (rows, columns) as the recurrent layer holds it), read for the weight each computes with."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        if spec.get("kind") not in _CLASSES:
            raise ValueError(f"unsupported recurrent layer kind {spec.get('kind')!r}")
        self._spec = {k: spec[k] for k in ("kind", "config", "matrices")}
        self.rnn = _placeholder_rnn(spec)
        self.matrices = nn.ModuleDict()
        for name in spec["matrices"]:
            rows, cols = self.rnn._buffers[name].shape
            self.matrices[name] = nn.Linear(cols, rows, bias=False)

    @classmethod
    def from_module(cls, module: nn.Module) -> "RecurrentLinears":
        spec = recurrent_spec(module, "float32")
        layer = cls(spec)
        with torch.no_grad():
            for name in spec["matrices"]:
                layer.matrices[name].weight.copy_(getattr(module, name).detach())
            for name, p in module.named_parameters():
                if name not in spec["matrices"]:
                    layer.rnn.get_parameter(name).copy_(p.detach())
        layer.train(module.training)
        return layer

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def matrix(self, name: str) -> torch.Tensor:
        """A matrix as the layer computes with it: its child's weight (decoded, dequantized, fake-quantized)."""
        return dense_weight(self.matrices[name])

    def extra_repr(self) -> str:
        return f"{self._spec['kind']}, {len(self._spec['matrices'])} matrices as Linears"

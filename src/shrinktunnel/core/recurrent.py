"""Recurrent layers (nn.LSTM / nn.GRU / nn.RNN): weight-only storage for `quantize` and `cast`, and
their matrices as Linears for the methods that transform a Linear by its weight alone.

`RecurrentLinears` (canonicalization, core/layers.py, for methods registered with `recurrent=True`:
prune, cluster, qat) holds each matrix as a bias-less `nn.Linear` child `matrices.<name>`: never called,
read for its weight, so a method replaces it as it replaces any Linear (a SparseLayer, a ClusteredLayer,
a FakeQuantLayer, then a QuantizedLayer) and the recurrent op runs on the weight the child computes with.

A recurrent layer computes with its matrices (`weight_ih_l0`, `weight_hh_l0`, ...) inside one fused op,
so no method's layer can take a matrix's place, and no int8 recurrent kernel is wired (ONNX Runtime's
DynamicQuantizeLSTM is a contrib op of its own). The matrices are stored narrow instead: int8 per row
(output unit) with a float32 scale, or float16 / bfloat16 / float8 (float8 scaled per row), and expanded
to float32 at each forward, where the layer's own forward runs on them through `torch.func.functional_call`
(so torch.export and ONNX export see the recurrent op with the expanded matrices). Biases stay float32.
Storage shrinks (4x int8, 2x float16); compute and speed stay float32's.

State dict: `<name>_stored` (the matrix, int8 or the float format), `<name>_scale` (float32, per row, for
int8 and float8), and the biases under `rnn.` as the original layer has them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .recurrent_linears import (_CLASSES, RECURRENT, RecurrentLayer, RecurrentLinears, _placeholder_rnn, holds_matrices,
                                recurrent_matrices, recurrent_spec)

STORAGE = ("int8", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
_SCALED = ("int8", "float8_e4m3fn", "float8_e5m2")

__all__ = ["RECURRENT", "RecurrentWeightOnly", "RecurrentLinears", "recurrent_matrices", "recurrent_spec",
           "store_recurrent", "replay_recurrent"]


class RecurrentWeightOnly(RecurrentLayer):
    """An nn.LSTM / GRU / RNN whose matrices are stored as `storage` and expanded to float32 per forward."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        if spec.get("kind") not in _CLASSES or spec.get("storage") not in STORAGE:
            raise ValueError(f"unsupported recurrent weight storage {spec.get('kind')!r} / {spec.get('storage')!r}; "
                             "this artifact needs a newer shrinktunnel, or it is corrupted")
        self._spec = spec
        rnn = _placeholder_rnn(spec)  # the forward passes the expanded matrices
        dtype = getattr(torch, spec["storage"])
        for name in spec["matrices"]:
            shape = rnn._buffers[name].shape
            self.register_buffer(f"{name}_stored", torch.zeros(shape, dtype=dtype))
            if spec["storage"] in _SCALED:
                self.register_buffer(f"{name}_scale", torch.ones(shape[0], dtype=torch.float32))
        self.rnn = rnn

    @classmethod
    def from_module(cls, module: nn.Module, storage: str) -> "RecurrentWeightOnly":
        layer = cls(recurrent_spec(module, storage))
        with torch.no_grad():
            for name in layer._spec["matrices"]:
                w = getattr(module, name).detach().float()
                stored = getattr(layer, f"{name}_stored")
                if storage in _SCALED:
                    top = 127.0 if storage == "int8" else torch.finfo(stored.dtype).max
                    amax = w.abs().amax(dim=1)
                    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
                    getattr(layer, f"{name}_scale").copy_(scale)
                    w = w / scale[:, None]
                    if storage == "int8":
                        w = w.round().clamp(-127, 127)
                stored.copy_(w.to(stored.dtype))
            for name, p in module.named_parameters():
                if name not in layer._spec["matrices"]:
                    layer.rnn.get_parameter(name).copy_(p.detach())
        layer.train(module.training)
        return layer

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def num_weights(self) -> int:
        """The matrices (measure.count_weights; the biases are the child `rnn`'s parameters, counted there)."""
        return sum(int(getattr(self, f"{n}_stored").numel()) for n in self._spec["matrices"])

    def matrix(self, name: str) -> torch.Tensor:
        """A matrix as the layer computes with it (float32)."""
        w = getattr(self, f"{name}_stored").float()
        if self._spec["storage"] in _SCALED:
            w = w * getattr(self, f"{name}_scale")[:, None]
        return w

    def extra_repr(self) -> str:
        return f"{self._spec['kind']}, {len(self._spec['matrices'])} matrices stored {self._spec['storage']} (weight-only)"


def store_recurrent(model: nn.Module, layers: list[str], skip: list[str], storage: str, method: str,
                    ctx: Any) -> dict[str, dict[str, Any]]:
    """Every selected exact nn.LSTM / GRU / RNN of `model` stored weight-only as `storage`, IN PLACE; one
    warning names them (no kernel computes in that format); returns the replay {name: spec}."""
    from .layers import visible_modules
    from .modtree import set_submodule
    from .select import matches

    specs: dict[str, dict[str, Any]] = {}
    for name, module in list(visible_modules(model)):
        selected = name and matches(name, layers) and not matches(name, skip)
        if selected and type(module) in RECURRENT and holds_matrices(module):
            layer = RecurrentWeightOnly.from_module(module, storage)
            set_submodule(model, name, layer)
            specs[name] = layer.spec()
    if specs:
        ctx.warn(f"{method}: {', '.join(specs)}: recurrent layer(s) stored {storage} weight-only (matrices expanded "
                 f"to float32 at run time: no {storage} recurrent kernel; storage shrinks, speed stays float's)")
    return specs


def replay_recurrent(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    from .modtree import set_submodule

    for name, spec in specs.items():
        set_submodule(model, name, RecurrentWeightOnly(spec))


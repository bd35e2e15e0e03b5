"""Tied embeddings: an `nn.Embedding` and an `nn.Linear` sharing one weight Parameter (GPT-2, Llama with
`tie_word_embeddings`, T5's shared table), transformed ONCE by a method and kept tied.

The method builds its layer for the Linear (the output projection, `lm_head`): a `QuantizedLayer`, a
`SparseLayer` or a `ClusteredLayer`. The Embedding becomes a `TiedEmbedding` holding that same layer
object as its child `layer`, so the table is stored once: the artifact writes tensors that share
storage once (core/artifact.py: aliases), and the state dict names both (`lm_head.qweight` and
`transformer.wte.layer.qweight`). The lookup reads the shared layer's stored form:

- quantized: the integer rows are looked up, then dequantized with their own scales (`lookup_dequantized`):
  the Linear's per-channel (or per-group) scales are per vocabulary row, exactly an embedding's per-row
  scales. SmoothQuant's factors (the Linear holds W * s) are divided out again per column.
- sparse / clustered: rows of the decoded dense weight are gathered (ONNX: Gather on the dense weight).

Methods find the pairs with `tied_pairs(model)` and record them in their replay as
`{"tied": {embedding name: {"layer": linear name, "padding_idx": int | None}}}`; `tie(model, tied)`
builds the TiedEmbeddings after the method's layers (in `apply` and in `replay`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TiedEmbedding", "tied_pairs", "tie_plan", "tie", "tie_record", "TIED_CHILD"]

TIED_CHILD = "layer"  # the shared layer inside a TiedEmbedding: `<embedding>.layer`


class TiedEmbedding(nn.Module):
    """An embedding whose table is the weight of another (compressed) layer, held as the child `layer`:
    the very module registered under the Linear's name too, so nothing is stored twice."""

    def __init__(self, layer: nn.Module, padding_idx: int | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return int(self.layer.spec()["weight_shape"][0])

    @property
    def embedding_dim(self) -> int:
        return int(self.layer.spec()["weight_shape"][1])

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (decoded), for model code that reads `embed.weight` (its dtype, its shape)."""
        return _dense(self.layer)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if hasattr(layer, "integer_weight") and hasattr(layer, "weight_scale"):  # quant/modules.QuantizedLayer
            fmt = layer._format
            # Symmetric signed weights have zero points of 0 by construction (as QuantizedLayer's own lookup).
            zero_point = None if fmt["symmetric"] and fmt["dtype"] == "int8" else layer.weight_zero_point
            from ..quant.ops import lookup_dequantized

            rows = lookup_dequantized(index, layer.integer_weight(), layer.weight_scale, zero_point)
            if layer.spec().get("input_smooth"):  # the Linear holds W * s per input column; 1 / s is stored
                rows = rows * layer.input_smooth
            return rows
        return F.embedding(index, _dense(layer), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a {type(self.layer).__name__}"


def _dense(layer: nn.Module) -> torch.Tensor:
    """The dense float weight a method's layer computes with."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    w = layer.weight
    return w() if callable(w) else w  # ClusteredLayer.weight() is a method; SparseLayer.weight a buffer


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{embedding name: linear name} for every exact `nn.Embedding` whose weight Parameter is the weight
    of an exact `nn.Linear` of the same shape (and no other module's): the pairs a method transforms once."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if name else None
        if isinstance(w, nn.Parameter):
            holders.setdefault(id(w), []).append((name, module))
    out: dict[str, str] = {}
    for held in holders.values():
        if len(held) != 2:
            continue
        emb = [(n, m) for n, m in held if type(m) is nn.Embedding]
        lin = [(n, m) for n, m in held if type(m) is nn.Linear]
        if len(emb) == 1 and len(lin) == 1 and emb[0][1].max_norm is None \
                and emb[0][1].weight.shape == lin[0][1].weight.shape:
            out[emb[0][0]] = lin[0][0]
    return out


def tie_plan(model: nn.Module, layers: list[str], skip: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Which tied pairs a stage with these patterns transforms: ({linear: [embeddings]}, {layer: reason}).
    A pair goes with its Linear: it is transformed when the Linear is selected and no `skip` pattern
    names the Embedding (the Embedding need not match `layers`). Otherwise both are left as they are,
    and the selected one of them gets the reason (transforming one copy would untie them)."""
    from .select import matches

    def selected(name: str) -> bool:
        return matches(name, layers) and not matches(name, skip)

    together: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for emb, lin in tied_pairs(model).items():
        if selected(lin) and not matches(emb, skip):
            together.setdefault(lin, []).append(emb)
        elif selected(lin):
            refused[lin] = (f"its weight is tied to {emb}, which this stage's skip patterns leave alone; left as "
                            "it is so the tie holds (transforming one copy would store the table twice)")
        elif selected(emb):
            refused[emb] = (f"its weight is tied to {lin}, which this stage leaves alone; left as it is so the "
                            "tie holds (transforming one copy would store the table twice)")
    return together, refused


def tie_record(model: nn.Module, embedding: str, linear: str) -> dict[str, Any]:
    """The replay entry of one pair: the Linear's name and the Embedding's padding_idx."""
    return {"layer": linear, "padding_idx": model.get_submodule(embedding).padding_idx}


def tie(model: nn.Module, tied: dict[str, dict[str, Any]]) -> nn.Module:
    """Make each recorded embedding a TiedEmbedding over the layer now registered under its Linear's
    name, IN PLACE (after the method's own layers were set, in `apply` and in `replay`)."""
    from .select import set_submodule

    for name, entry in (tied or {}).items():
        padding_idx = entry.get("padding_idx")
        if padding_idx is not None and not isinstance(padding_idx, int):
            raise ValueError(f"tied embedding {name}: padding_idx {padding_idx!r} is not an integer")
        set_submodule(model, name, TiedEmbedding(model.get_submodule(entry["layer"]), padding_idx))
    return model

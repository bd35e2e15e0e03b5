"""Tied embeddings: an `nn.Embedding` and an `nn.Linear` sharing one weight Parameter (GPT-2, Llama with
`tie_word_embeddings`, T5's shared table), transformed ONCE by a method and kept tied.

The method builds its layer for the Linear (the output projection, `lm_head`): a `QuantizedLayer`, a
`SparseLayer` or a `ClusteredLayer`. The Embedding becomes a `TiedEmbedding` holding that same layer
object as its child `layer`, so the table is stored once: the artifact writes tensors that share
storage once (core/artifact.py: aliases), and the state dict names both (`lm_head.qweight` and
`transformer.wte.layer.qweight`). The lookup reads the shared layer's stored form:

- quantized: the integer rows are looked up, then dequantized with their own scales (`QuantizedLayer.lookup_rows`):
  the Linear's per-channel (or per-group) scales are per vocabulary row, exactly an embedding's per-row
  scales. SmoothQuant's factors (the Linear holds W * s) are divided out again per column.
- sparse / clustered: rows of the decoded dense weight are gathered (ONNX: Gather on the dense weight).

Embeddings that share one table with no Linear (T5's `shared` and `encoder.embed_tokens`) need no
TiedEmbedding: both compute the same lookup, so the method's layer is registered under every name.

Methods find the groups with `tie_plan(model, layers, skip)` and record the Linear ties in their replay as
`{"tied": {embedding name: {"layer": linear name, "padding_idx": int | None}}}`; `tie(model, tied)`
builds the TiedEmbeddings after the method's layers (in `apply` and in `replay`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dense import dense_weight as _dense

__all__ = ["TiedEmbedding", "tie_groups", "tied_pairs", "tie_plan", "tie", "tie_record", "TIED_CHILD", "left_alone"]

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
        return int(_weight_shape(self.layer)[0])

    @property
    def embedding_dim(self) -> int:
        return int(_weight_shape(self.layer)[1])

    @property
    def weight(self) -> torch.Tensor:
        """The dense table (decoded), for model code that reads `embed.weight` (its dtype, its shape)."""
        return _dense(self.layer)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if hasattr(layer, "lookup_rows"):  # quant/modules.QuantizedLayer: integer rows first, then dequantized
            return layer.lookup_rows(index)
        return F.embedding(index, _dense(layer), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a {type(self.layer).__name__}"


def _weight_shape(layer: nn.Module) -> list[int]:
    """The shape of the weight a method's layer stands for (its spec's; QAT's training layer holds it)."""
    if callable(getattr(layer, "spec", None)):
        return list(layer.spec()["weight_shape"])
    return list(layer.weight.shape)


def tie_groups(model: nn.Module) -> list[tuple[str | None, list[str]]]:
    """[(linear name or None, [embedding names])]: every weight Parameter held by several modules that
    are all exact `nn.Embedding`s (without max_norm) but at most one exact `nn.Linear`, of one shape.
    Names in `named_modules` order; a module registered under two names appears once (its first)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if name else None
        if isinstance(w, nn.Parameter):
            holders.setdefault(id(w), []).append((name, module))
    groups = []
    for held in holders.values():
        if len(held) < 2 or len({tuple(m.weight.shape) for _, m in held}) != 1:
            continue
        emb = [n for n, m in held if type(m) is nn.Embedding and m.max_norm is None]
        lin = [n for n, m in held if type(m) is nn.Linear]
        if emb and len(lin) <= 1 and len(emb) + len(lin) == len(held):
            groups.append((lin[0] if lin else None, emb))
    return groups


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """{embedding name: linear name} for every Embedding tied to a Linear (`tie_groups`): the Linear is
    what a method transforms, the Embedding becomes a TiedEmbedding reading it."""
    return {e: lin for lin, embs in tie_groups(model) if lin is not None for e in embs}


def tie_plan(model: nn.Module, layers: list[str], skip: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Which tie groups a stage with these patterns transforms: ({lead: [followers]}, {layer: reason}).

    - An Embedding tied to a Linear (lm_head): the Linear leads; the group is transformed when the Linear
      is selected and no `skip` pattern names one of its Embeddings (they need not match `layers`);
      the followers become TiedEmbeddings reading the Linear's layer.
    - Embeddings sharing one table (T5's `shared` and `encoder.embed_tokens`): the first selected one
      leads; the group is transformed when no member matches `skip`; the followers are further names
      of the lead's layer (one module registered under several names, stored once).
    Otherwise every member is left as it is, and the selected ones get the reason (transforming one
    copy would untie them and store the table twice)."""
    from .select import matches

    def selected(name: str) -> bool:
        return matches(name, layers) and not matches(name, skip)

    together: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for lin, embs in tie_groups(model):
        members = ([lin] if lin else []) + embs
        chosen = [n for n in members if selected(n)]
        lead = lin if lin is not None else (chosen[0] if chosen else None)
        kept = [n for n in members if matches(n, skip)]
        if lead is not None and selected(lead) and not kept:
            together[lead] = [n for n in members if n != lead]
            continue
        for name in chosen:
            why = (f"this stage's skip patterns leave {', '.join(kept)} alone" if kept else
                   f"this stage leaves {lin} alone")
            refused[name] = (f"its weight is tied to {', '.join(n for n in members if n != name)} and {why}; left "
                             "as it is so the tie holds (transforming one copy would store the table twice)")
    return together, refused


def left_alone(name: str, module: nn.Module, kinds: tuple, refused: dict[str, str], following: set[str],
               kept: str) -> str | None:
    """Why a method leaves a selected layer alone, or None to transform it; "" for an Embedding that
    follows the Linear it is tied to (transformed with it, nothing to say). `kept`: what happens to a layer
    left alone ("not pruned", "kept in float"), `refused` / `following`: from `tie_plan`."""
    if type(module) not in kinds:
        return f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} and is read by its parent; {kept}"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"an Embedding with max_norm renormalises its weight in place; {kept}"
    if name in refused:
        return refused[name]
    return "" if name in following else None


def tie_record(model: nn.Module, embedding: str, linear: str) -> dict[str, Any]:
    """The replay entry of one pair: the Linear's name and the Embedding's padding_idx."""
    return {"layer": linear, "padding_idx": model.get_submodule(embedding).padding_idx}


def tie(model: nn.Module, tied: dict[str, dict[str, Any]]) -> nn.Module:
    """Make each recorded embedding a TiedEmbedding over the layer now registered under its Linear's
    name, IN PLACE (after the method's own layers were set, in `apply` and in `replay`)."""
    from .select import set_submodule

    if not isinstance(tied or {}, dict):
        raise ValueError(f"tied: expected {{embedding: {{layer, padding_idx}}}}, got {type(tied).__name__}")
    for name, entry in (tied or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), str):
            raise ValueError(f"tied embedding {name!r}: its entry {entry!r} names no layer")
        padding_idx = entry.get("padding_idx")
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
            raise ValueError(f"tied embedding {name!r}: padding_idx {padding_idx!r} is not an integer")
        embedding = model.get_submodule(name) if name else None
        layer = model.get_submodule(entry["layer"]) if entry["layer"] else None
        spec = layer.spec() if callable(getattr(layer, "spec", None)) else None
        if not isinstance(embedding, nn.Embedding) or not isinstance(spec, dict) or \
                list(spec.get("weight_shape", [])) != list(embedding.weight.shape):
            raise ValueError(f"tied embedding {name!r}: it is not an Embedding tied to a compressed layer "
                             f"{entry['layer']!r} of its shape")
        set_submodule(model, name, TiedEmbedding(layer, padding_idx))
    return model

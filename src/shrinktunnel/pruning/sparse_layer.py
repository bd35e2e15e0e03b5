"""A pruned Linear / Conv1d / Conv2d / Embedding stored sparse: its kept weights plus the index of their positions.

State dict (what the artifact stores): `values` (1-D, the weight's dtype, the kept weights in
row-major order), `index` (1-D uint8: a bitmask or a relative-index stream, codec/sparse) and the
`bias` if any. The dense weight is a non-persistent buffer, decoded from the two when the layer is
built and whenever a state dict is loaded into it; the forward pass and ONNX export use it, so the
exported graph holds an ordinary dense weight and computes exactly what the pruned layer computes.
`spec()` is the JSON-ready description replay rebuilds an empty layer from. An embedding (kind
`embedding`, its `padding_idx` in the spec) looks its rows up in the dense weight (ONNX: Gather).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..codec.sparse import decode_sparse, encode_sparse, expected_index_nbytes, spec_numel
from ..quant.modules import QuantizedLayer, apply_layer
from ..quant.modules import SpecAttributes

__all__ = ["SparseLayer", "SUPPORTED"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


class SparseLayer(SpecAttributes, nn.Module):
    """Linear, convolution or embedding whose weight is stored as kept values plus an index. Buffers `values`,
    `index` (persistent) and `weight` (dense, rebuilt from them; not stored); parameter `bias`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = spec
        sparse = spec["sparse"]
        dtype = getattr(torch, spec.get("dtype", "float32"))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"sparse layer dtype {spec.get('dtype')!r} is not a floating-point torch dtype")
        if list(sparse["shape"]) != list(spec["weight_shape"]):
            raise ValueError(f"sparse shape {sparse['shape']} differs from the weight shape {spec['weight_shape']}")
        numel = spec_numel(sparse)  # checks the shape and the counts before anything is allocated
        kept = int(sparse["kept"])
        if not 0 <= kept <= numel:
            raise ValueError(f"{kept} kept weights in a layer of {numel}")
        self.register_buffer("values", torch.zeros(kept, dtype=dtype))
        self.register_buffer("index", torch.zeros(expected_index_nbytes(sparse), dtype=torch.uint8))
        self.register_buffer("weight", torch.zeros(spec["weight_shape"], dtype=dtype), persistent=False)
        out = spec["weight_shape"][0]
        if spec["kind"] == "embedding" and spec["bias"]:
            raise ValueError("a sparse embedding has no bias")
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype), requires_grad=False) if spec["bias"] else None

    @classmethod
    def from_module(cls, module: nn.Module, mask: torch.Tensor, encoding: str = "auto",
                    index_bits: int | None = None) -> "SparseLayer":
        """The sparse form of `module` keeping the weights where `mask` is True."""
        weight = module.weight.detach()
        values, index, sparse = encode_sparse(weight, mask, encoding=encoding, index_bits=index_bits)
        spec = {**QuantizedLayer.geometry(module), "dtype": str(weight.dtype).removeprefix("torch."), "sparse": sparse}
        layer = cls(spec).to(weight.device)
        layer.values.copy_(values)
        layer.index.copy_(index)
        if getattr(module, "bias", None) is not None:
            layer.bias.data.copy_(module.bias.detach())
        layer.refresh()
        return layer

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "SparseLayer":
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    @property
    def kind(self) -> str:
        return self._spec["kind"]

    @property
    def sparse_spec(self) -> dict[str, Any]:
        """shape, encoding, kept, index_bits, entries (codec.sparse)."""
        return dict(self._spec["sparse"])

    def refresh(self) -> None:
        """Decode `values` + `index` into the dense `weight` (ArtifactError when they are corrupt)."""
        with torch.no_grad():
            self.weight.copy_(decode_sparse(self.values, self.index, self._spec["sparse"]))

    def mask(self) -> torch.Tensor:
        """True where a weight is kept (decoded from the index, not from the values: a kept weight MAY be 0)."""
        ones = torch.ones_like(self.values)
        return decode_sparse(ones, self.index, self._spec["sparse"]).bool()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        values, index = state_dict.get(prefix + "values"), state_dict.get(prefix + "index")
        # A missing key or a shape mismatch is reported by load_state_dict itself; decode only what fits.
        if values is not None and index is not None and values.shape == self.values.shape and index.shape == self.index.shape:
            self.refresh()

    def num_weights(self) -> int:
        """The weights the layer computes with (its dense size), as for the layer it replaces."""
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def stored_bytes(self) -> int:
        """Bytes of the weight's stored form: kept values plus index."""
        return self.values.numel() * self.values.element_size() + self.index.numel()

    @property
    def padding_idx(self) -> int | None:
        return self._spec.get("padding_idx")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_layer(self._spec, x, self.weight, self.bias)  # embedding: F.embedding(x, weight, padding_idx)

    def extra_repr(self) -> str:
        s = self._spec["sparse"]
        n = self.weight.numel()
        enc = s["encoding"] + (f" {s['index_bits']}-bit" if s["encoding"] == "relative" else "")
        return f"{self.kind}, weight={tuple(self.weight.shape)}, kept {s['kept']}/{n} ({s['kept'] / max(n, 1):.1%}), {enc}"

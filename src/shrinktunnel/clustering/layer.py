"""A clustered layer: a Linear / Conv1d / Conv2d / Embedding whose weights are indices into a codebook.

State dict (what the artifact stores):
- `codebook` (k,) float32, a Parameter: training it with the indices fixed is the paper's fine-tuning,
  since the gradient of a centroid through the gather `codebook[indices]` is the sum of the gradients
  of the weights that share it;
- `index_code` (uint8): the codebook index of every weight (dense) or of every kept weight (sparse),
  bit-packed at ceil(log2 k) bits or Huffman-coded; `index_lengths` (k,) uint8, its code lengths, when
  Huffman-coded;
- sparse only: `position_code` (uint8), the relative-index codes (codec.sparse) of the kept weights'
  positions, packed at `position_bits` or Huffman-coded; `position_lengths` (2^position_bits,) uint8;
- `bias` (float32) if any.

The decoded indices and positions and the dense weight are non-persistent buffers, rebuilt when the
layer is built and whenever a state dict is loaded into it (corrupt streams fail there, with
ArtifactError). The dense weight is cached while the codebook is unchanged and is what ONNX export
puts in the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import huffman
from ..codec.bitpack import packed_nbytes
from ..errors import ArtifactError
from ..quant.modules import apply_layer
from .config import Coding
from .storage import decode_stream, encode_stream, index_width, stream_report
from ..quant.modules import SpecAttributes

__all__ = ["ClusteredLayer"]


def _int(spec: dict[str, Any], key: str, lo: int = 0, hi: int | None = None) -> int:
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise ValueError(f"clustered layer spec: {key}={v!r} is not an integer in [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def _stream_bytes(spec: dict[str, Any], key: str, count: int, width: int, coding: Coding) -> int:
    """The stream length recorded under `key`, checked against what `count` symbols can take."""
    if coding == Coding.PACKED:
        return _int(spec, key, packed_nbytes(count, width), packed_nbytes(count, width))
    return _int(spec, key, 0, huffman.header_nbytes(count) + 2 * count)  # codes of at most 16 bits


class ClusteredLayer(SpecAttributes, nn.Module):
    """Weights shared through a codebook; computes in float32 with the dense weight."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = spec
        shape = list(spec["weight_shape"])
        n = int(torch.Size(shape).numel())
        k = _int(spec, "clusters", 1, 256)
        coding = Coding(spec["coding"])
        sparse = spec.get("sparse")
        count = n
        if sparse is not None:
            count = _int(sparse, "kept", 0, n)
            w = _int(sparse, "position_bits", 1, 8)
            # Bounds checked before allocating: a kept weight or a filler per code, a filler per 2^w - 1 skipped.
            entries = _int(sparse, "entries", 0, count + n // ((1 << w) - 1) + 1)
            self.register_buffer("position_code", torch.zeros(_stream_bytes(sparse, "position_bytes", entries, w, coding),
                                                              dtype=torch.uint8))
            if coding == Coding.HUFFMAN:
                self.register_buffer("position_lengths", torch.zeros(1 << w, dtype=torch.uint8))
            self.register_buffer("positions", torch.zeros(count, dtype=torch.int64), persistent=False)
        self.codebook = nn.Parameter(torch.zeros(k))
        self.register_buffer("index_code", torch.zeros(_stream_bytes(spec, "index_bytes", count, index_width(k), coding),
                                                       dtype=torch.uint8))
        if coding == Coding.HUFFMAN:
            self.register_buffer("index_lengths", torch.zeros(k, dtype=torch.uint8))
        self.register_buffer("indices", torch.zeros(count, dtype=torch.int64), persistent=False)
        self.register_buffer("dense", torch.zeros(shape), persistent=False)
        self.bias = nn.Parameter(torch.zeros(shape[0])) if spec["bias"] else None
        self._n, self._count, self._coding = n, count, coding
        self._dense_from: tuple | None = None  # (data_ptr, version) of the codebook `dense` was built from

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, geometry: dict[str, Any], bits: int, codebook: torch.Tensor, indices: torch.Tensor,
              coding: Coding, positions: torch.Tensor | None = None, position_codes: torch.Tensor | None = None,
              position_bits: int | None = None, bias: torch.Tensor | None = None) -> "ClusteredLayer":
        """The layer storing `indices` (one per weight, or per kept weight with `positions`) into
        `codebook`; relative `position_codes` at `position_bits` describe `positions`."""
        k = codebook.numel()
        index_code, index_lengths = encode_stream(indices, k, coding)
        spec = {**geometry, "bits": bits, "clusters": k, "coding": str(coding), "index_bytes": index_code.numel(),
                "sparse": None}
        if positions is not None:
            pos_code, pos_lengths = encode_stream(position_codes, 1 << position_bits, coding)
            spec["sparse"] = {"kept": int(positions.numel()), "position_bits": position_bits,
                              "entries": int(position_codes.numel()), "position_bytes": pos_code.numel()}
        layer = cls(spec)
        with torch.no_grad():
            layer.codebook.copy_(codebook)
            layer.index_code.copy_(index_code)
            if index_lengths is not None:
                layer.index_lengths.copy_(index_lengths)
            if positions is not None:
                layer.position_code.copy_(pos_code)
                if pos_lengths is not None:
                    layer.position_lengths.copy_(pos_lengths)
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        layer.refresh()
        return layer

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ClusteredLayer":
        return cls(spec)

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    @property
    def kind(self) -> str:
        return self._spec["kind"]

    @property
    def sparse(self) -> bool:
        return self._spec.get("sparse") is not None

    def num_weights(self) -> int:
        return self._n + (self.bias.numel() if self.bias is not None else 0)

    # -- decoding -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Decode the stored streams into `indices` (and `positions`); ArtifactError when corrupt."""
        k = self.codebook.numel()
        lengths = getattr(self, "index_lengths", None)
        indices = decode_stream(self.index_code, lengths, k, self._count, f"{self.kind} layer codebook indices")
        sparse = self._spec.get("sparse")
        if sparse is not None:
            from ..codec.sparse import decode_relative

            w = sparse["position_bits"]
            codes = decode_stream(self.position_code, getattr(self, "position_lengths", None), 1 << w,
                                  _int(sparse, "entries"), f"{self.kind} layer positions")
            positions = decode_relative(codes, self._n, w)
            if positions.numel() != self._count:
                raise ArtifactError(f"{self.kind} layer positions: the relative index holds {positions.numel()} "
                                    f"kept weights, the spec says {self._count}; the artifact is damaged")
            self.positions = positions.to(self.positions.device)
        self.indices = indices.to(self.indices.device)
        self._dense_from = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        names = [n for n, _ in self.named_buffers(recurse=False) if n in self._stored_buffers()]
        # A missing key or a shape mismatch is reported by load_state_dict itself; decode only what fits.
        if all(prefix + n in state_dict and state_dict[prefix + n].shape == getattr(self, n).shape for n in names):
            self.refresh()

    def _stored_buffers(self) -> tuple[str, ...]:
        return ("index_code", "index_lengths", "position_code", "position_lengths")

    # -- the weight ---------------------------------------------------------------------------
    def _build(self) -> torch.Tensor:
        values = self.codebook[self.indices]  # differentiable: a centroid's grad sums its weights' grads
        if self.sparse:
            values = torch.zeros(self._n, dtype=values.dtype, device=values.device).scatter(0, self.positions, values)
        return values.view(self.dense.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, as the replaced layer's `weight` attribute: model code reads it outside the
        forward (transformers' ViT casts its pixels to `projection.weight.dtype`)."""
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight. With gradients on (training) it is rebuilt each call, so that the codebook
        gets its gradient; otherwise the cache is used while the codebook is unchanged."""
        if torch.compiler.is_exporting():
            if self._dense_from is None:
                raise RuntimeError("clustered layer: dense weight not built yet; export with st.export_onnx")
            return self.dense
        cb = self.codebook
        if torch.is_grad_enabled() and cb.requires_grad:
            return self._build()
        key = (cb.data_ptr(), None if cb.is_inference() else cb._version, cb.device)
        if self._dense_from != key:
            with torch.no_grad():
                self.dense = self._build().detach()
            self._dense_from = key
        return self.dense

    def prepare_export(self) -> str | None:
        """Called by st.export_onnx: the dense weight goes into the graph as a plain initializer."""
        with torch.no_grad():
            self.dense_weight()
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        if s["kind"] == "embedding":
            return F.embedding(x, self.dense_weight(), s.get("padding_idx"), None, 2.0, s.get("scale_grad_by_freq", False),
                               s.get("sparse_grad", False))
        return apply_layer(s, x, self.dense_weight(), self.bias)

    # -- figures ------------------------------------------------------------------------------
    def storage(self) -> dict[str, Any]:
        """Bits of every stored part, per weight, next to the entropy of each stream."""
        k = self.codebook.numel()
        streams = {"indices": stream_report(self.indices, k, self.index_code, getattr(self, "index_lengths", None))}
        sparse = self._spec.get("sparse")
        if sparse is not None:
            from .storage import relative_codes

            w = sparse["position_bits"]
            codes = relative_codes(self.positions.cpu(), self._n, w)
            streams["positions"] = stream_report(codes, 1 << w, self.position_code, getattr(self, "position_lengths", None))
        codebook_bits = 32 * k
        stored = sum(s["bits"] + s["table_bits"] for s in streams.values()) + codebook_bits
        bound = sum(s["entropy_bits"] for s in streams.values())
        n = self._n
        return {
            "kind": self.kind, "weights": n, "kept": self._count, "bits": self._spec["bits"], "clusters": k,
            "coding": str(self._coding), "position_bits": sparse["position_bits"] if sparse else None,
            "streams": streams, "codebook_bits": codebook_bits, "stored_bits": stored,
            "bits_per_weight": stored / n, "entropy_bits_per_weight": bound / n,
            "stream_bits_per_weight": sum(s["bits"] for s in streams.values()) / n,
            "bias_bits": 32 * self.bias.numel() if self.bias is not None else 0,
        }

    def extra_repr(self) -> str:
        s = self._spec
        sp = s.get("sparse")
        extra = f", sparse {sp['kept']}/{self._n} kept, positions {sp['position_bits']}-bit" if sp else ""
        return f"{s['kind']}, weight={tuple(s['weight_shape'])}, {s['clusters']} clusters ({s['bits']}-bit), {s['coding']}{extra}"

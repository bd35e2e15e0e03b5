"""The streams a clustered layer stores: codebook indices and, for a pruned layer, the positions of its
kept weights as relative indices (codec.sparse), each either bit-packed or Huffman-coded.

A stream is its code bytes plus, when Huffman-coded, its table of code lengths (one byte per symbol
of its alphabet). Alphabets: the k centroids for indices; the 2^w relative-index codes for positions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..codec import huffman
from ..codec.bitpack import pack, unpack
from ..codec.entropy import stream_stats
from ..errors import ArtifactError
from .config import Coding

__all__ = ["index_width", "encode_stream", "decode_stream", "choose_position_bits", "relative_codes", "stream_report"]

POSITION_BITS = range(1, 9)  # relative-index widths tried per layer


def index_width(alphabet: int) -> int:
    """Bits a packed symbol of an alphabet of this size takes: ceil(log2 alphabet), at least 1."""
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 1


def encode_stream(values: torch.Tensor, alphabet: int, coding: Coding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(code bytes, Huffman code lengths or None) of the symbols `values` in [0, alphabet)."""
    v = values.reshape(-1)
    if coding == Coding.PACKED:
        return pack(v, index_width(alphabet), signed=False), None
    return huffman.encode_symbols(v, alphabet)


def decode_stream(code: torch.Tensor, lengths: torch.Tensor | None, alphabet: int, count: int, what: str) -> torch.Tensor:
    """The `count` symbols (int64) of a stream; ArtifactError when it is corrupt or out of the alphabet."""
    try:
        if lengths is None:
            values = unpack(code.cpu(), index_width(alphabet), False, count).to(torch.int64)
            if values.numel() and int(values.max()) >= alphabet:
                raise ArtifactError(f"a symbol is {int(values.max())}, outside the alphabet of {alphabet}")
            return values
        if lengths.numel() != alphabet:
            raise ArtifactError(f"the code-length table has {lengths.numel()} entries for an alphabet of {alphabet}")
        return huffman.decode(code.cpu(), lengths.cpu(), count)
    except ArtifactError as exc:
        raise ArtifactError(f"{what}: {exc}") from None


def relative_codes(positions: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    from ..codec.sparse import encode_relative

    return encode_relative(positions, n, bits)


def _stream_bits(codes: torch.Tensor, bits: int, coding: Coding) -> int:
    """Bits the stream of these relative codes takes, its table included."""
    if coding == Coding.PACKED:
        return codes.numel() * bits
    counts = np.bincount(codes.numpy(), minlength=1 << bits)
    lengths = huffman.code_lengths(counts)
    body = huffman.encoded_bits(counts, lengths)
    return 8 * (huffman.header_nbytes(codes.numel()) + (body + 7) // 8 + lengths.size)


def choose_position_bits(positions: torch.Tensor, n: int, coding: Coding, bits: int | None) -> tuple[int, torch.Tensor]:
    """(width, relative codes): `bits` when given, else the width whose stream is smallest (the
    narrowest among equals)."""
    if bits is not None:
        return bits, relative_codes(positions, n, bits)
    best: tuple[int, int, torch.Tensor] | None = None
    for w in POSITION_BITS:
        codes = relative_codes(positions, n, w)
        cost = _stream_bits(codes, w, coding)
        if best is None or cost < best[0]:
            best = (cost, w, codes)
    return best[1], best[2]  # type: ignore[index]


def stream_report(symbols: torch.Tensor, alphabet: int, code: torch.Tensor, lengths: torch.Tensor | None) -> dict[str, Any]:
    """Figures of one stream: stored bits (code bytes), table bits, and the entropy bound."""
    counts = np.bincount(symbols.reshape(-1).cpu().numpy(), minlength=alphabet)
    stats = stream_stats(counts, 8 * code.numel())
    stats["table_bits"] = 0 if lengths is None else 8 * lengths.numel()
    stats["alphabet"] = alphabet
    return stats

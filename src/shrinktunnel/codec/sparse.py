"""Sparse tensors stored compactly: the kept values plus the positions of those values, encoded as the
cheaper of a bitmask and a relative index (format: docs/codec.md, "Sparse tensors").

Tensor level (what the pruning method uses):

    values, index, spec = encode_sparse(weight, mask)          # encoding="auto": the cheaper per tensor
    dense = decode_sparse(values, index, spec)                 # bit-exact: kept values, +0.0 elsewhere

`spec` is a JSON-ready dict (`shape`, `encoding`, `kept`, `index_bits`, `entries`) that whoever stores
the two tensors keeps beside them (the artifact manifest). `index` is 1-D uint8.

Relative index (Deep Compression, Han, Mao & Dally, ICLR 2016, section 2 and its figure 2), a plain
function API that weight sharing reuses for its codebook indices:

    codes = encode_relative(positions, n, bits)   # 1-D int64 codes, each in [0, 2**bits - 1]
    positions = decode_relative(codes, n, bits)   # the inverse; ArtifactError on any corrupt stream
    relative_entries(positions, n, bits)          # len(codes), without building them
    best_index_bits(positions, n)                 # (bits, bytes) of the cheapest width, 1..16
    is_filler(codes, bits)                        # True at the filler entries (they carry no value)
    pack(codes, bits, signed=False)               # codec.bitpack stores the codes at `bits` bits each

`positions` are the flat (row-major) indices of the kept entries of a tensor of `n` entries, strictly
increasing, in [0, n). Let M = 2**bits - 1. Each entry of the stream is a code c:

- c < M: a kept entry, c + 1 positions after the previous kept entry (the first one is counted from
  position -1, so c = p for a first entry at p);
- c == M: a *filler*: it advances M positions and holds no kept entry. Deep Compression stores a zero
  weight with each filler; here its value is implied, so a filler costs its index bits only and the
  values array has exactly one value per kept entry. (A caller that wants the paper's layout, a value
  per entry, inserts a zero wherever `is_filler` is True.)

A gap of g positions becomes floor((g-1)/M) fillers then the code (g-1) mod M, and floor(t/M) fillers
cover the t pruned positions after the last kept entry. So every code sequence is the encoding of
exactly one position set, and a stream bounds the n it can describe: n <= (entries + 1) * M, checked
before a dense tensor is allocated.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..errors import ArtifactError
from .bitpack import MAX_BITS, pack, packed_nbytes, unpack

__all__ = [
    "ENCODINGS", "encode_relative", "decode_relative", "relative_entries", "best_index_bits", "is_filler",
    "encode_sparse", "decode_sparse", "choose_encoding", "index_nbytes",
]

ENCODINGS = ("bitmask", "relative")


def _fail(msg: str) -> ArtifactError:
    return ArtifactError(f"sparse index is corrupt: {msg}; the artifact is damaged, save it again")


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"index_bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return bits


def _gaps(positions: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """(gaps between consecutive kept entries, the first from -1), trailing pruned count t."""
    pos = positions.reshape(-1).to(torch.int64)
    if pos.numel():
        if int(pos[0]) < 0 or int(pos[-1]) >= n:
            raise ValueError(f"positions must lie in [0, {n}), got [{int(pos.min())}, {int(pos.max())}]")
        gaps = torch.diff(pos, prepend=pos.new_full((1,), -1))
        if bool((gaps < 1).any()):
            raise ValueError("positions must be strictly increasing (sorted, no duplicates)")
        return gaps, n - 1 - int(pos[-1])
    return pos, n


def relative_entries(positions: torch.Tensor, n: int, bits: int) -> int:
    """Number of codes `encode_relative(positions, n, bits)` returns: kept entries plus fillers."""
    m = (1 << _check_bits(bits)) - 1
    gaps, tail = _gaps(positions, n)
    return int(gaps.numel() + ((gaps - 1) // m).sum()) + tail // m


def encode_relative(positions: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The relative-index codes (1-D int64, each in [0, 2**bits - 1]) of the kept `positions` of a
    tensor of `n` entries. Raises ValueError on positions that are not strictly increasing in [0, n)."""
    m = (1 << _check_bits(bits)) - 1
    gaps, tail = _gaps(positions, n)
    fillers = (gaps - 1) // m  # fillers before each kept entry
    total = int(gaps.numel() + fillers.sum()) + tail // m
    codes = torch.full((total,), m, dtype=torch.int64)  # every slot a filler...
    if gaps.numel():
        codes[torch.cumsum(fillers + 1, 0) - 1] = (gaps - 1) % m  # ...but those of the kept entries
    return codes


def is_filler(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Boolean mask of the filler entries of a relative-index code stream."""
    return codes == (1 << _check_bits(bits)) - 1


def decode_relative(codes: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The kept positions (1-D int64, strictly increasing) that `codes` encode for a tensor of `n`
    entries. Raises ArtifactError when a code is out of range or the stream does not describe exactly n
    entries (it runs past the end, or leaves a run of M or more pruned entries at the end unencoded)."""
    try:
        bits = _check_bits(bits)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    m = (1 << bits) - 1
    codes = codes.reshape(-1).to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > m):
        raise _fail(f"a code lies outside [0, {m}] for {bits}-bit codes")
    if n < 0 or n > (codes.numel() + 1) * m:
        raise _fail(f"{codes.numel()} codes of {bits} bits describe at most {(codes.numel() + 1) * m} entries, not {n}")
    kept = codes != m
    ends = torch.cumsum(torch.where(kept, codes + 1, codes), 0) - 1  # position each entry lands on
    end = int(ends[-1]) if ends.numel() else -1
    if end > n - 1:
        raise _fail(f"the stream runs to position {end}, past the end of {n} entries")
    if n - 1 - end >= m:
        raise _fail(f"{n - 1 - end} entries after the stream's end, where a canonical stream leaves fewer than {m}")
    return ends[kept]


def best_index_bits(positions: torch.Tensor, n: int) -> tuple[int, int]:
    """(bits, bytes): the relative-index width in 1..16 whose packed stream is smallest (the narrowest
    of equals), and that stream's size in bytes."""
    gaps, tail = _gaps(positions, n)
    best: tuple[int, int] | None = None
    for bits in range(1, MAX_BITS + 1):
        m = (1 << bits) - 1
        entries = int(gaps.numel() + ((gaps - 1) // m).sum()) + tail // m
        nbytes = packed_nbytes(entries, bits)
        if best is None or nbytes < best[1]:
            best = (bits, nbytes)
    return best  # type: ignore[return-value]


def index_nbytes(n: int, positions: torch.Tensor, encoding: str, bits: int | None = None) -> tuple[int, int | None]:
    """(bytes, bits) of the index of `positions` in `encoding` ("bitmask": one bit per entry;
    "relative": at `bits`, or the cheapest width when None)."""
    if encoding == "bitmask":
        return packed_nbytes(n, 1), None
    if encoding == "relative":
        if bits is None:
            bits, nbytes = best_index_bits(positions, n)
            return nbytes, bits
        return packed_nbytes(relative_entries(positions, n, bits), bits), bits
    raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)} or 'auto', got {encoding!r}")


def choose_encoding(n: int, positions: torch.Tensor, encoding: str = "auto", bits: int | None = None) -> tuple[str, int | None, int]:
    """(encoding, index_bits, index bytes): `encoding` itself, or with "auto" the cheaper of the
    bitmask and the relative index (the bitmask on a tie: it decodes faster)."""
    if encoding != "auto":
        nbytes, bits = index_nbytes(n, positions, encoding, bits)
        return encoding, bits, nbytes
    mask_bytes, _ = index_nbytes(n, positions, "bitmask")
    rel_bytes, rel_bits = index_nbytes(n, positions, "relative", bits)
    if rel_bytes < mask_bytes:
        return "relative", rel_bits, rel_bytes
    return "bitmask", None, mask_bytes


def encode_sparse(
    tensor: torch.Tensor, mask: torch.Tensor, *, encoding: str = "auto", index_bits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(values, index, spec) of `tensor` keeping the entries where `mask` (same shape, bool) is True.

    values: 1-D, `tensor`'s dtype, the kept entries in row-major order; index: 1-D uint8;
    spec: {"shape", "encoding", "kept", "index_bits", "entries"} (the last two are null for a bitmask).
    """
    if mask.shape != tensor.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of the tensor's shape {tuple(tensor.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    flat, keep = tensor.detach().reshape(-1).cpu(), mask.reshape(-1).cpu()
    n = flat.numel()
    positions = torch.nonzero(keep).reshape(-1)
    encoding, bits, _ = choose_encoding(n, positions, encoding, index_bits)
    spec: dict[str, Any] = {"shape": list(tensor.shape), "encoding": encoding, "kept": int(positions.numel()),
                            "index_bits": None, "entries": None}
    if encoding == "bitmask":
        index = pack(keep, 1, signed=False)
    else:
        codes = encode_relative(positions, n, bits)
        index = pack(codes, bits, signed=False)
        spec.update(index_bits=bits, entries=int(codes.numel()))
    return flat[positions].contiguous(), index, spec


def _int(spec: dict[str, Any], key: str, lo: int = 0) -> int:
    value = spec.get(key)
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise _fail(f"{key} must be an integer, got {value!r}") from None
    if value < lo:
        raise _fail(f"{key} must be >= {lo}, got {value}")
    return value


def spec_numel(spec: dict[str, Any]) -> int:
    shape = spec.get("shape")
    if not isinstance(shape, list):
        raise _fail(f"shape must be a list of integers, got {shape!r}")
    n = 1
    for i in range(len(shape)):
        n *= _int({"d": shape[i]}, "d")
    return n


def expected_index_nbytes(spec: dict[str, Any]) -> int:
    """Bytes the index of `spec` takes (what a reader allocates the index buffer with)."""
    if spec.get("encoding") == "bitmask":
        return packed_nbytes(spec_numel(spec), 1)
    if spec.get("encoding") == "relative":
        bits = _int(spec, "index_bits", 1)
        if bits > MAX_BITS:
            raise _fail(f"index_bits {bits} is above {MAX_BITS}")
        return packed_nbytes(_int(spec, "entries"), bits)
    raise _fail(f"encoding {spec.get('encoding')!r} is not one of {', '.join(ENCODINGS)}")


def decode_sparse(values: torch.Tensor, index: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The dense tensor (spec's shape, values' dtype): the kept values at their positions, +0.0 elsewhere.

    Raises ArtifactError -- before allocating the dense tensor -- when the spec is malformed, `index`
    is not 1-D uint8 of exactly the length the spec implies, `values` does not hold one value per kept
    entry, or the index does not describe exactly `kept` positions inside the tensor."""
    n, kept = spec_numel(spec), _int(spec, "kept")
    need = expected_index_nbytes(spec)
    if not isinstance(index, torch.Tensor) or index.dtype != torch.uint8 or index.dim() != 1:
        raise _fail(f"the index must be a 1-D uint8 tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.numel() != need:
        raise _fail(f"the index has {index.numel()} bytes, its spec needs {need}")
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != kept:
        raise _fail(f"values must be 1-D with one value per kept entry ({kept}), got shape {tuple(getattr(values, 'shape', ()))}")
    if kept > n:
        raise _fail(f"{kept} kept entries in a tensor of {n}")
    if spec["encoding"] == "bitmask":
        mask = unpack(index, 1, False, n).bool()  # length checked against n above
        found = int(mask.sum())
        if found != kept:
            raise _fail(f"the bitmask marks {found} kept entries, the spec says {kept}")
        positions = torch.nonzero(mask).reshape(-1)
    else:
        bits, entries = spec["index_bits"], _int(spec, "entries")
        if n > (entries + 1) * ((1 << bits) - 1):
            raise _fail(f"{entries} codes of {bits} bits cannot describe {n} entries")
        positions = decode_relative(unpack(index, bits, False, entries), n, bits)
        if positions.numel() != kept:
            raise _fail(f"the relative index holds {positions.numel()} kept entries, the spec says {kept}")
    dense = torch.zeros(n, dtype=values.dtype, device=values.device)
    dense[positions.to(values.device)] = values
    return dense.view(spec["shape"])

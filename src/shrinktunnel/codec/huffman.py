"""Canonical Huffman coding of integer streams over a small alphabet (format: docs/codec.md, "Huffman").

    lengths = code_lengths(counts)                 # uint8 per symbol, 0 for unused, <= MAX_CODE_BITS
    stream = encode(values, lengths)               # 1-D uint8
    values = decode(stream, lengths, count)        # 1-D int64; ArtifactError on anything corrupt

Only the code lengths are stored: the codes themselves follow from them (canonical codes, as in
DEFLATE, RFC 1951 section 3.2.2), so a table costs one byte per symbol of the alphabet.

Lengths are optimal under a 16-bit limit (package-merge, Larmore & Hirschberg 1990), so decoding can
look the next 16 bits up in one table. A stream is cut into chunks of CHUNK = 2048 symbols whose bit
lengths head the stream (uint16 each: 16 bits per 2048 symbols, under 0.008 bits per symbol), so that
both directions are vectorised with numpy, with no Python loop over symbols:

- encode: each code is shifted into a 24-bit window at its bit offset (an exclusive cumulative sum of
  the lengths) and the three bytes of the windows are summed per output byte (codes never share a bit,
  so a sum is an OR);
- decode: all chunks are decoded in lockstep, one table lookup per chunk per step: 2048 steps of a few
  array operations each, whatever the stream's length. Every chunk must end exactly where the header
  says and every bit pattern met must be a code, or the stream is rejected.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from ..errors import ArtifactError

__all__ = ["MAX_CODE_BITS", "MAX_ALPHABET", "code_lengths", "canonical_codes", "encode", "encode_symbols", "decode",
           "encoded_bits", "check_lengths", "CHUNK", "header_nbytes"]

MAX_CODE_BITS = 16  # the decoding table has 2^16 entries at most
MAX_ALPHABET = 1 << 16
CHUNK = 2048  # symbols per chunk; 2048 codes of <= 16 bits span < 2^16 bits, so a uint16 holds a chunk's length


def _fail(msg: str) -> ArtifactError:
    return ArtifactError(f"Huffman stream is corrupt or truncated: {msg}; the artifact is damaged, save it again")


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# -- code lengths ------------------------------------------------------------------------------------

def code_lengths(counts, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Optimal prefix-code lengths (uint8, one per symbol, 0 where the count is 0) for symbol `counts`,
    no code longer than `max_bits`. A lone used symbol gets length 1; no used symbol gives all zeros."""
    counts = _as_numpy(counts).astype(np.int64).reshape(-1)
    if counts.size > MAX_ALPHABET:
        raise ValueError(f"an alphabet of {counts.size} symbols is above the {MAX_ALPHABET} supported")
    if (counts < 0).any():
        raise ValueError("symbol counts must be non-negative")
    if not 1 <= max_bits <= MAX_CODE_BITS:
        raise ValueError(f"max_bits must be in 1..{MAX_CODE_BITS}, got {max_bits}")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > (1 << max_bits):
        raise ValueError(f"{used.size} used symbols cannot all have codes of at most {max_bits} bits")
    lengths[used] = _package_merge(counts[used], max_bits)
    return lengths


def _package_merge(weights: np.ndarray, max_bits: int) -> np.ndarray:
    """Length-limited optimal code lengths of n >= 2 positive `weights` (the coin collector's problem).

    Level lists, from the deepest up: each is the leaves merged (sorted by weight) with the pairs of the
    list below. The cheapest 2n - 2 items of the top list are selected; going down, a selected package
    selects the two items it was made of, which are the first ones of the list below. A symbol's length
    is the number of levels at which its leaf is selected, and the selected leaves at a level are always
    the lightest ones, so only counts travel down."""
    n = weights.size
    order = np.argsort(weights, kind="stable")
    leaves = weights[order]
    levels: list[np.ndarray] = []  # per level: is_leaf flag of each item in merged order
    current = leaves.copy()
    levels.append(np.ones(n, dtype=bool))
    for _ in range(max_bits - 1):
        pairs = current[: current.size // 2 * 2].reshape(-1, 2).sum(axis=1)
        merged = np.concatenate([leaves, pairs])
        is_leaf = np.concatenate([np.ones(n, dtype=bool), np.zeros(pairs.size, dtype=bool)])
        # Stable sort with leaves first among equals (any tie rule gives an optimal code).
        idx = np.argsort(merged, kind="stable")
        current, flags = merged[idx], is_leaf[idx]
        levels.append(flags)
    sorted_lengths = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for flags in reversed(levels):
        chosen = flags[:take]
        leaves_taken = int(chosen.sum())
        sorted_lengths[:leaves_taken] += 1
        take = 2 * (take - leaves_taken)
    out = np.empty(n, dtype=np.uint8)
    out[order] = sorted_lengths
    return out


def check_lengths(lengths) -> np.ndarray:
    """The code lengths as a numpy uint8 array, after checking they describe a prefix code:
    each in 0..MAX_CODE_BITS, Kraft sum at most 1. Raises ArtifactError otherwise."""
    if isinstance(lengths, torch.Tensor) and (lengths.dtype != torch.uint8 or lengths.dim() != 1):
        raise _fail(f"the code-length table must be 1-D uint8, got {lengths.dim()}-D {lengths.dtype}")
    arr = _as_numpy(lengths)
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise _fail(f"the code-length table must be 1-D uint8, got {arr.ndim}-D {arr.dtype}")
    if arr.size > MAX_ALPHABET:
        raise _fail(f"the code-length table has {arr.size} symbols, above {MAX_ALPHABET}")
    if arr.size and int(arr.max()) > MAX_CODE_BITS:
        raise _fail(f"a code length of {int(arr.max())} bits is above the {MAX_CODE_BITS}-bit limit")
    used = arr[arr > 0].astype(np.int64)
    kraft = int((np.int64(1) << (MAX_CODE_BITS - used)).sum())
    if kraft > (1 << MAX_CODE_BITS):
        raise _fail("the code lengths are not those of a prefix code (their Kraft sum is above 1)")
    return arr


def canonical_codes(lengths) -> np.ndarray:
    """Canonical code of each symbol (uint32; meaningful where its length is > 0): symbols sorted by
    (length, symbol) get consecutive codes, the code growing by a shift wherever the length grows."""
    arr = check_lengths(lengths)
    codes = np.zeros(arr.size, dtype=np.uint32)
    used = np.flatnonzero(arr)
    if used.size == 0:
        return codes
    order = used[np.lexsort((used, arr[used]))]
    ls = arr[order].astype(np.int64)
    # code_i = (code_{i-1} + 1) << (l_i - l_{i-1}), code_0 = 0: in closed form, the Kraft partial sums.
    steps = np.int64(1) << (MAX_CODE_BITS - ls)  # each code's share of the 16-bit code space
    starts = np.concatenate([[0], np.cumsum(steps)[:-1]])
    codes[order] = (starts >> (MAX_CODE_BITS - ls)).astype(np.uint32)
    return codes


def encoded_bits(counts, lengths) -> int:
    """Bits of the stream that `encode` writes for values with these symbol `counts`."""
    c = _as_numpy(counts).astype(np.int64).reshape(-1)
    lens = _as_numpy(lengths).astype(np.int64).reshape(-1)
    return int((c * lens[: c.size]).sum())


# -- encoding ----------------------------------------------------------------------------------------

def header_nbytes(count: int) -> int:
    """Bytes of the chunk table that heads the stream of `count` symbols: 2 per chunk of CHUNK."""
    return 2 * (-(-count // CHUNK))


def encode_symbols(values, alphabet: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stream, code lengths as uint8, one per symbol of `alphabet`) of integer `values` in [0, alphabet),
    the code built from their own counts: what a stored stream holds."""
    counts = np.bincount(_as_numpy(values).reshape(-1).astype(np.int64), minlength=alphabet)
    lengths = code_lengths(counts)
    return encode(values, lengths), torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.uint8))


def encode(values, lengths) -> torch.Tensor:
    """The canonical Huffman stream (1-D uint8) of integer `values` (any shape, row-major) under the
    code `lengths`: the chunk table (uint16 little-endian bit length of each run of CHUNK symbols),
    then the codes, MSB first, zero pad bits. Raises ValueError for a value without a code."""
    lens = check_lengths(lengths)
    v = _as_numpy(values).reshape(-1)
    if v.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"values must be integers, got {v.dtype}")
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= lens.size:
        raise ValueError(f"values span [{lo}, {hi}] but the alphabet is [0, {lens.size - 1}]")
    # int32 throughout when every bit offset fits (up to 2^27 symbols): half the memory traffic of int64.
    dt = np.int32 if v.size * MAX_CODE_BITS < (1 << 31) else np.int64
    codes = canonical_codes(lens).astype(dt)
    ln = lens.astype(dt)[v]
    if not ln.all():
        missing = np.unique(v[ln == 0])[:5].tolist()
        raise ValueError(f"symbols {missing} have no code (length 0); build the lengths from these values' counts")
    ends = np.cumsum(ln, dtype=dt)
    chunk_ends = np.concatenate([ends[CHUNK - 1::CHUNK], ends[-1:]] if v.size % CHUNK else [ends[CHUNK - 1::CHUNK]])
    chunk_bits = np.diff(chunk_ends, prepend=0).astype("<u2")
    total = int(ends[-1])
    starts = ends - ln
    nbytes = (total + 7) // 8
    # Each code in a 24-bit window starting at its first byte: 7 offset bits + 16 code bits fit.
    window = codes[v] << (24 - (starts & 7) - ln)
    first = starts >> 3
    # `first` never decreases: sum the windows of the codes that start in the same byte (reduceat).
    heads = np.flatnonzero(first[1:] != first[:-1]) + 1
    heads = np.concatenate([[0], heads])
    where = first[heads]
    out = np.zeros(nbytes + 2, dtype=np.int64)
    for j, shift in enumerate((16, 8, 0)):
        out[where + j] += np.add.reduceat((window >> shift) & 0xFF, heads)
    body = out[:nbytes].astype(np.uint8)
    return torch.from_numpy(np.concatenate([chunk_bits.view(np.uint8), body]))


# -- decoding ----------------------------------------------------------------------------------------

def _tables(lens: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(L, symbol, length) lookup over the next L bits, L the longest code. A bit pattern that starts
    no code (an incomplete code's hole) gives the symbol len(lens), outside the alphabet, and length 1."""
    codes = canonical_codes(lens).astype(np.int64)
    used = np.flatnonzero(lens)
    L = int(lens.max())
    ls = lens[used].astype(np.int64)
    span = np.int64(1) << (L - ls)  # table entries each code owns
    sym = np.full(1 << L, lens.size, dtype=np.int64)
    ln = np.ones(1 << L, dtype=np.int64)
    first = codes[used] << (L - ls)
    idx = np.repeat(first, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span))
    sym[idx] = np.repeat(used, span)
    ln[idx] = np.repeat(ls, span)
    return L, sym, ln


def decode(stream, lengths, count: int) -> torch.Tensor:
    """Invert `encode`: the `count` symbols (1-D int64) coded in `stream` (1-D uint8).

    Raises ArtifactError -- before allocating anything sized by `count` -- on a malformed table, a
    stream too short or too long for `count` codes, a chunk whose length is impossible or whose codes do
    not end where the chunk table says, a bit pattern that is no code, or non-zero pad bits. Work and
    memory are bounded by the stream's own size."""
    lens = check_lengths(lengths)
    try:
        if isinstance(count, bool):
            raise TypeError
        count = operator.index(count)
    except TypeError:
        raise _fail(f"count must be an integer, got {count!r}") from None
    if count < 0:
        raise _fail(f"count must be >= 0, got {count}")
    if isinstance(stream, torch.Tensor) and (stream.dtype != torch.uint8 or stream.dim() != 1):
        raise _fail(f"expected a 1-D uint8 stream, got {stream.dim()}-D {stream.dtype}")
    data = _as_numpy(stream)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise _fail(f"expected a 1-D uint8 stream, got {data.ndim}-D {data.dtype}")
    if count == 0:
        if data.size:
            raise _fail(f"no symbols, but {data.size} bytes")
        return torch.empty(0, dtype=torch.int64)
    used = lens[lens > 0]
    if used.size == 0:
        raise _fail(f"{count} symbols but the code table has no code")
    shortest, longest = int(used.min()), int(used.max())
    head = header_nbytes(count)
    # Python-int checks first: an absurd count fails here, before anything is allocated.
    if head + (count * shortest + 7) // 8 > data.size:
        raise _fail(f"truncated: {count} codes of at least {shortest} bits need at least "
                    f"{head + (count * shortest + 7) // 8} bytes, got {data.size}")
    if data.size > head + (count * longest + 7) // 8:
        raise _fail(f"too long: {count} codes of at most {longest} bits take at most "
                    f"{head + (count * longest + 7) // 8} bytes, got {data.size}")
    sizes = np.full(head // 2, CHUNK, dtype=np.int64)
    sizes[-1] = count - CHUNK * (sizes.size - 1)
    chunk_bits = data[:head].view("<u2").astype(np.int64)
    if (chunk_bits < sizes * shortest).any() or (chunk_bits > sizes * longest).any():
        bad = int(np.argmax((chunk_bits < sizes * shortest) | (chunk_bits > sizes * longest)))
        raise _fail(f"chunk {bad} claims {int(chunk_bits[bad])} bits for {int(sizes[bad])} codes of "
                    f"{shortest} to {longest} bits")
    ends = np.cumsum(chunk_bits)
    total = int(ends[-1])
    body = data[head:]
    if body.size != (total + 7) // 8:
        what = "too long" if body.size > (total + 7) // 8 else "truncated"
        raise _fail(f"{what}: the chunk table adds up to {total} bits ({(total + 7) // 8} bytes), the stream holds {body.size}")
    if total & 7 and int(body[-1]) & ((1 << (8 - (total & 7))) - 1):
        raise _fail(f"pad bits of the last byte are not zero (byte 0x{int(body[-1]):02x})")

    L, lut_sym, lut_len = _tables(lens)
    # A corrupt chunk may run past its end by up to 16 bits per step: zero bytes cover the overrun.
    padded = np.concatenate([body, np.zeros(2 * CHUNK + 4, dtype=np.uint8)]).astype(np.int64)
    w24 = (padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]  # the 24 bits from each byte on
    starts = ends - chunk_bits
    full = count // CHUNK
    out = np.empty(count, dtype=np.int64)
    finals = []
    if full:
        rows, pos = _lockstep(w24, starts[:full], CHUNK, L, lut_sym, lut_len)
        out[: full * CHUNK] = rows.reshape(-1)
        finals.append(pos)
    if count % CHUNK:
        rows, pos = _lockstep(w24, starts[full:], count % CHUNK, L, lut_sym, lut_len)
        out[full * CHUNK:] = rows.reshape(-1)
        finals.append(pos)
    if int(out.max()) >= lens.size:
        raise _fail(f"a bit pattern near symbol {int(np.argmax(out >= lens.size))} is not a code of the table")
    final = np.concatenate(finals)
    if (final != ends).any():
        bad = int(np.argmax(final != ends))
        raise _fail(f"the codes of chunk {bad} end at bit {int(final[bad])}, the chunk table says {int(ends[bad])}")
    return torch.from_numpy(out)


def _lockstep(w24: np.ndarray, starts: np.ndarray, steps: int, L: int, lut_sym: np.ndarray, lut_len: np.ndarray):
    """Decode `steps` codes from each start (bit position) at once; returns ((chunks, steps) symbols,
    the bit position after each chunk's last code)."""
    pos = starts.copy()
    out = np.empty((steps, pos.size), dtype=np.int64)
    mask = (1 << L) - 1
    base = 24 - L
    for k in range(steps):
        win = (w24[pos >> 3] >> (base - (pos & 7))) & mask
        out[k] = lut_sym[win]
        pos += lut_len[win]
    return out.T, pos

"""Dense bit packing of 1..16-bit integers into a uint8 stream (format: docs/codec.md).

Value i occupies bits [i*b, (i+1)*b) of the stream, least significant bit first; stream bit k is bit
(k % 8) of byte k // 8. Signed values are stored as b-bit two's complement. Pad bits are zero.

Both directions work on groups of g = 8 / gcd(b, 8) values, the smallest run that fills whole bytes
(b*g/8 of them): a group is a fixed little pattern of shifts, so one vectorised torch op per
(value slot, byte) pair -- at most 8 x 3 ops -- handles every group at once, with no loop over values.
"""

from __future__ import annotations

import math
import operator

import torch

from ..errors import ArtifactError

__all__ = ["MAX_BITS", "pack", "unpack", "packed_nbytes", "unpacked_dtype"]

MAX_BITS = 16

# Unsigned dtypes without min/max (and most other) kernels in torch: widened to int64 first.
_WIDEN = {torch.uint16, torch.uint32}


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take: ceil(count * bits / 8)."""
    if count < 0 or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"packed_nbytes needs count >= 0 and bits in 1..{MAX_BITS}, got count={count}, bits={bits}")
    return (count * bits + 7) // 8


def unpacked_dtype(bits: int, signed: bool) -> torch.dtype:
    """The dtype `unpack` returns: the smallest that holds the range. Unsigned 9..16 bits get int32
    rather than torch.uint16, which most torch ops do not support."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed else torch.int32


def _value_range(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _min_max(flat: torch.Tensor) -> tuple[int, int]:
    """Exact (min, max) of a non-empty integer or bool tensor (not uint16/uint32), as Python ints."""
    if flat.dtype == torch.uint64:
        # No min/max kernels and no wider signed type: reinterpret as int64, where values >= 2**63
        # turn negative (their order among themselves is preserved, offset by 2**64).
        s = flat.view(torch.int64)
        neg, nonneg = s[s < 0], s[s >= 0]
        lo = int(nonneg.min()) if nonneg.numel() else int(neg.min()) + (1 << 64)
        hi = int(neg.max()) + (1 << 64) if neg.numel() else int(nonneg.max())
        return lo, hi
    lo, hi = torch.aminmax(flat)
    return int(lo), int(hi)


def _group(bits: int) -> tuple[int, int]:
    """(values, bytes) per group: the smallest run of values that ends on a byte boundary."""
    g = 8 // math.gcd(bits, 8)
    return g, g * bits // 8


def _work_dtype(bits: int) -> torch.dtype:
    # Narrowest dtype that holds a value shifted into place (less memory traffic is most of the speed):
    # 1, 2, 4, 8 never straddle a byte (uint8); otherwise up to bits + 7 bits (int16 to 8 bits).
    if 8 % bits == 0:
        return torch.uint8
    return torch.int16 if bits <= 8 else torch.int32


def pack(values: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer `values` (any shape, read in row-major order; any integer dtype or bool) into a
    1-D uint8 tensor of ceil(n * bits / 8) bytes on the same device.

    Raises ValueError when bits is not in 1..16, values are not integers, or a value lies outside the
    range of a `bits`-wide signed/unsigned integer.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex:
        raise ValueError(f"values must have an integer dtype, got {values.dtype}; round and convert first")
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    if flat.dtype in _WIDEN:
        flat = flat.to(torch.int64)

    lo, hi = _value_range(bits, signed)
    vmin, vmax = _min_max(flat)
    if vmin < lo or vmax > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values span [{vmin}, {vmax}] but a {bits}-bit {kind} integer holds [{lo}, {hi}]")
    if flat.dtype == torch.uint64:
        flat = flat.view(torch.int64)  # all < 2**16 now, so the reinterpretation is exact

    mask = (1 << bits) - 1
    if bits == 8:
        # Casting to int8/uint8 keeps the low 8 bits: exactly two's complement.
        return flat.to(torch.int8 if signed else torch.uint8, copy=True).view(torch.uint8)

    g, nb = _group(bits)
    m = -(-n // g)  # groups
    work = _work_dtype(bits)
    # `& mask` keeps the low `bits` bits: two's complement for negative values.
    u = flat.to(work) & mask
    if m * g != n:
        # Zero values in the last group give zero pad bits.
        u = torch.cat([u, u.new_zeros(m * g - n)])
    u = u.view(m, g)

    out = torch.zeros((m, nb), dtype=work, device=values.device)
    for k in range(g):
        first, shift = divmod(k * bits, 8)
        last = (k * bits + bits - 1) // 8
        part = u[:, k] << shift  # uint8 path: shift + bits <= 8, never overflows
        for j in range(first, last + 1):
            out[:, j] |= part >> (8 * (j - first))  # bits above 7 are masked off below
    if work != torch.uint8:
        out = (out & 0xFF).to(torch.uint8)
    # The last group may hold whole bytes past the stream (all zero); ceil(n*bits/8) is the length.
    return _compact(out.view(-1), packed_nbytes(n, bits))


def _compact(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n elements of 1-D `t`, in storage of their own (a slice would keep the whole
    buffer alive, and serialisers may write or reject the hidden tail)."""
    return t if t.numel() == n else t[:n].clone()


def _fail(msg: str) -> ArtifactError:
    return ArtifactError(f"bit-packed data is corrupt or truncated: {msg}")


def unpack(packed: torch.Tensor, bits: int, signed: bool, count: int) -> torch.Tensor:
    """Invert `pack`: read `count` values of `bits` bits from `packed` (1-D uint8).

    Returns a 1-D tensor of dtype `unpacked_dtype(bits, signed)` (int8 / uint8 for <= 8 bits, int16
    signed / int32 unsigned above) on `packed`'s device.

    Raises ArtifactError -- before allocating anything -- when bits is not in 1..16, count is not a
    non-negative integer, `packed` is not 1-D uint8, its length is not exactly ceil(count*bits/8), or
    its pad bits are not zero. Every buffer this accepts is one that `pack` produces.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise _fail(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    try:
        if isinstance(count, bool):
            raise TypeError
        count = operator.index(count)
    except TypeError:
        raise _fail(f"count must be an integer, got {count!r}") from None
    if count < 0:
        raise _fail(f"count must be >= 0, got {count}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise _fail(f"expected a 1-D uint8 tensor, got {packed.dim()}-D {packed.dtype}")
    # Exact length, checked on Python ints: an absurd count (2**62) fails here, never allocates.
    need = packed_nbytes(count, bits)
    if packed.numel() != need:
        what = "truncated" if packed.numel() < need else "too long"
        raise _fail(f"{what}: {count} values of {bits} bits take {need} bytes, got {packed.numel()}")
    tail = (count * bits) % 8
    if tail and int(packed[-1]) >> tail:
        raise _fail(f"pad bits of the last byte are not zero (byte 0x{int(packed[-1]):02x}, {8 - tail} pad bits)")

    out_dtype = unpacked_dtype(bits, signed)
    if count == 0:
        return torch.empty(0, dtype=out_dtype, device=packed.device)
    if bits == 8:
        return packed.view(torch.int8).clone() if signed else packed.clone()

    g, nb = _group(bits)
    m = -(-count // g)
    data = packed.contiguous()
    if m * nb != need:
        data = torch.cat([data, data.new_zeros(m * nb - need)])  # less than one group: at most 14 zero bytes
    work = _work_dtype(bits)
    data = data.view(m, nb).to(work)

    mask = (1 << bits) - 1
    vals = torch.empty((m, g), dtype=work, device=packed.device)
    for k in range(g):
        first, shift = divmod(k * bits, 8)
        last = (k * bits + bits - 1) // 8
        v = data[:, first]
        for j in range(first + 1, last + 1):
            v = v | (data[:, j] << (8 * (j - first)))
        vals[:, k] = (v >> shift) & mask
    flat = _compact(vals.view(-1), count)
    if signed:
        if work == torch.uint8:
            # Move the sign bit to bit 7, reinterpret as int8, shift back: arithmetic shift sign-extends.
            up = 8 - bits
            flat = (flat << up).view(torch.int8) >> up
        else:
            half = 1 << (bits - 1)
            flat = (flat ^ half) - half  # maps [0, 2^b) onto [-2^(b-1), 2^(b-1)) as two's complement
    return flat.to(out_dtype)

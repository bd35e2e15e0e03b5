"""Bit packing (docs/codec.md): exact round trips for every width, the documented bit order checked
byte by byte and against a plain-Python reference, exact sizes, zero pad bits, range errors, and
corrupt input (truncated, absurd counts, random bytes) that must end in ArtifactError, nothing else."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from shrinktunnel.codec import MAX_BITS, pack, packed_nbytes, unpack, unpacked_dtype
from shrinktunnel.errors import ArtifactError

BITS = list(range(1, MAX_BITS + 1))
LENGTHS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1001]


def _range(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _random_values(bits, signed, n, seed, dtype=torch.int64):
    """n values drawn uniformly from the range, with its two extremes planted when n allows."""
    lo, hi = _range(bits, signed)
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(lo, hi + 1, (n,), generator=g, dtype=torch.int64)
    if n >= 2:
        v[0], v[-1] = lo, hi
    return v.to(dtype)


def _reference_pack(values, bits):
    """The format as one Python integer: value i, as b-bit two's complement, at bit i*b; bytes little-endian."""
    stream = 0
    for i, v in enumerate(values):
        stream |= (v & ((1 << bits) - 1)) << (i * bits)
    return list(stream.to_bytes(packed_nbytes(len(values), bits), "little"))


def _check_round_trip(v, bits, signed):
    n = v.numel()
    p = pack(v, bits, signed)
    assert p.dtype == torch.uint8 and p.dim() == 1
    assert p.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    if (n * bits) % 8:
        assert int(p[-1]) >> ((n * bits) % 8) == 0, "pad bits must be zero"
    u = unpack(p, bits, signed, n)
    assert u.dtype == unpacked_dtype(bits, signed) and u.shape == (n,)
    assert torch.equal(u.to(torch.int64), v.reshape(-1).to(torch.int64))
    # Own, exactly sized storage: no hidden tail for a serialiser to write or reject.
    assert p.untyped_storage().nbytes() == p.nbytes and u.untyped_storage().nbytes() == u.nbytes
    return p


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_every_width_and_awkward_lengths(bits, signed):
    for n in LENGTHS:
        _check_round_trip(_random_values(bits, signed, n, seed=n), bits, signed)
    # Every representable value once, in both orders (exhaustive for the range).
    lo, hi = _range(bits, signed)
    every = torch.arange(lo, hi + 1)
    _check_round_trip(every, bits, signed)
    _check_round_trip(every.flip(0), bits, signed)


@settings(max_examples=400, deadline=None)
@given(bits=hs.integers(1, MAX_BITS), signed=hs.booleans(), n=hs.integers(0, 300), seed=hs.integers(0, 2**31))
def test_round_trip_property_matches_reference(bits, signed, n, seed):
    v = _random_values(bits, signed, n, seed)
    p = _check_round_trip(v, bits, signed)
    assert p.tolist() == _reference_pack(v.tolist(), bits)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_every_integer_input_dtype_packs_the_same(dtype):
    signed = dtype.is_signed
    for bits in (1, 3, 4, 7, 8) + ((12, 16) if dtype.itemsize >= 2 else ()):
        v = _random_values(bits, signed, 37, seed=bits, dtype=dtype)
        assert pack(v, bits, signed).tolist() == _reference_pack(v.to(torch.int64).tolist(), bits)
        _check_round_trip(v, bits, signed)


def test_bool_input_packs_as_one_bit_unsigned():
    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    assert pack(mask, 1, False).tolist() == [0b00001101, 0b00000001]
    assert torch.equal(unpack(pack(mask, 1, False), 1, False, 9), mask.to(torch.uint8))


def test_any_shape_and_layout_packs_in_row_major_order():
    v = _random_values(5, True, 60, seed=3).view(3, 4, 5)
    flat = pack(v.reshape(-1), 5, True)
    assert torch.equal(pack(v, 5, True), flat)
    t = v.view(12, 5).t()  # non-contiguous
    assert torch.equal(pack(t, 5, True), pack(t.contiguous(), 5, True))


def test_results_never_alias_their_inputs():
    v = torch.tensor([1, 2, 3], dtype=torch.uint8)
    p = pack(v, 8, False)
    p[0] = 99
    assert v.tolist() == [1, 2, 3]
    u = unpack(p, 8, False, 3)
    u[1] = 77
    assert p.tolist() == [99, 2, 3]


def test_large_inputs_round_trip():
    # Speed is measured by benchmarks/bitpack_speed.py, not here.
    for bits, signed in ((4, True), (3, False), (12, True)):
        v = _random_values(bits, signed, 2_000_000, seed=bits)
        u = unpack(pack(v, bits, signed), bits, signed, v.numel())
        assert torch.equal(u.to(torch.int64), v)


# ------------------------------------------------------------------------------------------------
# The documented bit order, byte by byte (the examples of docs/codec.md)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, bits, signed, expected",
    [
        ([1, 2, 3], 2, False, [0x39]),  # 01 | 10 << 2 | 11 << 4 = 0b00111001
        ([-1], 3, True, [0x07]),  # 111, pad bits 3..7 zero
        ([-1, -1, -1], 3, True, [0xFF, 0x01]),  # 9 ones: one full byte, then bit 0 of the next
        ([1, 2, 3, 4, 5], 3, False, [0xD1, 0x58]),  # the worked example: value 2 straddles bytes 0 and 1
        ([-1, 2, -4], 3, True, [0x17, 0x01]),
        ([1, 2], 4, False, [0x21]),  # low nibble first
        ([-8, 7], 4, True, [0x78]),
        ([-1, 0, 1], 8, True, [0xFF, 0x00, 0x01]),
        ([0xABC, 0x123], 12, False, [0xBC, 0x3A, 0x12]),
        ([0x1234], 16, False, [0x34, 0x12]),  # little-endian
        ([-2, -32768], 16, True, [0xFE, 0xFF, 0x00, 0x80]),
        ([], 7, True, []),
    ],
)
def test_known_answers(values, bits, signed, expected):
    v = torch.tensor(values, dtype=torch.int64)
    assert pack(v, bits, signed).tolist() == expected
    assert unpack(torch.tensor(expected, dtype=torch.uint8), bits, signed, len(values)).tolist() == values


@pytest.mark.parametrize(
    "bits, signed, dtype",
    [(1, False, torch.uint8), (4, True, torch.int8), (8, False, torch.uint8), (8, True, torch.int8),
     (9, True, torch.int16), (9, False, torch.int32), (16, True, torch.int16), (16, False, torch.int32)],
)
def test_unpack_dtype_is_the_smallest_that_holds_the_range(bits, signed, dtype):
    assert unpacked_dtype(bits, signed) == dtype
    lo, hi = _range(bits, signed)
    u = unpack(pack(torch.tensor([lo, hi]), bits, signed), bits, signed, 2)
    assert u.dtype == dtype and u.tolist() == [lo, hi]
    assert unpack(torch.empty(0, dtype=torch.uint8), bits, signed, 0).dtype == dtype


def test_int4_costs_half_of_int8():
    v = _random_values(4, True, 1000, seed=0)
    assert pack(v, 4, True).numel() * 2 == pack(v, 8, True).numel() == 1000
    assert [packed_nbytes(n, 3) for n in (0, 1, 2, 3, 8, 9)] == [0, 1, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# Bad values for pack: ValueError
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_values_raise_value_error_naming_the_range(bits, signed):
    lo, hi = _range(bits, signed)
    with pytest.raises(ValueError, match=rf"span \[{lo}, {hi + 1}\].*holds \[{lo}, {hi}\]"):
        pack(torch.tensor([lo, hi + 1]), bits, signed)
    with pytest.raises(ValueError, match=rf"span \[{lo - 1}, {hi}\].*holds \[{lo}, {hi}\]"):
        pack(torch.tensor([hi, lo - 1]), bits, signed)


def test_out_of_range_in_unsigned_wide_dtypes():
    with pytest.raises(ValueError, match=r"span \[3, 18446744073709551615\]"):
        pack(torch.tensor([2**64 - 1, 3], dtype=torch.uint64), 16, True)
    with pytest.raises(ValueError, match=r"span \[9223372036854775808, 9223372036854775808\]"):
        pack(torch.tensor([2**63], dtype=torch.uint64), 16, False)
    with pytest.raises(ValueError, match=r"span \[0, 70000\]"):
        pack(torch.tensor([0, 70000], dtype=torch.uint32), 16, False)


@pytest.mark.parametrize("bits", [0, 17, -1, True, 4.0, "4"])
def test_pack_rejects_bad_widths(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        pack(torch.tensor([0]), bits, False)


def test_pack_rejects_float_values():
    with pytest.raises(ValueError, match="integer dtype"):
        pack(torch.tensor([1.0]), 4, False)


# ------------------------------------------------------------------------------------------------
# Corrupt input for unpack: ArtifactError, before allocating anything
# ------------------------------------------------------------------------------------------------
def test_truncated_and_overlong_buffers_raise_artifact_error():
    p = pack(_random_values(5, True, 100, seed=1), 5, True)  # 63 bytes
    with pytest.raises(ArtifactError, match=r"truncated: 100 values of 5 bits take 63 bytes, got 62"):
        unpack(p[:-1], 5, True, 100)
    with pytest.raises(ArtifactError, match="truncated"):
        unpack(p[:0], 5, True, 1)
    with pytest.raises(ArtifactError, match="too long"):
        unpack(torch.cat([p, p[:1]]), 5, True, 100)
    with pytest.raises(ArtifactError, match="truncated"):
        unpack(p, 5, True, 101)  # a count that does not match the buffer


def test_nonzero_pad_bits_raise_artifact_error():
    p = pack(torch.tensor([1, 2, 3]), 3, False).clone()  # 9 bits: 7 pad bits in byte 1
    p[1] |= 0x80
    with pytest.raises(ArtifactError, match="pad bits"):
        unpack(p, 3, False, 3)


def test_absurd_count_fails_fast_without_allocating(monkeypatch):
    def no_alloc(*args, **kwargs):
        raise AssertionError("allocated before checking the length")

    for name in ("empty", "zeros", "cat"):
        monkeypatch.setattr(torch, name, no_alloc)
    buf = torch.tensor([1, 2, 3], dtype=torch.uint8)
    for count in (2**62, 2**100, 25):
        for bits in (1, 4, 8, 16):
            with pytest.raises(ArtifactError, match="truncated"):
                unpack(buf, bits, True, count)


@pytest.mark.parametrize(
    "bits, count, packed, match",
    [
        (0, 1, torch.zeros(1, dtype=torch.uint8), "bits must be an integer in 1..16"),
        (17, 1, torch.zeros(3, dtype=torch.uint8), "bits must be an integer in 1..16"),
        (True, 1, torch.zeros(1, dtype=torch.uint8), "bits must be"),
        (4, -1, torch.zeros(0, dtype=torch.uint8), "count must be >= 0"),
        (4, 2.0, torch.zeros(1, dtype=torch.uint8), "count must be an integer"),
        (4, "2", torch.zeros(1, dtype=torch.uint8), "count must be an integer"),
        (4, None, torch.zeros(1, dtype=torch.uint8), "count must be an integer"),
        (4, 2, torch.zeros(1, dtype=torch.int8), "1-D uint8"),
        (4, 2, torch.zeros(1, 1, dtype=torch.uint8), "1-D uint8"),
        (4, 2, torch.zeros((), dtype=torch.uint8), "1-D uint8"),
    ],
)
def test_bad_unpack_arguments_raise_artifact_error(bits, count, packed, match):
    with pytest.raises(ArtifactError, match=match):
        unpack(packed, bits, True, count)


def test_count_may_be_any_integer_like():
    p = pack(torch.tensor([3, 1]), 2, False)
    assert unpack(p, 2, False, torch.tensor(2)).tolist() == [3, 1]


@hs.composite
def _corrupt_inputs(draw):
    """(bytes, bits, count): widths and counts valid or not, buffers mostly near the right length so
    that both outcomes (values, ArtifactError) are common."""
    bits = draw(hs.one_of(hs.integers(1, MAX_BITS), hs.integers(-2, 18)))
    count = draw(hs.one_of(hs.integers(0, 700), hs.integers(-(2**70), 2**70)))
    size = draw(hs.integers(0, 80))
    if 1 <= bits <= MAX_BITS and 0 <= count <= 700 and draw(hs.integers(0, 3)):
        size = max(0, packed_nbytes(count, bits) + draw(hs.sampled_from([0, 0, 0, -1, 1, -2, 2])))
    return draw(hs.binary(min_size=size, max_size=size)), bits, count


@settings(max_examples=800, deadline=None)
@given(case=_corrupt_inputs(), signed=hs.booleans())
def test_fuzz_random_bytes_return_count_values_or_raise_artifact_error(case, signed):
    data, bits, count = case
    packed = torch.tensor(list(data), dtype=torch.uint8)
    try:
        out = unpack(packed, bits, signed, count)
    except ArtifactError:
        return  # the only acceptable failure
    assert 1 <= bits <= MAX_BITS and count >= 0
    assert out.shape == (count,) and out.dtype == unpacked_dtype(bits, signed)
    lo, hi = _range(bits, signed)
    if count:
        assert lo <= int(out.min()) and int(out.max()) <= hi
    assert pack(out, bits, signed).tolist() == list(data)  # every accepted buffer is canonical


@settings(max_examples=300, deadline=None)
@given(bits=hs.integers(1, MAX_BITS), count=hs.integers(0, 400), signed=hs.booleans(), seed=hs.integers(0, 2**31))
def test_fuzz_bytes_of_the_right_length_decode_to_their_own_packing(bits, count, signed, seed):
    # Random bytes of exactly the right length with the pad bits cleared are a valid stream.
    n = packed_nbytes(count, bits)
    packed = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    if (count * bits) % 8:
        packed[-1] &= (1 << ((count * bits) % 8)) - 1
    out = unpack(packed, bits, signed, count)
    assert out.shape == (count,)
    assert torch.equal(pack(out, bits, signed), packed)

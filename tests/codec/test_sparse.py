"""codec.sparse: relative-index and bitmask encodings of sparse tensors; exact round trips, the
cheaper encoding chosen, corrupt input rejected with ArtifactError before a dense tensor is allocated."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shrinktunnel.codec import pack
from shrinktunnel.codec.sparse import (
    best_index_bits,
    choose_encoding,
    decode_relative,
    decode_sparse,
    encode_relative,
    encode_sparse,
    is_filler,
    relative_entries,
)
from shrinktunnel.errors import ArtifactError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def position_sets(draw, max_n: int = 600):
    n = draw(st.integers(0, max_n))
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    # Also very sparse sets with long gaps, where fillers matter.
    if n and draw(st.booleans()):
        keep = [k and draw(st.integers(0, 30)) == 0 for k in keep]
    return torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.int64), n


# -- the relative index -------------------------------------------------------------------------------

def test_worked_example_with_fillers():
    # n = 24, 3-bit codes (M = 7): gaps 2, 3, 16 -> codes 1, 2, then two fillers (7, 7) and 16 - 1 - 14 = 1;
    # 3 trailing pruned entries are fewer than M, so no trailing filler.
    codes = encode_relative(torch.tensor([1, 4, 20]), 24, 3)
    assert codes.tolist() == [1, 2, 7, 7, 1]
    assert is_filler(codes, 3).tolist() == [False, False, True, True, False]
    assert decode_relative(codes, 24, 3).tolist() == [1, 4, 20]
    # 10 trailing pruned entries: one filler covers 7 of them.
    assert encode_relative(torch.tensor([1, 4, 20]), 31, 3).tolist() == [1, 2, 7, 7, 1, 7]
    # Nothing kept: fillers only.
    assert encode_relative(torch.tensor([], dtype=torch.int64), 15, 3).tolist() == [7, 7]


@FAST
@given(position_sets(), st.integers(1, 16))
def test_relative_round_trip(ps, bits):
    positions, n = ps
    codes = encode_relative(positions, n, bits)
    assert codes.numel() == relative_entries(positions, n, bits)
    assert bool(((codes >= 0) & (codes <= (1 << bits) - 1)).all())
    assert int((~is_filler(codes, bits)).sum()) == positions.numel()
    assert torch.equal(decode_relative(codes, n, bits), positions)
    # Through the bit packer, as stored.
    from shrinktunnel.codec import unpack

    assert torch.equal(decode_relative(unpack(pack(codes, bits, False), bits, False, codes.numel()), n, bits), positions)


@FAST
@given(st.lists(st.integers(0, 7), max_size=40), st.integers(0, 400))
def test_every_accepted_stream_is_canonical(codes, n):
    """A stream the decoder accepts is exactly what the encoder writes for its positions: one encoding
    per position set, so nothing a reader accepts can hide extra data or be read two ways."""
    codes_t = torch.tensor(codes, dtype=torch.int64)
    try:
        positions = decode_relative(codes_t, n, 3)
    except ArtifactError:
        return
    assert torch.equal(encode_relative(positions, n, 3), codes_t)


@FAST
@given(position_sets(max_n=300))
def test_best_index_bits_is_the_cheapest(ps):
    positions, n = ps
    bits, nbytes = best_index_bits(positions, n)
    sizes = {b: -(-relative_entries(positions, n, b) * b // 8) for b in range(1, 17)}
    assert nbytes == sizes[bits] == min(sizes.values())
    assert bits == min(b for b, s in sizes.items() if s == nbytes)


def test_encoder_rejects_bad_positions():
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_relative(torch.tensor([3, 3]), 10, 4)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        encode_relative(torch.tensor([2, 10]), 10, 4)
    with pytest.raises(ValueError, match="index_bits"):
        encode_relative(torch.tensor([2]), 10, 17)


def test_decoder_rejects_corrupt_streams():
    with pytest.raises(ArtifactError, match="outside"):
        decode_relative(torch.tensor([0, 9]), 20, 3)  # 9 does not fit 3 bits
    with pytest.raises(ArtifactError, match="past the end"):
        decode_relative(torch.tensor([5, 5]), 8, 3)  # positions 5 and 11 in 8 entries
    with pytest.raises(ArtifactError, match="canonical"):
        decode_relative(torch.tensor([0]), 9, 3)  # 8 trailing entries need a filler
    with pytest.raises(ArtifactError, match="describe at most"):
        decode_relative(torch.tensor([0]), 1 << 40, 3)  # checked on integers, nothing allocated


# -- tensors -----------------------------------------------------------------------------------------

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


@FAST
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=3),
    st.sampled_from(list(_BITS)),
    st.floats(0.0, 1.0),
    st.sampled_from(["auto", "bitmask", "relative"]),
    st.integers(0, 2**31 - 1),
)
def test_sparse_round_trip_is_bit_exact(shape, dtype, density, encoding, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    if t.numel():
        t.view(-1)[0] = -0.0  # a kept -0.0 and a kept NaN survive bit for bit
        t.view(-1)[-1] = float("nan")
    mask = torch.rand(shape, generator=g) < density
    values, index, spec = encode_sparse(t, mask, encoding=encoding)
    assert index.dtype == torch.uint8 and index.dim() == 1 and values.dtype == dtype
    assert values.numel() == spec["kept"] == int(mask.sum())
    expected = torch.where(mask, t, torch.zeros((), dtype=dtype))
    assert _same_bits(decode_sparse(values, index, spec), expected)


def test_auto_picks_the_cheaper_encoding():
    n = 10_000
    dense_mask = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5  # half kept: bitmask wins
    sparse_mask = torch.zeros(n, dtype=torch.bool)
    sparse_mask[::97] = True  # 1 % kept: a relative index wins
    for mask, expected in ((dense_mask, "bitmask"), (sparse_mask, "relative")):
        positions = torch.nonzero(mask).reshape(-1)
        enc, bits, nbytes = choose_encoding(n, positions)
        _, index, spec = encode_sparse(torch.randn(n), mask)
        assert enc == spec["encoding"] == expected and index.numel() == nbytes
        assert nbytes == min(choose_encoding(n, positions, "bitmask")[2], best_index_bits(positions, n)[1])
    # 1 % kept with gaps of 97: a 7-bit code per kept weight beats one bit per weight by far.
    assert choose_encoding(n, torch.nonzero(sparse_mask).reshape(-1))[2] < n / 8 / 5


def _good():
    t = torch.randn(8, 16)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, ::5] = True
    return t, mask


@pytest.mark.parametrize("encoding", ["bitmask", "relative"])
def test_decode_sparse_rejects_corrupt_input(encoding):
    t, mask = _good()
    values, index, spec = encode_sparse(t, mask, encoding=encoding)
    bad_cases = [
        (values, index[:-1], spec, "bytes"),
        (values[:-1], index, spec, "one value per kept"),
        (values, index, {**spec, "kept": spec["kept"] + 1}, "kept|one value"),
        (values, index, {**spec, "encoding": "zip"}, "encoding"),
        (values, index.to(torch.int8), spec, "uint8"),
        (values, index, {**spec, "shape": [8, "16"]}, "integer"),
    ]
    if encoding == "relative":
        bad_cases += [
            (values, index, {**spec, "index_bits": 0}, "index_bits"),
            # A gigantic shape with the same small stream: refused on integers, before any allocation.
            (values, index, {**spec, "shape": [1 << 20, 1 << 20]}, "cannot describe"),
        ]
    else:
        flipped = index.clone()
        flipped[0] ^= 0b10  # one more (or one fewer) kept weight than the values hold
        bad_cases.append((values, flipped, spec, "marks"))
        bad_cases.append((values, index, {**spec, "shape": [1 << 20, 1 << 20]}, "bytes"))
    for v, i, s, match in bad_cases:
        with pytest.raises(ArtifactError, match=match):
            decode_sparse(v, i, s)


@FAST
@given(st.binary(max_size=24), st.integers(0, 200), st.integers(0, 60), st.integers(1, 16),
       st.sampled_from(["bitmask", "relative"]), st.integers(0, 80))
def test_fuzzed_streams_decode_or_fail_cleanly(data, n, kept, bits, encoding, entries):
    """Random bytes under a random spec: either an ArtifactError or a tensor with exactly `kept`
    values at distinct positions inside the shape; never another exception."""
    index = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    spec = {"shape": [n], "encoding": encoding, "kept": kept, "index_bits": bits, "entries": entries}
    values = torch.arange(1, kept + 1, dtype=torch.float32)
    try:
        dense = decode_sparse(values, index, spec)
    except ArtifactError:
        return
    assert dense.shape == (n,) and sorted(dense[dense != 0].tolist()) == values.tolist()

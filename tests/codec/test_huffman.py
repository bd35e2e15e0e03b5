"""Canonical Huffman codec: exact round trips, optimal lengths, the documented bytes, and a decoder that
rejects every truncated or corrupt stream with ArtifactError (never a crash, hang or huge allocation)."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shrinktunnel.codec import huffman as H
from shrinktunnel.codec.entropy import entropy, entropy_bits, stream_stats
from shrinktunnel.errors import ArtifactError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def huffman_cost(counts) -> int:
    """Total bits of an unrestricted Huffman code (the classic heap construction): the reference."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


def kraft(lengths) -> float:
    return sum(2.0 ** -int(l) for l in lengths if l > 0)


# -- code lengths and canonical codes --------------------------------------------------------------

def test_worked_example_bytes():
    # docs/codec.md: counts (5, 2, 1, 1) -> lengths (1, 2, 3, 3) -> codes 0, 10, 110, 111.
    lengths = H.code_lengths([5, 2, 1, 1])
    assert lengths.tolist() == [1, 2, 3, 3]
    assert H.canonical_codes(lengths).tolist() == [0b0, 0b10, 0b110, 0b111]
    stream = H.encode(torch.tensor([0, 1, 2, 3, 0]), lengths)
    # header: one chunk of 10 bits (0x000A little-endian); body 0 10 110 111 0 -> 0101 1011 10(00 pad)
    assert stream.tolist() == [0x0A, 0x00, 0x5B, 0x80]
    assert H.decode(stream, torch.from_numpy(lengths), 5).tolist() == [0, 1, 2, 3, 0]


@FAST
@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=300))
def test_lengths_are_optimal_when_the_limit_does_not_bind(counts):
    lengths = H.code_lengths(counts)
    used = [c for c in counts if c > 0]
    assert all((l > 0) == (c > 0) for l, c in zip(lengths, counts))
    if not used:
        return
    assert kraft(lengths) <= 1.0
    if len(used) > 1 and int(lengths.max()) < H.MAX_CODE_BITS:
        assert H.encoded_bits(counts, lengths) == huffman_cost(counts)


def test_length_limit_binds_and_stays_optimal_and_complete():
    # Fibonacci counts make an unrestricted Huffman code 24 bits deep.
    fib = [1, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    lengths = H.code_lengths(fib)
    assert int(lengths.max()) == H.MAX_CODE_BITS
    assert kraft(lengths) == 1.0  # complete: no code space wasted
    assert H.encoded_bits(fib, lengths) >= huffman_cost(fib)
    # A tighter limit costs at least as much (package-merge is optimal for each limit).
    assert H.encoded_bits(fib, H.code_lengths(fib, max_bits=12)) >= H.encoded_bits(fib, lengths)
    assert int(H.code_lengths(fib, max_bits=12).max()) <= 12
    # Optimality under the limit: no single transfer of one bit between two symbols improves it.
    c = np.asarray(fib)
    base = H.encoded_bits(c, lengths)
    for i in range(len(c)):
        for j in range(len(c)):
            trial = lengths.astype(int).copy()
            trial[i] -= 1
            trial[j] += 1
            if i != j and trial[i] >= 1 and trial[j] <= 16 and kraft(trial) <= 1:
                assert (c * trial).sum() >= base


def test_single_symbol_and_empty():
    assert H.code_lengths([0, 7, 0]).tolist() == [0, 1, 0]
    assert H.code_lengths([0, 0]).tolist() == [0, 0]
    s = H.encode(torch.full((5000,), 1), H.code_lengths([0, 7, 0]))
    assert H.decode(s, H.code_lengths([0, 7, 0]), 5000).eq(1).all()
    assert H.encode(torch.empty(0, dtype=torch.int64), np.array([1, 1], np.uint8)).numel() == 0
    assert H.decode(torch.empty(0, dtype=torch.uint8), np.array([1, 1], np.uint8), 0).numel() == 0


# -- round trips ------------------------------------------------------------------------------------

@FAST
@given(alphabet=st.integers(1, 256), n=st.sampled_from([1, 2, 7, 2047, 2048, 2049, 4096, 5000]),
       skew=st.floats(0.05, 3.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(alphabet, n, skew, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, skew))
    values = rng.choice(alphabet, size=n, p=p)
    lengths = H.code_lengths(np.bincount(values, minlength=alphabet))
    stream = H.encode(torch.from_numpy(values), lengths)
    assert stream.dtype == torch.uint8 and stream.dim() == 1
    body_bits = H.encoded_bits(np.bincount(values, minlength=alphabet), lengths)
    assert stream.numel() == H.header_nbytes(n) + (body_bits + 7) // 8
    out = H.decode(stream, torch.from_numpy(lengths), n)
    assert torch.equal(out, torch.from_numpy(values).to(torch.int64))


def test_within_one_bit_of_entropy():
    rng = np.random.default_rng(0)
    values = np.clip(np.round(rng.normal(15.5, 4, 50_000)), 0, 31).astype(np.int64)
    counts = np.bincount(values, minlength=32)
    lengths = H.code_lengths(counts)
    per_symbol = H.encoded_bits(counts, lengths) / values.size
    assert entropy(counts) <= per_symbol < entropy(counts) + 1


def test_entropy_helpers():
    assert entropy([1, 1, 1, 1]) == 2.0
    assert entropy([10]) == 0.0 and entropy([]) == 0.0
    assert entropy_bits([2, 2]) == 4.0
    s = stream_stats([3, 1], stored_bits=4)
    assert s["symbols"] == 4 and s["bits_per_symbol"] == 1.0
    assert math.isclose(s["entropy_bits_per_symbol"], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert s["overhead"] > 0


# -- the decoder on bad input -----------------------------------------------------------------------

def _sample(n=3000, alphabet=20, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.choice(alphabet, size=n, p=rng.dirichlet(np.full(alphabet, 0.5)))
    lengths = H.code_lengths(np.bincount(values, minlength=alphabet))
    return values, lengths, H.encode(torch.from_numpy(values), lengths)


def test_every_truncation_is_rejected():
    values, lengths, stream = _sample(n=2100)
    for cut in range(stream.numel()):
        with pytest.raises(ArtifactError):
            H.decode(stream[:cut].clone(), lengths, values.size)
    with pytest.raises(ArtifactError, match="too long"):
        H.decode(torch.cat([stream, torch.zeros(3, dtype=torch.uint8)]), lengths, values.size)


def test_wrong_count_is_rejected():
    values, lengths, stream = _sample(n=2100)
    for count in (values.size - 1, values.size + 1, 0, 1):
        with pytest.raises(ArtifactError):
            H.decode(stream, lengths, count)


def test_absurd_count_fails_before_allocating():
    _, lengths, stream = _sample()
    with pytest.raises(ArtifactError, match="truncated"):
        H.decode(stream, lengths, 2**62)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ArtifactError):
            H.decode(stream, lengths, bad)


def test_bad_tables_are_rejected():
    values, lengths, stream = _sample()
    for table in (np.array([1, 1, 1], np.uint8), np.array([17, 1], np.uint8), lengths.astype(np.int32),
                  lengths.reshape(1, -1), np.zeros(lengths.size, np.uint8)):
        with pytest.raises(ArtifactError):
            H.decode(stream, table, values.size)
    with pytest.raises(ArtifactError):
        H.decode(stream.to(torch.int16), lengths, values.size)


def test_incomplete_code_hole_is_rejected():
    # Lengths (1, 2): codes 0 and 10; the pattern 11 is no code.
    lengths = np.array([1, 2], np.uint8)
    bad = torch.tensor([2, 0, 0b11000000], dtype=torch.uint8)  # one chunk of 2 bits: "11"
    with pytest.raises(ArtifactError, match="not a code"):
        H.decode(bad, lengths, 1)


def test_nonzero_pad_bits_are_rejected():
    lengths = np.array([1, 1], np.uint8)
    good = H.encode(torch.tensor([1, 0, 1]), lengths)  # 3 bits: 101, 5 pad bits
    assert H.decode(good, lengths, 3).tolist() == [1, 0, 1]
    bad = good.clone()
    bad[-1] |= 1
    with pytest.raises(ArtifactError, match="pad bits"):
        H.decode(bad, lengths, 3)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=600), count=st.integers(0, 5000),
       table=st.lists(st.integers(0, 17), min_size=1, max_size=40))
def test_fuzz_random_bytes_never_crash(data, count, table):
    stream = torch.tensor(list(data), dtype=torch.uint8)
    lengths = np.array(table, dtype=np.uint8)
    try:
        out = H.decode(stream, lengths, count)
    except ArtifactError:
        return
    assert out.numel() == count and out.dtype == torch.int64
    assert count == 0 or (int(out.min()) >= 0 and int(out.max()) < lengths.size and bool((torch.from_numpy(lengths)[out] > 0).all()))


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4))
def test_fuzz_bit_flips_give_an_error_or_valid_symbols(flips):
    values, lengths, stream = _sample(n=2300, seed=3)  # a full chunk and a short one
    bad = stream.clone()
    for at, bit in flips:
        bad[at % bad.numel()] ^= 1 << bit
    try:
        out = H.decode(bad, lengths, values.size)
    except ArtifactError:
        return
    assert out.numel() == values.size and int(out.max()) < lengths.size and bool((torch.from_numpy(lengths)[out] > 0).all())


def test_encode_rejects_values_without_code():
    with pytest.raises(ValueError, match="no code"):
        H.encode(torch.tensor([0, 2]), np.array([1, 1, 0], np.uint8))
    with pytest.raises(ValueError, match="alphabet"):
        H.encode(torch.tensor([0, 5]), np.array([1, 1], np.uint8))
    with pytest.raises(ValueError, match="integers"):
        H.encode(torch.tensor([0.5]), np.array([1, 1], np.uint8))

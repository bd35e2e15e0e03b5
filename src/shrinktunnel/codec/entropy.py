"""Shannon entropy of integer streams: the bound a memoryless coder of a stream cannot beat, printed
beside the bits a stream actually takes (how far a file is from the limit).

For a stream of n symbols with empirical probabilities p_s, the zeroth-order entropy is
H = -sum p_s log2 p_s bits per symbol, and n * H bits is the least any code that codes each symbol on
its own (Huffman, or arithmetic coding of the empirical frequencies) can spend on it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["counts_of", "entropy", "entropy_bits", "stream_stats"]


def counts_of(values, alphabet: int | None = None) -> np.ndarray:
    """Occurrences of each symbol 0..alphabet-1 in integer `values` (any shape)."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v.reshape(-1).astype(np.int64)
    if v.size and int(v.min()) < 0:
        raise ValueError("symbols must be non-negative integers")
    return np.bincount(v, minlength=alphabet or 0)


def entropy(counts) -> float:
    """Zeroth-order Shannon entropy, in bits per symbol, of a stream with these symbol counts
    (0.0 for an empty stream or a single symbol)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(max(0.0, -(p * np.log2(p)).sum()))


def entropy_bits(counts) -> float:
    """n * H: the least number of bits a memoryless code can spend on the whole stream."""
    c = np.asarray(counts, dtype=np.float64)
    return float(c.sum()) * entropy(c)


def stream_stats(counts, stored_bits: int) -> dict[str, Any]:
    """A stream's figures for a report: symbols, stored bits, entropy bound, and the gap between them."""
    n = int(np.asarray(counts).sum())
    h = entropy(counts)
    bound = n * h
    return {
        "symbols": n,
        "bits": int(stored_bits),
        "bits_per_symbol": stored_bits / n if n else 0.0,
        "entropy_bits_per_symbol": h,
        "entropy_bits": bound,
        # Relative overhead over the bound; 0 when both are 0 (a one-symbol stream costs nothing ideally).
        "overhead": (stored_bits / bound - 1.0) if bound > 0 else (0.0 if stored_bits == 0 else math.inf),
    }

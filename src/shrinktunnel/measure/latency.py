"""CPU latency: median of repeated runs after warm-up, with the thread count fixed and reported.

This machine has slow spells: compare contenders measured in the same run, alternated (see
`interleaved`), and never against a figure from another run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..core import data as D

__all__ = ["LatencyStats", "PairedRatio", "time_fn", "torch_latency", "onnx_latency", "interleaved", "paired_ratio"]


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    runs: int
    threads: int
    batch: int

    def to_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], *, warmup: int = 5, runs: int = 30, threads: int = 2, batch: int = 1) -> LatencyStats:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return LatencyStats(statistics.median(samples), samples[int(0.9 * (len(samples) - 1))], runs, threads, batch)


def torch_latency(model: nn.Module, inputs: D.Inputs, *, threads: int = 2, warmup: int = 5, runs: int = 30) -> LatencyStats:
    """Eager PyTorch latency of one forward on `inputs`, with `threads` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return time_fn(lambda: D.forward(model, inputs), warmup=warmup, runs=runs, threads=threads,
                           batch=D.batch_size(inputs))
    finally:
        torch.set_num_threads(previous)


def onnx_latency(session, feed: dict[str, np.ndarray], *, warmup: int = 5, runs: int = 30) -> LatencyStats:
    """ONNX Runtime latency of one `session.run` on `feed`; threads as the session was built."""
    threads = int(session.get_session_options().intra_op_num_threads or 0)
    batch = next(iter(feed.values())).shape[0] if feed else 1
    return time_fn(lambda: session.run(None, feed), warmup=warmup, runs=runs, threads=threads, batch=batch)


def interleaved(contenders: dict[str, Callable[[], LatencyStats]], rounds: int = 3) -> dict[str, LatencyStats]:
    """Measure each contender `rounds` times in alternation; keep each one's best median (the least
    disturbed by the machine's slow spells)."""
    best: dict[str, LatencyStats] = {}
    for _ in range(rounds):
        for name, measure in contenders.items():
            stats = measure()
            if name not in best or stats.median_ms < best[name].median_ms:
                best[name] = stats
    return best



@dataclass
class PairedRatio:
    """Latency of `a` over `b` from short blocks of runs alternated A B, B A, ...: each ratio compares
    two blocks measured a fraction of a second apart, so the machine's slow spells (seconds long) hit
    both sides of a pair alike."""

    ratio: float  # median of the per-pair ratios (median of a's block / median of b's block)
    low: float  # 95 % bootstrap interval of that median
    high: float
    a_ms: float  # medians of each side's timed runs
    b_ms: float
    pairs: int
    block: int

    def to_dict(self) -> dict:
        return asdict(self)


def paired_ratio(a: Callable[[], object], b: Callable[[], object], *, pairs: int = 30, block: int = 5,
                 warmup: int = 5, seed: int = 0) -> PairedRatio:
    """How much slower `a` is than `b` (ratio < 1: faster), measured in alternation; see PairedRatio.

    Each block starts with one untimed run: an ONNX Runtime session's thread pool spins for a while
    after its run, so the first run after switching sessions competes with the other pool's threads
    (alternating single runs measured a 10 % gap between two graphs whose kernels take equal time)."""
    if pairs < 2 or block < 1:
        raise ValueError(f"paired_ratio needs at least 2 pairs of blocks of at least 1 run, got {pairs} x {block}")
    for _ in range(warmup):
        a()
        b()

    def timed_block(fn: Callable[[], object]) -> list[float]:
        fn()  # untimed: the switch from the other contender
        out = []
        for _ in range(block):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    ta, tb, ratios = [], [], []
    for i in range(pairs):
        if i % 2:  # A B, then B A: neither side always runs second
            sb = timed_block(b)
            sa = timed_block(a)
        else:
            sa = timed_block(a)
            sb = timed_block(b)
        ta += sa
        tb += sb
        ratios.append(statistics.median(sa) / statistics.median(sb))
    r = np.asarray(ratios)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, pairs, size=(1000, pairs))], axis=1)
    return PairedRatio(float(np.median(r)), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)),
                       float(np.median(ta)), float(np.median(tb)), pairs, block)

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

__all__ = ["LatencyStats", "time_fn", "torch_latency", "onnx_latency", "interleaved"]


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


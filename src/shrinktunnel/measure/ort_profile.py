"""Where ONNX Runtime spends its time: kernel time per operator type, from its own profiler.

End-to-end latency says which model is faster; this says why. ONNX Runtime's profiler records every
node's kernel time; summed by operator type and divided by the runs, two graphs of the same model can
be compared op by op (an extra elementwise Mul per layer, a fusion that did not happen). Kernel times
exclude the executor's overhead between nodes, so their total is a little under the wall-clock latency.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..export.runtime import ort_session

__all__ = ["OpProfile", "op_profile"]


@dataclass
class OpProfile:
    ms_per_run: dict[str, float]  # operator type -> kernel milliseconds per run, largest first
    nodes_per_run: dict[str, int] = field(default_factory=dict)  # operator type -> nodes executed per run
    runs: int = 0

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_run.values())

    def to_dict(self) -> dict:
        return {"ms_per_run": self.ms_per_run, "nodes_per_run": self.nodes_per_run, "runs": self.runs,
                "total_ms": self.total_ms}


def op_profile(path: str | os.PathLike, feed: dict[str, np.ndarray], *, runs: int = 30, warmup: int = 5,
               threads: int = 2, disabled_optimizers: tuple[str, ...] = ()) -> OpProfile:
    """Kernel time per operator type of the ONNX model at `path` on `feed`, in a session built as
    `ort_session` builds it (so the graph profiled is the graph measured). Warm-up runs are left out."""
    if runs < 1:
        raise ValueError(f"op_profile needs at least one run, got {runs}")
    with tempfile.TemporaryDirectory(prefix="shrink-profile-") as tmp:
        session = ort_session(path, threads=threads, disabled_optimizers=disabled_optimizers,
                              profile_prefix=Path(tmp) / "ort")
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    # Each run is one "model_run" event; the kernels inside the last `runs` of them are counted.
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    if len(windows) < runs:
        raise RuntimeError(f"ONNX Runtime's profile holds {len(windows)} runs, expected {warmup + runs}")
    first = windows[0][0]
    time_us: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e.get("ts", -1) >= first:
            op = e.get("args", {}).get("op_name", "?")
            time_us[op] += e.get("dur", 0)
            count[op] += 1
    ranked = [op for op, _ in time_us.most_common()]
    return OpProfile({op: time_us[op] / runs / 1e3 for op in ranked}, {op: count[op] // runs for op in ranked}, runs)

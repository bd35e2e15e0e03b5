"""One candidate evaluation of `st.auto`: a plain function of the plan, run in any process.

`Job(plan)` builds the plan on the original (plan.py: structure, recovery, sharing, quantization,
seeded from the plan), saves its artifact, counts its MACs, scores the metric and, when candidates
are timed, exports it for the runtime they are timed in (`runtime`: ONNX for ONNX Runtime and OpenVINO,
a .pte program for ExecuTorch); the parent times it (`latency_onnx`), never while workers run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core import data as D
from ..errors import ShrinkError, one_line
from .actions import Action
from .cache import fingerprint
from .plan import RecoveryConfig, build_plan

__all__ = ["Job", "Plan", "plan_key", "latency_onnx"]

Plan = dict[str, str]  # layer -> action name (layers left out keep their float form)


def plan_key(plan: Plan) -> str:
    return fingerprint(sorted(plan.items()))


def seed_for(seed: int, key: str) -> int:
    return (seed * 1_000_003 + int(key[:8], 16)) % 2**31


def latency_onnx(path: Path, inputs: D.Inputs, threads: int, metric: Callable | None = None,
                 runtime_name: str = "ort") -> tuple[float, float | None]:
    """Median ms of the runtime (export.runtimes: ort, openvino, executorch; a default session) on the
    profiling batch and, when asked, the metric of the runtime model."""
    from ..export.runtimes import session
    from ..measure.latency import time_fn

    runtime = session(path, runtime_name, threads=threads)
    feed = runtime.feed(*inputs[0], **inputs[1])
    ms = time_fn(lambda: runtime.run_feed(feed), warmup=3, runs=15, threads=threads).median_ms
    value = None
    if metric is not None:
        with torch.no_grad():
            value = float(metric(runtime))
    return ms, value


@dataclass
class Job:
    """What an evaluation needs. `timed`: candidates are exported to ONNX (objective latency, or a
    speed floor), so the parent can time them."""

    original: nn.Module
    actions: dict[str, Action]
    data: Any
    metric: Callable[[nn.Module], float]
    example: Any  # a batch: the ONNX export's inputs
    one: Any  # one sample: the MAC count's input
    workdir: Path
    train_data: Any = None
    recovery: RecoveryConfig | None = None
    timed: bool = False
    seed: int = 0
    runtime: str = "ort"  # where candidates are timed and checked (export.runtimes.RUNTIMES)

    def build(self, plan: Plan) -> nn.Module:
        return build_plan(self.original, plan, self.actions, self.data, recovery=self.recovery,
                          train_data=self.train_data, seed=seed_for(self.seed, plan_key(plan)))

    def __call__(self, plan: Plan) -> dict[str, Any]:
        import warnings as pywarnings

        from ..core.artifact import save_artifact
        from ..export import export_onnx
        from ..measure.macs import count_macs
        from ..measure.size import artifact_bytes

        t0 = time.perf_counter()
        entry: dict[str, Any] = {"status": "ok", "note": ""}
        where = self.workdir / plan_key(plan)[:16]
        try:
            with pywarnings.catch_warnings():
                pywarnings.simplefilter("ignore")
                candidate = self.build(plan)
                entry["bytes"] = artifact_bytes(save_artifact(candidate, where / "artifact"))
                entry["macs"] = count_macs(candidate, self.one)
                with torch.no_grad():
                    value = float(self.metric(candidate))
                if math.isnan(value):
                    raise ValueError("the metric is NaN")
                entry["metric"] = value
                if self.timed and self.runtime == "executorch":
                    from ..export.runtimes import export

                    export(candidate, where / "model.pte", "executorch", self.example)
                elif self.timed:
                    export_onnx(candidate, where / "model.onnx", self.example)
        except ShrinkError as exc:
            entry.update(status="failed", metric=None, note=str(exc))
        except Exception as exc:  # an eval_fn or a method raising on one candidate must not end the search
            entry.update(status="failed", metric=None, note=one_line(exc))
        entry["seconds"] = time.perf_counter() - t0
        return entry

    def model(self, plan: Plan) -> nn.Module:
        """The candidate: read back from its artifact when this run built it, else rebuilt (seeded: the same)."""
        from ..core.artifact import load_artifact

        where = self.workdir / plan_key(plan)[:16] / "artifact"
        if not plan:
            return self.original
        if where.is_dir():
            try:
                return load_artifact(where, self.original).eval()
            except ShrinkError:
                pass
        return self.build(plan).eval()

    def onnx(self, plan: Plan) -> Path:
        """The candidate's file for `runtime`: ONNX (ONNX Runtime; OpenVINO reads it too) or ExecuTorch's .pte."""
        from ..export.runtimes import export

        kind = "executorch" if self.runtime == "executorch" else "ort"
        path = self.workdir / plan_key(plan)[:16] / f"model{'.pte' if kind == 'executorch' else '.onnx'}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            export(self.model(plan), path, kind, self.example)
        return path


def paired_onnx(path: Path, base_path: Path, inputs: D.Inputs, threads: int,
                runtime_name: str = "ort") -> tuple[float, float]:
    """(median ms, speedup over the original) of the candidate's session in the runtime, timed in
    alternation with the original's (measure.latency.paired_ratio): the machine's slow spells hit
    both alike, so a speed floor is checked on a ratio, not on two timings taken apart."""
    from ..export.runtimes import session
    from ..measure.latency import paired_ratio

    runs = []
    for p in (path, base_path):
        runtime = session(p, runtime_name, threads=threads)
        feed = runtime.feed(*inputs[0], **inputs[1])
        runs.append(lambda s=runtime, f=feed: s.run_feed(f))
    r = paired_ratio(runs[0], runs[1], pairs=8, block=3, warmup=3)
    return r.a_ms, 1.0 / r.ratio

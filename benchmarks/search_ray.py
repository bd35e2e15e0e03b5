"""Benchmark: `st.auto` on a local Ray cluster of 2 workers beside 2 local processes, on a model whose
class lives in the user's own files (model.py importing its train.py, outside any installed package).

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/search_ray.py

Same search, same seed: the candidates must be identical (the path does not depend on the backend);
the wall time of each is the figure. Appends one line to results/search_ray.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, today  # noqa: E402

TRAIN = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
'''
MODEL = '''
import torch
from torch import nn

import train


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(train.Block(1, 16), nn.MaxPool2d(2), train.Block(16, 32), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


def factory():
    torch.manual_seed(0)
    return Net().eval()
'''


def main() -> int:
    import ray

    from shrinktunnel.core.refs import load_model
    from shrinktunnel.search import analyze, auto

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.py").write_text(TRAIN)
        (Path(tmp) / "model.py").write_text(MODEL)
        sys.path.insert(0, tmp)
        model = load_model(f"{tmp}/model.py:factory")
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(64, 1, 28, 28, generator=g) for _ in range(4)]
        actions = ["quant8", "quant4", "share4", "prune75+share4"]
        a = analyze(model, data, actions=actions, progress=False)
        kwargs = dict(max_drop=0.02, actions=actions, analysis=a, progress=False, max_evaluations=8, verify_runtime=False,
                      recovery={"steps": 20, "share_steps": 10, "qat_steps": 10, "analysis_steps": 0})
        load = os.getloadavg()
        times, results = {}, {}
        for backend in ("process", "ray"):
            t0 = time.perf_counter()
            r = auto(model, data, workers=2, backend=backend, **kwargs)
            times[backend] = time.perf_counter() - t0
            results[backend] = [(c["label"], c["status"], c.get("metric"), c.get("bytes")) for c in r.candidates]
        ray.shutdown()
    row = {"date": today(), "process_s": times["process"], "ray_s": times["ray"], "ray_over_process": times["ray"] / times["process"],
           "same_candidates": results["process"] == results["ray"], "candidates": len(results["ray"]),
           "failed_on_ray": sum(s == "failed" for _, s, _, _ in results["ray"]), "load_before": load,
           "load_after": os.getloadavg(), "git": git_state(), "cpu_count": os.cpu_count()}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (RESULTS_DIR / "search_ray.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0 if row["same_candidates"] and not row["failed_on_ray"] else 1


if __name__ == "__main__":
    sys.exit(main())

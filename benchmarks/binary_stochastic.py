"""Benchmark: stochastic vs deterministic BinaryConnect on LeNet-300-100 (MNIST), several seeds.

    .venv/bin/python benchmarks/binary_stochastic.py     # ~12 min at load average 16 (1 thread; nothing timed)

The trained LeNet-300-100 (benchmarks/_lenet.py, 98 % fp32) gets binary weights in its middle layer and
first layer (the 10-way classifier kept at int8, as BinaryConnect keeps its last layer real-valued in
practice), int8 activations, and QAT for `--epochs` with Adam lr 1e-3: once with the deterministic sign,
once with stochastic binarization (p = hard_sigmoid(w / H)); each seed changes the data order, the
calibration and the samples. Accuracy of the converted, saved and reloaded artifact (the deterministic
sign) on all 10,000 test images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.measure import accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish  # noqa: E402
from _lenet import lenet_300_100  # noqa: E402

NAME = "binary_stochastic"
THREADS = 1  # accuracy only, nothing timed: 2-thread OpenMP stalls on this oversubscribed machine
# (measured 780 ms a LeNet QAT step at 2 threads, 60 ms at 1, load average 10)
KEEP_LAST = [{"pattern": "fc3", "weights": {"bits": 8}}]


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def run(workdir: Path, seeds: list[int], epochs: float) -> dict[str, Any]:
    model, test = lenet_300_100(), assets.mnist_test()
    train_all = assets.mnist_split("train")
    base = accuracy(model, test)
    rows: dict[str, list[float]] = {"deterministic": [], "stochastic": []}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_all), generator=g).tolist()
        train = [train_all[i] for i in order]
        for mode in rows:
            torch.manual_seed(seed)
            cfg = {"weights": {"format": "binary", "stochastic": mode == "stochastic"}, "overrides": KEEP_LAST,
                   "lr": 1e-3, "epochs": epochs}
            started = time.perf_counter()
            q = st.qat(model, cfg, data=train, progress=False)
            loaded = st.load(st.save(q, workdir / f"{mode}{seed}"), model=lenet_300_100())
            acc = accuracy(loaded, test)
            rows[mode].append(acc)
            log(f"seed {seed} {mode}: {100 * acc:.2f} % ({time.perf_counter() - started:.0f} s)")
    summary = {m: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
                   "min": min(v), "max": max(v), "runs": v} for m, v in rows.items()}
    return {"fp32": base, "rows": summary, "setup": {"seeds": seeds, "epochs": epochs, "lr": 1e-3}}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Measured {res['date']} on {m['cpu']}, {m['threads']} threads, load average {res['load']}; "
             f"{res['setup']['epochs']:g} epoch of QAT per run, seeds {res['setup']['seeds']}. LeNet-300-100 fp32: "
             f"{100 * res['fp32']:.2f} %. Reproduce with `{res['command']}`.", "",
             "| binary weights (fc1, fc2; fc3 int8), A8 | mean | stdev | min | max | per seed |",
             "|---|---:|---:|---:|---:|---|"]
    for k, r in res["rows"].items():
        runs = ", ".join(f"{100 * a:.2f}" for a in r["runs"])
        lines.append(f"| {k} | {100 * r['mean']:.2f} % | {100 * r['stdev']:.2f} | {100 * r['min']:.2f} % | "
                     f"{100 * r['max']:.2f} % | {runs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=0.5)
    parser.add_argument("--tag", default="", help="suffix of the results files (a second setting beside the default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"shrinktunnel-{NAME}-") as tmp:
        res = run(Path(tmp), args.seeds, args.epochs)
    return finish(res, name=NAME, command=".venv/bin/python benchmarks/binary_stochastic.py", started=started,
                  threads=THREADS, render=render, stem=f"{NAME}{'_' + args.tag if args.tag else ''}")


if __name__ == "__main__":
    sys.exit(main())

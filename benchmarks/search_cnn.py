"""Benchmark: `st.auto` objective size on three small CNNs trained here (benchmarks/search_cnn_models.py),
with and without training data for recovery (issue 22: Deep Compression ratios on any CNN).

    nice -n 10 .venv/bin/python benchmarks/search_cnn.py --model digits --train-data yes \
        --cache-dir ~/.cache/shrinktunnel/bench/search-cnn --time-budget 30m
    .venv/bin/python benchmarks/search_cnn.py --render      # the table of every run so far

Budget: 0.5 pt of accuracy (less a 0.1 pt margin) on the search split and on a held-out split; the
figures are on a test split the search never saw. Ratio: fp32 safetensors / the chosen artifact on
disk (manifest included). One run per model and setting (each under ten minutes on 2 cores), so the
lock is held briefly; results/search_cnn.jsonl keeps one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, today  # noqa: E402
from search_cnn_models import DATASETS, trained  # noqa: E402

from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes  # noqa: E402
from shrinktunnel.search import AutoConfig, RecoveryConfig, auto  # noqa: E402

THREADS = 2
MAX_DROP, MARGIN = 0.005, 0.001
TARGET_RATIO = 35.0  # Deep Compression's 35x-49x with retraining
ACTIONS = ["share4", "share2", "quant4", "quant2", "prune75+share4", "prune75+share2", "prune90+share2", "prune95+share2"]
RECOVERY = RecoveryConfig(steps=300, share_steps=100, qat_steps=100, analysis_steps=30)
OUT = RESULTS_DIR / "search_cnn.jsonl"


def log(message: str) -> None:
    print(f"[search_cnn] {message}", file=sys.stderr, flush=True)


def run(name: str, with_train: bool, max_evaluations: int, time_budget: str | None, cache_dir: str | None) -> dict:
    torch.set_num_threads(THREADS)
    model, data = trained(name, log=log)
    base_test = accuracy(model, data["test"])
    config = AutoConfig(max_drop=MAX_DROP, margin=MARGIN, objective="size", actions=ACTIONS, threads=THREADS,
                        recovery=RECOVERY if with_train else None, max_evaluations=max_evaluations,
                        time_budget=time_budget, progress=True)
    train = data["train"][:400] if with_train else None  # 400 batches: more than 300 + 100 + 100 steps draw
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = cache_dir or str(Path(tmp) / "cache")  # a persistent one: an interrupted run resumes
        r = auto(model, data["search"], config.model_copy(update={"cache_dir": cache}),
                 eval_fn=lambda m: accuracy(m, data["search"]), verify_fn=lambda m: accuracy(m, data["verify"]),
                 train_data=train)
        seconds = time.perf_counter() - t0
        out = r.save(Path(tmp) / "auto")
        size = artifact_bytes(out)
    chosen = r.candidates[r.chosen]
    test = accuracy(r.model, data["test"])
    row = {"date": today(), "model": name, "train_data": with_train, "fits": r.fits, "plan": chosen["plan"],
           "fp32_bytes": float_safetensors_bytes(model), "artifact_bytes": size,
           "ratio": float_safetensors_bytes(model) / size, "test_accuracy_fp32": base_test, "test_accuracy": test,
           "test_drop_pt": 100 * (base_test - test), "search_seconds": seconds, "evaluations": len(r.candidates) - 1,
           "analysis_seconds": r.analysis.seconds, "load_before": load, "load_after": os.getloadavg(),
           "cached_evaluations": sum(bool(c.get("cached")) for c in r.candidates[1:]),
           "evaluation_seconds": sum(c.get("seconds", 0.0) for c in r.candidates[1:]),  # resumed runs' included
           "analysis_evaluation_seconds": sum(e.get("seconds", 0.0) for layer in r.analysis.results.values()
                                              for e in layer.values()),
           "max_evaluations": max_evaluations, "time_budget": time_budget, "threads": THREADS,
           "message": r.message, "git": git_state(), "cpu_count": os.cpu_count()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def uniform(name: str, action: str | None, plan: dict[str, str] | None = None) -> dict:
    """One plan, no search: `action` on every layer it applies to (or the given `plan`), with the
    recovery (a spot check of what recovery reaches when a search does not fit the time)."""
    from shrinktunnel.core.artifact import save_artifact
    from shrinktunnel.search import ACTIONS, build_plan
    from shrinktunnel.search.profile import candidate_layers

    torch.set_num_threads(THREADS)
    model, data = trained(name, log=log)
    load = os.getloadavg()
    t0 = time.perf_counter()
    plan = plan or {layer: action for layer in candidate_layers(model)}
    built = build_plan(model, plan, dict(ACTIONS), data["search"],
                       recovery=RECOVERY, train_data=data["train"][:400], seed=0).eval()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        size = artifact_bytes(save_artifact(built, Path(tmp) / "a"))
    drops = {k: 100 * (accuracy(model, data[k]) - accuracy(built, data[k])) for k in ("search", "verify", "test")}
    row = {"date": today(), "model": name, "uniform": action, "plan": plan, "ratio": float_safetensors_bytes(model) / size,
           "artifact_bytes": size, "drops_pt": drops, "seconds": seconds, "load_before": load, "git": git_state()}
    with (RESULTS_DIR / "search_cnn_uniform.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _drops(message: str) -> str:
    """The chosen candidate's drop on the search split and the held-out check, in points, from its message."""
    import re

    search = re.search(r"\(drop (-?[0-9.e-]+) <=", message)
    held = re.search(r"held-out drop (-?[0-9.e-]+)", message)
    return " / ".join("-" if m is None else f"{100 * float(m.group(1)):+.2f}" for m in (search, held))


def render() -> str:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()] if OUT.is_file() else []
    latest = {}
    for row in rows:
        latest[(row["model"], row["train_data"])] = row
    lines = ["| model | --train-data | fp32 | artifact | ratio | test acc fp32 | test drop (pt) | search / held-out drop (pt) "
             "| fits | evaluations | wall (s) | evaluations' own (s) | threads | load (1 min) | date |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for (model, with_train), r in sorted(latest.items()):
        drops = _drops(r["message"])
        own = "-" if "evaluation_seconds" not in r else f"{r['analysis_evaluation_seconds'] + r['evaluation_seconds']:.0f}"
        lines.append(f"| {model} | {'yes' if with_train else 'no'} | {r['fp32_bytes']:,} | {r['artifact_bytes']:,} | "
                     f"{r['ratio']:.1f}x | {100 * r['test_accuracy_fp32']:.2f} % | {r['test_drop_pt']:+.2f} | {drops} | {r['fits']} | "
                     f"{r['evaluations']} | {r['search_seconds']:.0f} | {own} | {r.get('threads', 2)} | {r['load_before'][0]:.1f} | "
                     f"{r['date']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(DATASETS))
    p.add_argument("--train-data", choices=["yes", "no"], default="yes")
    p.add_argument("--max-evaluations", type=int, default=12)
    p.add_argument("--time-budget", default=None)
    p.add_argument("--cache-dir", default=None, help="persistent evaluation cache: a rerun resumes (default: none)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (1 on a loaded machine: two threads per process stall each other there)")
    p.add_argument("--render", action="store_true")
    p.add_argument("--uniform", default=None, help="build this action on every layer with recovery (no search)")
    p.add_argument("--plan", default=None, help='build this plan with recovery (no search): JSON {"layer": "action"}')
    args = p.parse_args()
    THREADS = args.threads
    if args.uniform or args.plan:
        print(json.dumps(uniform(args.model, args.uniform, json.loads(args.plan) if args.plan else None), indent=1))
        return 0
    if args.render or not args.model:
        print(render())
        return 0
    row = run(args.model, args.train_data == "yes", args.max_evaluations, args.time_budget,
              args.cache_dir)
    log(f"{row['model']} train_data={row['train_data']}: {row['ratio']:.1f}x, test drop {row['test_drop_pt']:+.2f} pt, "
        f"{row['search_seconds']:.0f} s; {row['message']}")
    return 0 if row["fits"] and row["test_drop_pt"] <= 100 * MAX_DROP and (row["ratio"] >= TARGET_RATIO or not row["train_data"]) else 1


if __name__ == "__main__":
    sys.exit(main())

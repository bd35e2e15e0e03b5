"""Benchmark: the MNIST CNN with half its channels pruned (prune_channels, ratio 0.5), then recovered
by knowledge distillation from the unpruned CNN or by plain fine-tuning on the labels, with the same
budget of optimiser steps (same batches, same optimiser and learning rate), each repeated on three
disjoint subsets of the training images (the runs are otherwise deterministic, so the subsets are
what varies). The distillation settings are Hinton's usual ones, not tuned: tuning them on the
test images would favour distillation unfairly.

    .venv/bin/python benchmarks/distill_mnist.py

Writes benchmarks/results/distill_mnist.json and .md; exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.core.train import FitConfig, fit
from shrinktunnel.measure import accuracy, count_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from _distill_common import log, md_table, pct, target, targets_table  # noqa: E402

NAME = "distill_mnist"
THREADS = 2
BUDGETS = (50, 200)  # optimiser steps of batch 64 given to each recovery (the recipe runs the last)
SUBSETS = 3  # disjoint training subsets of BUDGETS[-1] * 64 images each; every recovery runs on each
BATCH = 64
LR = 1e-3  # Adam, for both recoveries
# Distillation settings: Hinton's soft targets with the usual T = 4, alpha = 0.9 (the soft term's
# weight; 0.1 on the labels), as DistillConfig's defaults; not tuned for this benchmark
KD: dict[str, Any] = {"temperature": 4.0, "alpha": 0.9}


def recover(pruned: torch.nn.Module, teacher: torch.nn.Module, train: list, steps: int, how: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same start for both (a hint adapter is the only random initialisation)
    if how == "finetune":
        model = copy.deepcopy(pruned)
        fit(model, train, FitConfig(steps=steps, lr=LR, description=f"fine-tuning {steps}", progress=False))
        return model
    return st.distill(pruned, teacher, train, st.DistillConfig(steps=steps, lr=LR, **KD), progress=False)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    teacher = assets.mnist_cnn()
    test = assets.mnist_test()
    log("pruning half of the channels (prune_channels, ratio 0.5, L2 importance, no fine-tuning)")
    pruned = st.prune(teacher, st.ChannelPruneConfig(ratio=0.5), example_inputs=test[0][0][:2], progress=False)
    acc = {"teacher": accuracy(teacher, test), "pruned": accuracy(pruned, test)}
    log(f"teacher {pct(acc['teacher'])}, pruned {pct(acc['pruned'])}")
    images = BUDGETS[-1] * BATCH
    subsets = [assets.mnist_split("train", limit=images, offset=k * images, batch_size=BATCH) for k in range(SUBSETS)]
    runs = []
    for steps in BUDGETS:
        row: dict[str, Any] = {"steps": steps, "finetune": [], "distill": []}
        for train in subsets:
            for how in ("finetune", "distill"):
                row[how].append(accuracy(recover(pruned, teacher, train[:steps], steps, how), test))
        row["paired_diff_pt"] = [100 * (d - f) for d, f in zip(row["distill"], row["finetune"])]
        log(f"{steps} steps: fine-tune {[pct(a) for a in row['finetune']]}, distill {[pct(a) for a in row['distill']]}")
        runs.append(row)
    # The recipe form: prune then distill from the original in one st.compress call.
    log("recipe: prune_channels then distill (teacher: the original)")
    recipe = [{"prune_channels": {"ratio": 0.5}}, {"distill": {"steps": BUDGETS[-1], "lr": LR, **KD}}]
    torch.manual_seed(0)
    result = st.compress(teacher, recipe, data=subsets[0], example_inputs=test[0][0][:2], progress=False)
    acc["recipe"] = accuracy(result.model, test)

    last = runs[-1]
    targets = [
        target("distill_vs_finetune", f"distilled minus fine-tuned accuracy at {last['steps']} steps, mean of "
               f"{SUBSETS} subsets", round(statistics.mean(last["paired_diff_pt"]), 4), ">=", 0.0, "pt"),
        target("distill_drop", f"teacher minus distilled accuracy at {last['steps']} steps, mean of {SUBSETS} subsets",
               round(100 * (acc["teacher"] - statistics.mean(last["distill"])), 4), "<=", 1.0, "pt"),
    ]
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"teacher": "shrinktunnel.assets:mnist_cnn", "prune": {"ratio": 0.5}, "budgets": list(BUDGETS),
                  "batch": BATCH, "lr": LR, "distill": KD, "subsets": SUBSETS, "images_per_subset": images,
                  "test_images": sum(len(y) for _, y in test)},
        "weights": {"teacher": count_weights(teacher), "pruned": count_weights(pruned)},
        "accuracy": acc, "recovery": runs, "wall_s": round(time.perf_counter() - started, 1),
        "targets": targets, "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def markdown(res: dict[str, Any]) -> str:
    acc, w, s, m = res["accuracy"], res["weights"], res["setup"], res["machine"]
    rows = []
    for r in res["recovery"]:
        (fm, fs), (dm, ds), (pm, ps) = mean_std(r["finetune"]), mean_std(r["distill"]), mean_std(r["paired_diff_pt"])
        rows.append([f"{r['steps']}", f"{100 * fm:.2f} ± {100 * fs:.2f} %", f"{100 * dm:.2f} ± {100 * ds:.2f} %",
                     f"{pm:+.2f} ± {ps:.2f} pt", " / ".join(f"{d:+.2f}" for d in r["paired_diff_pt"])])
    kd = s["distill"]
    hints = f", hints {', '.join(h['student'] for h in kd['hints'])}" if kd.get("hints") else ""
    out = md_table(
        f"MNIST CNN, half the channels pruned: recovery by fine-tuning vs distillation ({s['test_images']:,} test images)",
        ["steps (batch 64)", "fine-tuning (labels)", "distillation (teacher)", "distill - fine-tune", "per subset"], rows,
        note=(f"Measured {res['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Mean ± standard "
              f"deviation over {s['subsets']} disjoint subsets of {s['images_per_subset']:,} training images (each "
              f"budget takes the first batches of each subset; both recoveries see the same batches in the same "
              f"order). Teacher (unpruned): {pct(acc['teacher'])}, {w['teacher']:,} weights. Pruned, before "
              f"recovery: {pct(acc['pruned'])}, {w['pruned']:,} weights. Adam lr {s['lr']} for both; distillation: "
              f"T = {kd['temperature']:g}, alpha = {kd['alpha']:g} (soft) + {1 - kd['alpha']:.1f} (labels){hints}. "
              f"The recipe `prune_channels` -> `distill` ({s['budgets'][-1]} steps on the first subset, teacher: "
              f"the original) in one st.compress: {pct(acc['recipe'])}. {res['wall_s']:.0f} s in all."))
    return out + "\n" + targets_table(res["targets"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args()
    res = run()
    text = markdown(res)
    write_results(args.out, res, text)
    print(text)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

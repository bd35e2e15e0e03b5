"""Benchmark: the MNIST CNN with half its channels pruned (prune_channels, ratio 0.5), then recovered
by knowledge distillation from the unpruned CNN or by plain fine-tuning on the labels, with the same
budget of optimiser steps (same batches, same optimiser and learning rate).

    .venv/bin/python benchmarks/distill_mnist.py

Writes benchmarks/results/distill_mnist.json and .md; exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import copy
import sys
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
LR = 1e-3  # Adam, for both recoveries
TEMPERATURE = 4.0  # Hinton et al.'s middle value
ALPHA = 0.9  # soft-target weight; 0.1 on the labels
TRAIN_IMAGES = 12_800  # the first 200 batches of 64 of the MNIST train split


def recover(pruned: torch.nn.Module, teacher: torch.nn.Module, train: list, steps: int, how: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if how == "finetune":
        model = copy.deepcopy(pruned)
        fit(model, train, FitConfig(steps=steps, lr=LR, description=f"fine-tuning {steps}", progress=False))
        return model
    cfg = st.DistillConfig(steps=steps, lr=LR, temperature=TEMPERATURE, alpha=ALPHA)
    return st.distill(pruned, teacher, train, cfg, progress=False)


def run() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    teacher = assets.mnist_cnn()
    test = assets.mnist_test()
    train = assets.mnist_split("train", limit=TRAIN_IMAGES, batch_size=64)
    log("pruning half of the channels (prune_channels, ratio 0.5, L2 importance, no fine-tuning)")
    pruned = st.prune(teacher, st.ChannelPruneConfig(ratio=0.5), example_inputs=test[0][0][:2], progress=False)
    acc = {"teacher": accuracy(teacher, test), "pruned": accuracy(pruned, test)}
    log(f"teacher {pct(acc['teacher'])}, pruned {pct(acc['pruned'])}")
    runs = []
    for steps in BUDGETS:
        row = {"steps": steps}
        for how in ("finetune", "distill"):
            row[how] = accuracy(recover(pruned, teacher, train, steps, how), test)
        log(f"{steps} steps: fine-tune {pct(row['finetune'])}, distill {pct(row['distill'])}")
        runs.append(row)
    # The recipe form: prune then distill from the original in one st.compress call.
    log("recipe: prune_channels then distill (teacher: the original)")
    recipe = [{"prune_channels": {"ratio": 0.5}},
              {"distill": {"steps": BUDGETS[-1], "lr": LR, "temperature": TEMPERATURE, "alpha": ALPHA}}]
    torch.manual_seed(0)
    result = st.compress(teacher, recipe, data=train, example_inputs=test[0][0][:2], progress=False)
    acc["recipe"] = accuracy(result.model, test)

    last = runs[-1]
    targets = [
        target("distill_vs_finetune", f"distilled minus fine-tuned accuracy at {last['steps']} steps",
               round(100 * (last["distill"] - last["finetune"]), 4), ">=", 0.0, "pt"),
        target("distill_drop", f"teacher minus distilled accuracy at {last['steps']} steps",
               round(100 * (acc["teacher"] - last["distill"]), 4), "<=", 1.0, "pt"),
    ]
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"teacher": "shrinktunnel.assets:mnist_cnn", "prune": {"ratio": 0.5}, "budgets": list(BUDGETS),
                  "batch": 64, "lr": LR, "temperature": TEMPERATURE, "alpha": ALPHA, "train_images": TRAIN_IMAGES,
                  "test_images": sum(len(y) for _, y in test)},
        "weights": {"teacher": count_weights(teacher), "pruned": count_weights(pruned)},
        "accuracy": acc, "recovery": runs,
        "targets": targets, "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def markdown(res: dict[str, Any]) -> str:
    acc, w = res["accuracy"], res["weights"]
    rows = [[f"{r['steps']}", pct(r["finetune"]), pct(r["distill"]), f"{100 * (r['distill'] - r['finetune']):+.2f} pt"]
            for r in res["recovery"]]
    s = res["setup"]
    out = md_table(
        f"MNIST CNN, half the channels pruned: recovery by fine-tuning vs distillation ({s['test_images']:,} test images)",
        ["steps (batch 64)", "fine-tuning (labels)", "distillation (teacher)", "distill - fine-tune"], rows,
        note=(f"Teacher (unpruned): {pct(acc['teacher'])}, {w['teacher']:,} weights. Pruned, before recovery: "
              f"{pct(acc['pruned'])}, {w['pruned']:,} weights. Same batches, Adam lr {s['lr']}; distillation: "
              f"T = {s['temperature']}, alpha = {s['alpha']} (soft) + {1 - s['alpha']:.1f} (labels). The recipe "
              f"`prune_channels` -> `distill` ({s['budgets'][-1]} steps, teacher: the original) in one st.compress: "
              f"{pct(acc['recipe'])}."))
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

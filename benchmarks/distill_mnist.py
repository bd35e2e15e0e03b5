"""Benchmark: the MNIST CNN with three quarters of its channels pruned (prune_channels, ratio 0.75:
25 k of its 390 k weights are left and its accuracy falls to about 38 %), then recovered by
knowledge distillation from the unpruned CNN or by plain fine-tuning on the labels, with the same
budget of optimiser steps (same batches in the same order, same optimiser and learning rate). Each
comparison is repeated on five disjoint subsets of the training images (the subset and the seed vary
together), in two regimes: 10,000 training images, and 1,024 (16 batches: labels scarce, cycled many times).
The distillation settings are Hinton's usual ones, not tuned: tuning them on the test images would
favour distillation unfairly.

    .venv/bin/python benchmarks/distill_mnist.py      # about four minutes on 2 quiet cores

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
RATIO = 0.75  # channels removed from every conv (and the hidden Linear): a harsh cut, where recovery matters
SEEDS = 5  # disjoint training subsets (subset k also seeds torch with k); 5 x 10,000 = the whole train split
SUBSET = 10_000  # training images per subset
# (training images, budgets of optimiser steps of batch 64): each budget takes the first batches of
# the subset, cycled when it has fewer; 800 steps are 5 epochs of 10,000 images and 50 of 1,024
REGIMES = ((10_000, (50, 200, 800)), (1_024, (200, 800)))
BATCH = 64
LR = 1e-3  # Adam, for both recoveries
# Distillation settings: Hinton's soft targets with the usual T = 4, alpha = 0.9 (the soft term's
# weight; 0.1 on the labels), as DistillConfig's defaults; not tuned for this benchmark
KD: dict[str, Any] = {"temperature": 4.0, "alpha": 0.9}


def recover(pruned: torch.nn.Module, teacher: torch.nn.Module, train: list, steps: int, how: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same start for both
    if how == "finetune":
        model = copy.deepcopy(pruned)
        fit(model, train, FitConfig(steps=steps, lr=LR, description=f"fine-tuning {steps}", progress=False))
        return model
    return st.distill(pruned, teacher, train, st.DistillConfig(steps=steps, lr=LR, **KD), progress=False)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(seeds: int = SEEDS) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    teacher = assets.mnist_cnn()
    test = assets.mnist_test()
    log(f"pruning {RATIO:.0%} of the channels (prune_channels, L2 importance, no fine-tuning)")
    pruned = st.prune(teacher, st.ChannelPruneConfig(ratio=RATIO), example_inputs=test[0][0][:2], progress=False)
    acc = {"teacher": accuracy(teacher, test), "pruned": accuracy(pruned, test)}
    log(f"teacher {pct(acc['teacher'])}, pruned {pct(acc['pruned'])}")
    subsets = [assets.mnist_split("train", limit=SUBSET, offset=k * SUBSET, batch_size=BATCH) for k in range(seeds)]
    runs = []
    for images, budgets in REGIMES:
        for steps in budgets:
            row: dict[str, Any] = {"images": images, "steps": steps, "finetune": [], "distill": []}
            for k, subset in enumerate(subsets):
                train = subset[: images // BATCH + (images % BATCH > 0)]
                for how in ("finetune", "distill"):
                    row[how].append(accuracy(recover(pruned, teacher, train, steps, how, k), test))
            row["paired_diff_pt"] = [100 * (d - f) for d, f in zip(row["distill"], row["finetune"])]
            log(f"{images:,} images, {steps} steps: fine-tune {[pct(a) for a in row['finetune']]}, "
                f"distill {[pct(a) for a in row['distill']]}")
            runs.append(row)
    # The recipe form: prune then distill from the original in one st.compress call.
    log("recipe: prune_channels then distill (teacher: the original)")
    steps = REGIMES[0][1][-1]
    recipe = [{"prune_channels": {"ratio": RATIO}}, {"distill": {"steps": steps, "lr": LR, **KD}}]
    torch.manual_seed(0)
    result = st.compress(teacher, recipe, data=subsets[0], example_inputs=test[0][0][:2], progress=False)
    acc["recipe"] = accuracy(result.model, test)

    main, few = runs[len(REGIMES[0][1]) - 1], runs[-1]
    targets = [
        target("distill_vs_finetune", f"distilled minus fine-tuned accuracy, {main['images']:,} images, {main['steps']} "
               f"steps, mean of {seeds} subsets", round(statistics.mean(main["paired_diff_pt"]), 4), ">=", 0.0, "pt"),
        target("distill_vs_finetune_few", f"distilled minus fine-tuned accuracy, {few['images']:,} images, {few['steps']} "
               f"steps, mean of {seeds} subsets", round(statistics.mean(few["paired_diff_pt"]), 4), ">=", 0.0, "pt"),
        target("distill_drop", f"teacher minus distilled accuracy, {main['images']:,} images, {main['steps']} steps, "
               f"mean of {seeds} subsets", round(100 * (acc["teacher"] - statistics.mean(main["distill"])), 4), "<=", 1.0, "pt"),
    ]
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"teacher": "shrinktunnel.assets:mnist_cnn", "prune": {"ratio": RATIO},
                  "regimes": [{"images": i, "budgets": list(b)} for i, b in REGIMES], "batch": BATCH, "lr": LR,
                  "distill": KD, "seeds": seeds, "subset_images": SUBSET, "test_images": sum(len(y) for _, y in test)},
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
        n = len(r["paired_diff_pt"])
        t_stat = pm / (ps / n**0.5) if ps > 0 else float("inf") * (1 if pm > 0 else -1)
        wins = sum(d > 0 for d in r["paired_diff_pt"])
        rows.append([f"{r['images']:,}", f"{r['steps']}", f"{100 * fm:.2f} ± {100 * fs:.2f} %",
                     f"{100 * dm:.2f} ± {100 * ds:.2f} %", f"{pm:+.2f} ± {ps:.2f} pt (t = {t_stat:+.1f})",
                     f"{wins} of {n}", " / ".join(f"{d:+.2f}" for d in r["paired_diff_pt"])])
    kd = s["distill"]
    out = md_table(
        f"MNIST CNN, {s['prune']['ratio']:.0%} of the channels pruned: recovery by fine-tuning vs distillation "
        f"({s['test_images']:,} test images)",
        ["training images", "steps (batch 64)", "fine-tuning (labels)", "distillation (teacher)", "distill - fine-tune",
         "distillation wins", "per subset"], rows,
        note=(f"Measured {res['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Mean ± standard "
              f"deviation over {s['seeds']} disjoint subsets of the training images (subset k also seeds torch with k); "
              f"t = mean / (std / sqrt(n)) of the paired differences (|t| > 2.8 is significant at 5 % with 4 degrees "
              f"of freedom). Each budget takes the first batches of its subset, cycled when there are fewer; both "
              f"recoveries see the same batches in the same order. Teacher (unpruned): {pct(acc['teacher'])}, "
              f"{w['teacher']:,} weights. Pruned, before recovery: {pct(acc['pruned'])}, {w['pruned']:,} weights "
              f"({w['pruned'] / w['teacher']:.3f}x). Adam lr {s['lr']} for both; distillation: T = "
              f"{kd['temperature']:g}, alpha = {kd['alpha']:g} (soft) + {1 - kd['alpha']:.1f} (labels), untuned. "
              f"The recipe `prune_channels` -> `distill` ({s['regimes'][0]['budgets'][-1]} steps on the first subset, "
              f"teacher: the original) in one st.compress: {pct(acc['recipe'])}. {res['wall_s']:.0f} s in all."))
    return out + "\n" + targets_table(res["targets"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    args = parser.parse_args()
    res = run(args.seeds)
    text = markdown(res)
    write_results(args.out, res, text)
    print(text)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

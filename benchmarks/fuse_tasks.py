"""Benchmark: network fusion on MNIST. Three classifiers read the same images: the digit (the
pretrained MNIST CNN), its parity and whether it is >= 5 (the same CNN architecture with a 2-way
output, each trained here from scratch on its own labelling). st.fuse makes one model with the digit
CNN's trunk and one head per task (each task keeps only its last Linear), distilled from the three
teachers at once on unlabelled training images.

    .venv/bin/python benchmarks/fuse_tasks.py

Reports the fused model's weights and latency against running the three models, and each task's
accuracy against its own teacher. Writes benchmarks/results/fuse_tasks.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.core.train import FitConfig, fit
from shrinktunnel.measure import count_weights, float_safetensors_bytes
from shrinktunnel.measure.latency import interleaved, time_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from _distill_common import log, md_table, pct, target, targets_table  # noqa: E402

NAME = "fuse_tasks"
THREADS = 2
TASKS = {"digit": lambda y: y, "parity": lambda y: y % 2, "ge5": lambda y: (y >= 5).long()}
TEACHER_EPOCHS = 0.5  # parity / >=5 CNNs: 25,000 training images, Adam 1e-3 (2 cores: an epoch of this CNN
# takes about 3 minutes)
FUSE_EPOCHS = 0.5  # fusion: 25,000 training images, unlabelled (the teachers' soft targets only)
FUSE_LR = 5e-4
MAX_DROP_PT = 1.0  # the aim: each task within 1 point of its own teacher
BATCH = 64  # latency batch
ROUNDS, RUNS, WARMUP = 7, 30, 5


def two_way_cnn(seed: int) -> nn.Module:
    """The digit CNN's architecture with a 2-way output layer, freshly initialised."""
    model = assets.mnist_cnn()
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    model.fc_layers[2] = nn.Linear(model.fc_layers[2].in_features, 2)
    return model


def task_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs.argmax(1) == labels).float().mean())


@torch.no_grad()
def predict(model: nn.Module, test: list) -> list[torch.Tensor]:
    outs = [model(x) for x, _ in test]
    if isinstance(outs[0], (tuple, list)):
        return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]
    return [torch.cat(outs)]


def run(teacher_epochs: float = TEACHER_EPOCHS, fuse_epochs: float = FUSE_EPOCHS, rounds: int = ROUNDS,
        runs: int = RUNS) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    train = assets.mnist_split("train", batch_size=64)
    test = assets.mnist_test()
    y_test = torch.cat([y for _, y in test])
    teachers = {"digit": assets.mnist_cnn()}
    for i, task in enumerate(("parity", "ge5")):
        log(f"training the {task} CNN ({teacher_epochs:g} epoch)")
        model = two_way_cnn(seed=i + 1)
        fit(model, [(x, TASKS[task](y)) for x, y in train], FitConfig(epochs=teacher_epochs, lr=1e-3, progress=False))
        teachers[task] = model.eval()

    log(f"fusing ({fuse_epochs:g} epoch of multi-teacher distillation on unlabelled images)")
    torch.manual_seed(0)
    fused = st.fuse(list(teachers.values()), st.FuseConfig(epochs=fuse_epochs, lr=FUSE_LR, names=list(teachers)),
                    data=[x for x, _ in train], progress=False)
    start = st.fuse(list(teachers.values()), st.FuseConfig(steps=1, lr=1e-12), data=[x for x, _ in train[:1]], progress=False)

    acc: dict[str, dict[str, float]] = {}
    fused_out, start_out = predict(fused, test), predict(start, test)
    for i, (task, teacher) in enumerate(teachers.items()):
        labels = TASKS[task](y_test)
        acc[task] = {"teacher": task_accuracy(predict(teacher, test)[0], labels),
                     "fused": task_accuracy(fused_out[i], labels),
                     "fused_before_distillation": task_accuracy(start_out[i], labels)}
        log(f"{task}: teacher {pct(acc[task]['teacher'])}, fused {pct(acc[task]['fused'])}")

    with tempfile.TemporaryDirectory() as d:  # the fused model as an artifact: reloads exactly
        st.save(fused, Path(d) / "fused")
        loaded = st.load(Path(d) / "fused")
        x = test[0][0]
        with torch.no_grad():
            reload_exact = all(torch.equal(a, b) for a, b in zip(loaded(x), fused(x)))

    x = test[0][0][:BATCH]
    separate = list(teachers.values())

    def run_separate():
        return [m(x) for m in separate]

    log(f"latency: {rounds} alternated rounds of {runs} runs, batch {BATCH}, {THREADS} threads")
    per_round = {"separate": [], "fused": []}
    with torch.inference_mode():
        for _ in range(rounds):
            got = interleaved({"separate": lambda: time_fn(run_separate, warmup=WARMUP, runs=runs, threads=THREADS, batch=BATCH),
                               "fused": lambda: time_fn(lambda: fused(x), warmup=WARMUP, runs=runs, threads=THREADS, batch=BATCH)},
                              rounds=1)
            for k, v in got.items():
                per_round[k].append(v.median_ms)
    ratios = [f / s for f, s in zip(per_round["fused"], per_round["separate"])]

    weights = {"separate": sum(count_weights(m) for m in separate), "fused": count_weights(fused)}
    size = {"separate": sum(float_safetensors_bytes(m) for m in separate), "fused": float_safetensors_bytes(fused)}
    targets = [target(f"{t}_drop", f"{t}: own teacher minus fused accuracy", round(100 * (a["teacher"] - a["fused"]), 4),
                      "<=", MAX_DROP_PT, "pt") for t, a in acc.items()]
    targets.append(target("weights", "fused / separate weights", weights["fused"] / weights["separate"], "<=", 1.0, "x"))
    targets.append(target("latency", "fused / separate latency (median of per-round ratios)",
                          statistics.median(ratios), "<=", 1.0, "x"))
    targets.append(target("reload", "fused model reloads bit-exactly from its artifact", float(reload_exact), ">=", 1.0, ""))
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"teachers": {"digit": "shrinktunnel.assets:mnist_cnn (pretrained)",
                               "parity": f"same architecture, 2 outputs, trained here {teacher_epochs:g} epoch",
                               "ge5": f"same architecture, 2 outputs, trained here {teacher_epochs:g} epoch"},
                  "fuse": {"epochs": fuse_epochs, "lr": FUSE_LR, "split": "default (before each model's last Linear)"},
                  "latency": {"batch": BATCH, "threads": THREADS, "rounds": rounds, "runs": runs, "warmup": WARMUP},
                  "test_images": len(y_test)},
        "accuracy": acc, "weights": weights, "bytes": size,
        "latency_ms": {k: {"per_round": v, "median": statistics.median(v)} for k, v in per_round.items()},
        "latency_ratio": {"per_round": ratios, "median": statistics.median(ratios)},
        "targets": targets, "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def markdown(res: dict[str, Any]) -> str:
    acc, w, lat = res["accuracy"], res["weights"], res["latency_ms"]
    rows = [[t, pct(a["teacher"]), pct(a["fused_before_distillation"]), pct(a["fused"]),
             f"{100 * (a['teacher'] - a['fused']):.2f} pt"] for t, a in acc.items()]
    s = res["setup"]
    out = md_table(f"Three MNIST tasks fused into one CNN ({s['test_images']:,} test images)",
                   ["task", "own teacher", "fused, before distillation", "fused", "drop"], rows)
    out += "\n" + md_table(
        "Cost: the fused model against running the three models", ["", "three models", "fused", "fused / three"],
        [["weights", f"{w['separate']:,}", f"{w['fused']:,}", f"{w['fused'] / w['separate']:.3f}"],
         ["float32 bytes", f"{res['bytes']['separate']:,}", f"{res['bytes']['fused']:,}",
          f"{res['bytes']['fused'] / res['bytes']['separate']:.3f}"],
         ["latency (median of rounds)", f"{lat['separate']['median']:.2f} ms", f"{lat['fused']['median']:.2f} ms",
          f"{res['latency_ratio']['median']:.3f}"]],
        note=(f"Latency: PyTorch eager, batch {s['latency']['batch']}, {s['latency']['threads']} threads, "
              f"{s['latency']['rounds']} alternated rounds of {s['latency']['runs']} runs; ratio = median of the "
              f"per-round ratios. Fusion: {s['fuse']['epochs']:g} epoch of distillation from the three teachers "
              f"at once, Adam lr {s['fuse']['lr']}; 'before distillation' is the assembled model (digit trunk, each "
              f"teacher's own last layer) before any training."))
    return out + "\n" + targets_table(res["targets"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    parser.add_argument("--smoke", action="store_true", help="a hundredth of the training, one latency round")
    args = parser.parse_args()
    res = run(0.01, 0.01, 1, 2) if args.smoke else run()
    text = markdown(res)
    write_results(args.out, res, text)
    print(text)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

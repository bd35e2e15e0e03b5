"""Benchmark: all-MiniLM-L6-v2 with half of its FFN neurons and a quarter of its attention heads
removed: parameters, latency (PyTorch and ONNX Runtime), and cosine to the original embeddings on
held-out tweets before and after a short distillation (st.distill, cosine loss) on other tweets.

    .venv/bin/python benchmarks/prune_minilm.py

Three ways to choose and repair, side by side before distillation: weight norms (l2, needs no data), the
activation importance (each channel's energy in the layer that reads it, on 16 batches of tweets), and
activation plus refit (each Linear that lost inputs re-solved by least squares on the same tweets). The one
with the best cosine on training tweets (never the held-out ones) is distilled.

Writes benchmarks/results/prune_minilm.json and .md. The issue sets no limit here ("report honestly
what it reaches"), so the only checks are that the pruned model runs, round-trips and exports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shrinktunnel as st  # noqa: E402
from shrinktunnel import assets  # noqa: E402
from shrinktunnel.core.history import get_record  # noqa: E402
from shrinktunnel.export import OrtModel  # noqa: E402
from shrinktunnel.measure.latency import onnx_latency, torch_latency  # noqa: E402
from shrinktunnel.report import Table, fmt_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from ptq_mnist import alternated_rounds, latency_ratio, latency_summary  # noqa: E402

NAME = "prune_minilm"
THREADS = 2
ROUNDS, RUNS, WARMUP = 5, 10, 3
TRAIN_TWEETS = 4096  # calibration and distillation data: drawn from the whole file but the held-out tweets
EVAL_TWEETS, EVAL_OFFSET = 512, 30_000  # held out, far from the training tweets
BATCH, MAX_LEN = 32, 32


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


SELECT_BATCHES = 4  # training tweets (the last 128) on which the variant to distill is chosen


def prune_configs() -> dict[str, st.ChannelPruneConfig]:
    # Only the FFN groups get a ratio (the residual stream reaches the output and is kept anyway);
    # heads go by head_ratio. 1536 -> 768 neurons, 12 -> 9 heads in each of the 6 layers.
    common = dict(ratio=0.0, rules=[{"pattern": "*.intermediate.dense", "ratio": 0.5}], head_ratio=0.25,
                  calibration_batches=16)
    return {"l2": st.ChannelPruneConfig(**common, importance="l2"),
            "activation": st.ChannelPruneConfig(**common, importance="activation"),
            "activation_refit": st.ChannelPruneConfig(**common, importance="activation", refit=True)}


LABELS = {"l2": "l2 weight norms", "activation": "activation importance",
          "activation_refit": "activation importance + least-squares refit"}


def distill_config() -> Any:
    # The embeddings are not pruned: frozen, they halve the optimiser's work. eval_every / restore_best: the
    # cosine on the selection tweets (training tweets, not held out) is checked every 32 steps and the best
    # weights kept
    return st.DistillConfig(loss="cosine", epochs=1, lr=1e-4, freeze=["*embeddings*"], eval_every=32)


def train_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` tweets drawn at random (seeded) from the whole file except the held-out ones (the file is
    sorted by sentiment; see assets.sampled_tweet_batches)."""
    return assets.sampled_tweet_batches(n, exclude=range(EVAL_OFFSET, EVAL_OFFSET + EVAL_TWEETS), seed=seed,
                                        batch_size=BATCH, max_length=MAX_LEN)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}) for b in batches])


def cosine(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = F.cosine_similarity(a, b, dim=-1)
    return {"mean": float(c.mean()), "min": float(c.min()), "p10": float(c.quantile(0.1))}


def run(workdir: Path) -> dict[str, Any]:
    model = assets.minilm()
    train = train_batches(TRAIN_TWEETS)
    held = assets.tweet_batches(EVAL_TWEETS, offset=EVAL_OFFSET, batch_size=BATCH, max_length=MAX_LEN)
    reference = embed(model, held)
    select = train[-SELECT_BATCHES:]
    select_ref = embed(model, select)
    variants: dict[str, Any] = {}
    for key, cfg in prune_configs().items():
        log(f"pruning: {key}")
        t0 = time.perf_counter()
        m = st.prune(model, cfg, data=train, progress=False)
        variants[key] = {"model": m, "time_s": round(time.perf_counter() - t0, 1),
                         "cosine_held_out": cosine(embed(m, held), reference),
                         "cosine_select": cosine(embed(m, select), select_ref)}
        log(f"{key}: held-out cosine {variants[key]['cosine_held_out']['mean']:.4f}")
    chosen = max(variants, key=lambda k: variants[k]["cosine_select"]["mean"])
    pruned, t_prune, cos_before = variants[chosen]["model"], variants[chosen]["time_s"], variants[chosen]["cosine_held_out"]
    log(f"distilling {chosen} on {TRAIN_TWEETS} tweets")
    t0 = time.perf_counter()
    tuned = st.distill(pruned, model, train, distill_config(), progress=False,
                       eval_fn=lambda m: cosine(embed(m, select), select_ref)["mean"])
    t_distill = time.perf_counter() - t0
    distill_log = get_record(tuned)["stages"][-1]["replay"].get("log", {})
    loaded = st.load(st.save(tuned, workdir / "artifact"))
    roundtrip = bool(torch.equal(embed(loaded, held[:1]), embed(tuned, held[:1])))
    cos_after = cosine(embed(loaded, held), reference)
    example = held[0]
    log("exporting and timing")
    onnx = {k: st.export_onnx(m, workdir / f"{k}.onnx", example_inputs=example) for k, m in (("fp32", model), ("pruned", loaded))}
    rts = {k: OrtModel(p, threads=THREADS) for k, p in onnx.items()}
    ort_emb = torch.cat([torch.as_tensor(rts["pruned"](**b)) for b in held])
    cos_onnx = cosine(ort_emb, reference)
    onnx_vs_torch = cosine(ort_emb, embed(loaded, held))
    inputs = ((), {k: v for k, v in example.items()})
    per_round = {
        **alternated_rounds({f"{k}/onnx": (lambda r=r: onnx_latency(r.session, r.feed(**example), warmup=WARMUP, runs=RUNS))
                             for k, r in rts.items()}, ROUNDS),
        **alternated_rounds({f"{k}/torch": (lambda m=m: torch_latency(m, inputs, threads=THREADS, warmup=WARMUP, runs=RUNS))
                             for k, m in (("fp32", model), ("pruned", loaded))}, ROUNDS),
    }
    ratios = {rt: latency_ratio(per_round[f"fp32/{rt}"], per_round[f"pruned/{rt}"]) for rt in ("torch", "onnx")}
    layer0 = loaded.encoder.encoder.layer[0]
    params = {"fp32": sum(p.numel() for p in model.parameters()), "pruned": sum(p.numel() for p in loaded.parameters())}
    emb = model.encoder.embeddings
    enc = {k: sum(p.numel() for p in m.encoder.encoder.parameters()) for k, m in (("fp32", model), ("pruned", loaded))}
    checks = {"roundtrip_bit_identical": roundtrip, "onnx_matches_torch": onnx_vs_torch["min"] > 0.9999}
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in variants.items()}
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"model": "shrinktunnel.assets:minilm",
                  "prune_configs": {k: c.to_dict() for k, c in prune_configs().items()},
                  "distill_config": distill_config().to_dict(), "train_tweets": TRAIN_TWEETS,
                  "eval_tweets": EVAL_TWEETS, "eval_offset": EVAL_OFFSET, "batch": BATCH, "max_length": MAX_LEN,
                  "latency": {"rounds": ROUNDS, "runs_per_round": RUNS, "warmup": WARMUP, "threads": THREADS}},
        "heads_per_layer": {"fp32": 12, "pruned": layer0.attention.self.num_attention_heads},
        "ffn_per_layer": {"fp32": 1536, "pruned": layer0.intermediate.dense.out_features},
        "params": params, "encoder_layer_params": enc, "embedding_params": sum(p.numel() for p in emb.parameters()),
        "variants": summary, "chosen": chosen, "distill_log": distill_log, "onnx_vs_torch": onnx_vs_torch,
        "load_average": os.getloadavg()[0],
        "cosine_before_distill": cos_before, "cosine_after_distill": cos_after, "cosine_after_distill_onnx": cos_onnx,
        "time_s": {"prune": round(t_prune, 1), "distill": round(t_distill, 1)},
        "latency": {k: latency_summary(v) for k, v in per_round.items()}, "speedup": ratios,
        "checks": checks, "passed": all(checks.values()),
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    header = (f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads "
              f"(load average {res['load_average']:.1f} at the end); "
              f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {commit}.\nReproduce with `{res['command']}`.\n")
    s = res["setup"]
    v = Table("Before distillation: how channels are chosen and repaired", ["", "cosine to original, held out (mean / p10 / min)",
                                                                            "time"],
              note="The variant distilled is the one with the best cosine on 128 training tweets (not the held-out ones).")
    for key, var in res["variants"].items():
        c = var["cosine_held_out"]
        v.add(LABELS[key] + (" **(distilled below)**" if key == res["chosen"] else ""),
              f"{c['mean']:.4f} / {c['p10']:.4f} / {c['min']:.4f}", f"{var['time_s']} s")
    t = Table(f"all-MiniLM-L6-v2: half the FFN neurons and a quarter of the heads removed, {LABELS[res['chosen']]}, "
              f"then distilled ({s['eval_tweets']} held-out tweets, batch {s['batch']} x {s['max_length']} tokens)",
              ["", "original", "pruned"],
              note=f"Distillation: st.distill, cosine loss, {s['train_tweets']} tweets, 1 epoch (Adam, lr 1e-4), embeddings "
                   f"frozen, the best of every 32 steps by cosine on 128 training tweets kept. Latency: "
                   f"{s['latency']['threads']} threads, {s['latency']['rounds']} alternated rounds of "
                   f"{s['latency']['runs_per_round']} runs; speed-up = median of per-round ratios.")
    t.add("heads / FFN neurons per layer", "12 / 1536", f"{res['heads_per_layer']['pruned']} / {res['ffn_per_layer']['pruned']}")
    t.add("parameters (all)", f"{res['params']['fp32']:,}", f"{res['params']['pruned']:,}")
    t.add("parameters (transformer layers)", f"{res['encoder_layer_params']['fp32']:,}", f"{res['encoder_layer_params']['pruned']:,}")
    lat, sp = res["latency"], res["speedup"]
    t.add("latency, PyTorch", fmt_ms(lat["fp32/torch"]["best_median_ms"]),
          f"{fmt_ms(lat['pruned/torch']['best_median_ms'])} ({sp['torch']['median_of_rounds']:.2f}x faster)")
    t.add("latency, ONNX Runtime", fmt_ms(lat["fp32/onnx"]["best_median_ms"]),
          f"{fmt_ms(lat['pruned/onnx']['best_median_ms'])} ({sp['onnx']['median_of_rounds']:.2f}x faster)")
    for key, label in (("cosine_before_distill", "cosine to original, before distillation"),
                       ("cosine_after_distill", "cosine to original, after distillation"),
                       ("cosine_after_distill_onnx", "same, ONNX Runtime")):
        c = res[key]
        t.add(label + " (mean / p10 / min)", "1", f"{c['mean']:.4f} / {c['p10']:.4f} / {c['min']:.4f}")
    dl = res.get("distill_log") or {}
    if dl.get("best_step") is not None:
        t.add("distillation: step kept (cosine on 128 training tweets)", "",
              f"{dl['best_step']} of {dl['steps']} ({dl['best_metric']:.4f})")
    t.add("time: prune / distill", "", f"{res['time_s']['prune']} s / {res['time_s']['distill']} s")
    checks = Table("Checks", ["check", "result"])
    for k, ok in res["checks"].items():
        checks.add(k, "pass" if ok else "**FAIL**")
    return "\n".join([header, v.to_markdown(), t.to_markdown(), checks.to_markdown()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"shrinktunnel-{NAME}-") as tmp:
        results = run(Path(tmp))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = render(results)
    write_results(args.json, results, markdown)
    print(markdown)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

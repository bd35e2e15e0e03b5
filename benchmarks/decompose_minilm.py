"""Benchmark: all-MiniLM-L6-v2 with its FFN and attention projections factorised into two thin Linears at
half their weights: parameters, latency (PyTorch and ONNX Runtime), and cosine to the original embeddings on
held-out tweets before and after a short distillation (st.distill, cosine loss) on other tweets.

Three ways to factorise, side by side before distillation: plain truncated SVD of each weight, whitened SVD
(each weight seen through its inputs' second moment on 16 batches of tweets) at half of every layer, and
whitened SVD with ranks chosen per layer from measured sensitivity so that the projections together keep
half their weights. The one with the best cosine on training tweets (never the held-out ones) is distilled.

    .venv/bin/python benchmarks/decompose_minilm.py

Writes benchmarks/results/decompose_minilm.json and .md. The issue sets no limit on the cosine here, so the
checks are: the projections at half their weights, the round trip and ONNX Runtime matching PyTorch.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from _distill_common import log, md_table  # noqa: E402
from ptq_mnist import alternated_rounds, latency_ratio, latency_summary  # noqa: E402

NAME = "decompose_minilm"
THREADS = 2
ROUNDS, RUNS, WARMUP = 5, 10, 3
TRAIN_TWEETS = 4096  # calibration and distillation data: drawn from the whole file but the held-out tweets
EVAL_TWEETS, EVAL_OFFSET = 512, 30_000  # held out, far from the training tweets
BATCH, MAX_LEN = 32, 32
PROJECTIONS = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
               "*.attention.output.dense", "*.intermediate.dense", "*.output.dense"]


SELECT_BATCHES = 4  # training tweets (the last 128) on which the variant to distill is chosen


def decompose_configs() -> dict[str, st.DecomposeConfig]:
    # keep_if_slower off: the issue asks for the projections at half their weights; the latency is then
    # measured and reported as it comes.
    common = {"layers": PROJECTIONS, "keep_if_slower": False}
    return {
        "svd": st.DecomposeConfig(**common, ratio=0.5, method="svd"),
        "whitened": st.DecomposeConfig(**common, ratio=0.5, method="whitened_svd"),
        "whitened_budget": st.DecomposeConfig(**common, method="whitened_svd", budget=0.5, budget_metric="params",
                                              budget_scope="layers", calibration_batches=2,
                                              budget_candidates=[0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
    }


def distill_config() -> Any:
    # The embeddings are not decomposed: frozen, they halve the optimiser's work
    # eval_every / restore_best: the cosine on the selection tweets (training tweets, not held out) is checked
    # every 32 steps and the best weights kept, so a start better than what one epoch reaches is not lost
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


def projection_weights(model) -> int:
    from fnmatch import fnmatchcase

    return sum(p.numel() for n, m in model.named_modules() if any(fnmatchcase(n, pat) for pat in PROJECTIONS)
               for k, p in m.named_parameters() if k.endswith("weight"))


def run(workdir: Path) -> dict[str, Any]:
    model = assets.minilm()
    train = train_batches(TRAIN_TWEETS)
    held = assets.tweet_batches(EVAL_TWEETS, offset=EVAL_OFFSET, batch_size=BATCH, max_length=MAX_LEN)
    reference = embed(model, held)
    select = train[-SELECT_BATCHES:]
    select_ref = embed(model, select)
    variants: dict[str, Any] = {}
    for key, cfg in decompose_configs().items():
        log(f"decomposing: {key}")
        t0 = time.perf_counter()
        m = st.decompose(model, cfg, data=train, progress=False)
        variants[key] = {"model": m, "time_s": round(time.perf_counter() - t0, 1),
                         "layers": get_record(m)["stages"][-1]["replay"]["layers"],
                         "projection_weights": projection_weights(m),
                         "cosine_held_out": cosine(embed(m, held), reference),
                         "cosine_select": cosine(embed(m, select), select_ref)}
        log(f"{key}: {len(variants[key]['layers'])} layers in {variants[key]['time_s']:.0f} s, held-out cosine "
            f"{variants[key]['cosine_held_out']['mean']:.4f}")
    chosen = max(variants, key=lambda k: variants[k]["cosine_select"]["mean"])
    dec, layers, t_dec = variants[chosen]["model"], variants[chosen]["layers"], variants[chosen]["time_s"]
    cos_before = variants[chosen]["cosine_held_out"]
    log(f"distilling {chosen} on {TRAIN_TWEETS} tweets")
    t0 = time.perf_counter()
    tuned = st.distill(dec, model, train, distill_config(), progress=False,
                       eval_fn=lambda m: cosine(embed(m, select), select_ref)["mean"])
    t_distill = time.perf_counter() - t0
    distill_log = get_record(tuned)["stages"][-1]["replay"].get("log", {})
    loaded = st.load(st.save(tuned, workdir / "artifact"))
    roundtrip = bool(torch.equal(embed(loaded, held[:1]), embed(tuned, held[:1])))
    cos_after = cosine(embed(loaded, held), reference)
    log(f"distilled in {t_distill:.0f} s, cosine {cos_after['mean']:.4f}; exporting and timing")
    example = held[0]
    onnx = {k: st.export_onnx(m, workdir / f"{k}.onnx", example_inputs=example) for k, m in (("fp32", model), ("ours", loaded))}
    rts = {k: OrtModel(p, threads=THREADS) for k, p in onnx.items()}
    ort_emb = torch.cat([torch.as_tensor(rts["ours"](**b)) for b in held])
    cos_onnx = cosine(ort_emb, reference)
    onnx_vs_torch = cosine(ort_emb, embed(loaded, held))
    inputs = ((), {k: v for k, v in example.items()})
    per_round = {
        **alternated_rounds({f"{k}/onnx": (lambda r=r: onnx_latency(r.session, r.feed(**example), warmup=WARMUP, runs=RUNS))
                             for k, r in rts.items()}, ROUNDS),
        **alternated_rounds({f"{k}/torch": (lambda m=m: torch_latency(m, inputs, threads=THREADS, warmup=WARMUP, runs=RUNS))
                             for k, m in (("fp32", model), ("ours", loaded))}, ROUNDS),
    }
    ratios = {rt: latency_ratio(per_round[f"ours/{rt}"], per_round[f"fp32/{rt}"]) for rt in ("torch", "onnx")}
    proj = {"fp32": projection_weights(model), "ours": projection_weights(loaded)}
    params = {"fp32": sum(p.numel() for p in model.parameters()), "ours": sum(p.numel() for p in loaded.parameters())}
    checks = {"projections_at_half": proj["ours"] <= 0.5 * proj["fp32"],
              "whitened_beats_plain_svd_before_distillation":
                  variants["whitened"]["cosine_held_out"]["mean"] > variants["svd"]["cosine_held_out"]["mean"],
              "roundtrip_bit_identical": roundtrip, "onnx_matches_torch": onnx_vs_torch["min"] > 0.9999}
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in variants.items()}
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "load_average": os.getloadavg()[0],
        "setup": {"model": "shrinktunnel.assets:minilm",
                  "decompose_configs": {k: c.to_dict() for k, c in decompose_configs().items()},
                  "distill_config": distill_config().to_dict(), "train_tweets": TRAIN_TWEETS,
                  "eval_tweets": EVAL_TWEETS, "eval_offset": EVAL_OFFSET, "batch": BATCH, "max_length": MAX_LEN,
                  "latency": {"rounds": ROUNDS, "runs_per_round": RUNS, "warmup": WARMUP, "threads": THREADS}},
        "variants": summary, "chosen": chosen, "distill_log": distill_log, "layers": layers, "projection_weights": proj, "params": params,
        "cosine_before_distill": cos_before, "cosine_after_distill": cos_after, "cosine_after_distill_onnx": cos_onnx,
        "onnx_vs_torch": onnx_vs_torch, "time_s": {"decompose": round(t_dec, 1), "distill": round(t_distill, 1)},
        "latency": {k: latency_summary(v) for k, v in per_round.items()}, "latency_ratio": ratios,
        "checks": checks, "passed": all(checks.values()),
    }


LABELS = {"svd": "plain SVD, half of every layer", "whitened": "whitened SVD, half of every layer",
          "whitened_budget": "whitened SVD, ranks by sensitivity (half of all projections)"}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    header = (f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads "
              f"(load average {res['load_average']:.1f} at the end); torch {m['torch']}, "
              f"onnxruntime {m['onnxruntime']}; commit {commit}.\nReproduce with `{res['command']}`.\n")
    s, lat, r = res["setup"], res["latency"], res["latency_ratio"]
    fp32_proj = res["projection_weights"]["fp32"]
    vrows = []
    for key, v in res["variants"].items():
        errs = [d["output_error"] for d in v["layers"].values() if "output_error" in d]
        werrs = [d["weight_error"] for d in v["layers"].values()]
        c = v["cosine_held_out"]
        vrows.append([LABELS[key] + (" **(distilled below)**" if key == res["chosen"] else ""), len(v["layers"]),
                      f"{v['projection_weights'] / fp32_proj:.3f}x",
                      f"{min(werrs):.2f} / {max(werrs):.2f}",
                      f"{min(errs):.2f} / {max(errs):.2f}" if errs else "-",
                      f"{c['mean']:.4f} / {c['p10']:.4f} / {c['min']:.4f}", f"{v['time_s']} s"])
    variants = md_table(
        "Before distillation: three ways to factorise", ["", "layers", "projection weights", "weight error (min / max)",
                                                         "output error on calibration (min / max)",
                                                         "cosine to fp32, held out (mean / p10 / min)", "time"], vrows,
        note="Weight error ‖W−W̃‖/‖W‖; output error ‖(W−W̃)Xᵀ‖/‖WXᵀ‖ on the 16 calibration batches whose second moment "
             "whitens. The variant distilled is the one with the best cosine on 128 training tweets (not the "
             "held-out ones).")
    ranks = sorted({tuple(d["ranks"]) for d in res["layers"].values()})
    ms = lambda k: f"{lat[k]['best_median_ms']:.1f} ms"  # noqa: E731
    rows = [
        ["projection weights (36 Linears)", f"{fp32_proj:,}",
         f"{res['projection_weights']['ours']:,} ({res['projection_weights']['ours'] / fp32_proj:.3f}x)"],
        ["parameters (all)", f"{res['params']['fp32']:,}", f"{res['params']['ours']:,}"],
        ["layers factorised / ranks", "", f"{len(res['layers'])} / {', '.join(str(x[0]) for x in ranks)}"],
        ["latency, PyTorch", ms("fp32/torch"), f"{ms('ours/torch')} ({r['torch']['median_of_rounds']:.3f}x)"],
        ["latency, ONNX Runtime", ms("fp32/onnx"), f"{ms('ours/onnx')} ({r['onnx']['median_of_rounds']:.3f}x)"],
    ]
    for key, label in (("cosine_before_distill", "cosine to fp32, before distillation"),
                       ("cosine_after_distill", "cosine to fp32, after distillation"),
                       ("cosine_after_distill_onnx", "same, ONNX Runtime")):
        c = res[key]
        rows.append([label + " (mean / p10 / min)", "1", f"{c['mean']:.4f} / {c['p10']:.4f} / {c['min']:.4f}"])
    dl = res.get("distill_log") or {}
    if dl.get("best_step") is not None:
        rows.append(["distillation: step kept (cosine on 128 training tweets)", "",
                     f"{dl['best_step']} of {dl['steps']} ({dl['best_metric']:.4f})"])
    rows.append(["time: decompose / distill", "", f"{res['time_s']['decompose']} s / {res['time_s']['distill']} s"])
    table = md_table(
        f"all-MiniLM-L6-v2: FFN and attention projections at half their weights, {LABELS[res['chosen']]}, then "
        f"distilled ({s['eval_tweets']} held-out tweets, batch {s['batch']} x {s['max_length']} tokens)",
        ["", "fp32", "decomposed"], rows,
        note=f"Layers: query, key, value, attention output, intermediate, output of the 6 blocks; each Linear -> two "
             f"Linears. Distillation: st.distill, cosine loss, {s['train_tweets']} tweets, 1 epoch (Adam, lr 1e-4), embeddings "
             f"frozen, the best of every 32 steps by cosine on 128 training tweets kept. "
             f"Latency: {s['latency']['threads']} threads, {s['latency']['rounds']} alternated rounds of "
             f"{s['latency']['runs_per_round']} runs; ratio = median of per-round ratios (below 1: faster).")
    checks = md_table("Checks", ["check", "result"], [[k, "pass" if ok else "**FAIL**"] for k, ok in res["checks"].items()])
    return "\n".join([header, variants, table, checks])


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

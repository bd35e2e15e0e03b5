"""Benchmark: all-MiniLM-L6-v2 with every FFN and attention projection replaced by a truncated SVD at half
its weights: parameters, latency (PyTorch and ONNX Runtime), and cosine to the original embeddings on
held-out tweets before and after a short distillation (st.distill, cosine loss) on other tweets.

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
TRAIN_TWEETS = 4096  # distillation data: tweets 0..4095
EVAL_TWEETS, EVAL_OFFSET = 512, 30_000  # held out, far from the training tweets
BATCH, MAX_LEN = 32, 32
PROJECTIONS = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
               "*.attention.output.dense", "*.intermediate.dense", "*.output.dense"]


def decompose_config() -> st.DecomposeConfig:
    # keep_if_slower off: the issue asks for every projection at half its weights; the latency is then
    # measured and reported as it comes.
    return st.DecomposeConfig(layers=PROJECTIONS, ratio=0.5, keep_if_slower=False)


def distill_config() -> Any:
    return st.DistillConfig(loss="cosine", epochs=1, lr=2e-4)


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
    train = assets.tweet_batches(TRAIN_TWEETS, batch_size=BATCH, max_length=MAX_LEN)
    held = assets.tweet_batches(EVAL_TWEETS, offset=EVAL_OFFSET, batch_size=BATCH, max_length=MAX_LEN)
    reference = embed(model, held)
    log("decomposing")
    t0 = time.perf_counter()
    dec = st.decompose(model, decompose_config(), data=train[:4], progress=False)
    t_dec = time.perf_counter() - t0
    layers = get_record(dec)["stages"][-1]["replay"]["layers"]
    cos_before = cosine(embed(dec, held), reference)
    log(f"decomposed {len(layers)} layers in {t_dec:.0f} s, cosine {cos_before['mean']:.4f}; distilling on {TRAIN_TWEETS} tweets")
    t0 = time.perf_counter()
    tuned = st.distill(dec, model, train, distill_config(), progress=False)
    t_distill = time.perf_counter() - t0
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
    checks = {"projections_at_half": proj["ours"] <= 0.5 * proj["fp32"], "all_36_projections": len(layers) == 36,
              "roundtrip_bit_identical": roundtrip, "onnx_matches_torch": onnx_vs_torch["min"] > 0.9999}
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "load_average": os.getloadavg()[0],
        "setup": {"model": "shrinktunnel.assets:minilm", "decompose_config": decompose_config().to_dict(),
                  "distill_config": distill_config().to_dict(), "train_tweets": TRAIN_TWEETS,
                  "eval_tweets": EVAL_TWEETS, "eval_offset": EVAL_OFFSET, "batch": BATCH, "max_length": MAX_LEN,
                  "latency": {"rounds": ROUNDS, "runs_per_round": RUNS, "warmup": WARMUP, "threads": THREADS}},
        "layers": layers, "projection_weights": proj, "params": params,
        "cosine_before_distill": cos_before, "cosine_after_distill": cos_after, "cosine_after_distill_onnx": cos_onnx,
        "onnx_vs_torch": onnx_vs_torch, "time_s": {"decompose": round(t_dec, 1), "distill": round(t_distill, 1)},
        "latency": {k: latency_summary(v) for k, v in per_round.items()}, "latency_ratio": ratios,
        "checks": checks, "passed": all(checks.values()),
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    header = (f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads "
              f"(load average {res['load_average']:.1f} at the end: other jobs shared the machine); torch {m['torch']}, "
              f"onnxruntime {m['onnxruntime']}; commit {commit}.\nReproduce with `{res['command']}`.\n")
    s, lat, r = res["setup"], res["latency"], res["latency_ratio"]
    ranks = sorted({tuple(d["ranks"]) for d in res["layers"].values()})
    errs = [d["weight_error"] for d in res["layers"].values()]
    ms = lambda k: f"{lat[k]['best_median_ms']:.1f} ms"  # noqa: E731
    rows = [
        ["projection weights (36 Linears)", f"{res['projection_weights']['fp32']:,}",
         f"{res['projection_weights']['ours']:,} ({res['projection_weights']['ours'] / res['projection_weights']['fp32']:.3f}x)"],
        ["parameters (all)", f"{res['params']['fp32']:,}", f"{res['params']['ours']:,}"],
        ["ranks (384x384 / 384<->1536)", "", " / ".join(str(x[0]) for x in ranks)],
        ["weight error ‖W−W̃‖/‖W‖ (min / max)", "", f"{min(errs):.3f} / {max(errs):.3f}"],
        ["latency, PyTorch", ms("fp32/torch"), f"{ms('ours/torch')} ({r['torch']['median_of_rounds']:.3f}x)"],
        ["latency, ONNX Runtime", ms("fp32/onnx"), f"{ms('ours/onnx')} ({r['onnx']['median_of_rounds']:.3f}x)"],
    ]
    for key, label in (("cosine_before_distill", "cosine to fp32, before distillation"),
                       ("cosine_after_distill", "cosine to fp32, after distillation"),
                       ("cosine_after_distill_onnx", "same, ONNX Runtime")):
        c = res[key]
        rows.append([label + " (mean / p10 / min)", "1", f"{c['mean']:.4f} / {c['p10']:.4f} / {c['min']:.4f}"])
    rows.append(["time: decompose / distill", "", f"{res['time_s']['decompose']} s / {res['time_s']['distill']} s"])
    table = md_table(
        f"all-MiniLM-L6-v2: FFN and attention projections at half their weights ({s['eval_tweets']} held-out tweets, "
        f"batch {s['batch']} x {s['max_length']} tokens)", ["", "fp32", "decomposed"], rows,
        note=f"`{{layers: [query, key, value, attention output, intermediate, output], ratio: 0.5}}`: each Linear -> two "
             f"Linears by truncated SVD. Distillation: st.distill, cosine loss, {s['train_tweets']} tweets, 1 epoch. "
             f"Latency: {s['latency']['threads']} threads, {s['latency']['rounds']} alternated rounds of "
             f"{s['latency']['runs_per_round']} runs; ratio = median of per-round ratios (below 1: faster).")
    checks = md_table("Checks", ["check", "result"], [[k, "pass" if ok else "**FAIL**"] for k, ok in res["checks"].items()])
    return "\n".join([header, table, checks])


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

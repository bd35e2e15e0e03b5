"""Benchmark: `st.analyze` and `st.auto` on the MNIST CNN, against the issue's targets.

    .venv/bin/python benchmarks/search_mnist.py     # this benchmark alone

The search scores candidates on 1,000 validation images (the metric the search sees); the chosen
models are then scored on the 10,000 test images in PyTorch and ONNX Runtime, which the search never
saw. Every action whose method is registered takes part (the list is recorded). Writes
benchmarks/results/search_mnist.json and .md; exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import operator
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.export import OrtModel
from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes
from shrinktunnel.measure.latency import onnx_latency
from shrinktunnel.report import Table, fmt_bytes, fmt_pct
from shrinktunnel.search import analyze, auto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "search_mnist"
THREADS = 2
MAX_DROP = 0.005  # the issue's --max-drop 0.5 (points of accuracy)
MIN_SIZE_RATIO = 30.0  # fp32 safetensors / artifact, objective size
MIN_SPEEDUP = 3.0  # ONNX Runtime fp32 / chosen, objective latency
MAX_SEARCH_S = 600.0  # the whole search on the MNIST CNN, 2 cores
MAX_CACHED_S = 5.0  # a second analysis reads the cache
ROUNDS = 5


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


_COMPARE = {"<=": operator.le, ">=": operator.ge}


def target(name, description, measured, op, limit, unit) -> dict[str, Any]:
    return {"name": name, "description": description, "measured": measured, "op": op, "limit": limit,
            "unit": unit, "passed": bool(_COMPARE[op](measured, limit))}


def ort_figures(model, example, test, workdir: Path, name: str) -> dict[str, Any]:
    path = st.export_onnx(model, workdir / f"{name}.onnx", example_inputs=example)
    runtime = OrtModel(path, threads=THREADS)
    return {"path": path, "runtime": runtime, "accuracy_onnx": accuracy(runtime, test),
            "accuracy_torch": accuracy(model, test), "onnx_bytes": path.stat().st_size}


def run(workdir: Path) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    model = assets.mnist_cnn()
    search_data = assets.mnist_split("valid", limit=1000, batch_size=250)
    test = assets.mnist_test()
    eval_fn = lambda m: accuracy(m, search_data)  # noqa: E731
    cache = workdir / "cache"
    log("analyze (fresh cache)")
    t0 = time.perf_counter()
    a = analyze(model, search_data, eval_fn=eval_fn, cache_dir=cache, progress=False)
    t_analyze = time.perf_counter() - t0
    t0 = time.perf_counter()
    a2 = analyze(model, search_data, eval_fn=eval_fn, cache_dir=cache, progress=False)
    t_cached = time.perf_counter() - t0
    a.save(workdir / "analysis")
    results: dict[str, Any] = {}
    for objective in ("size", "latency"):
        log(f"auto, objective {objective}")
        t0 = time.perf_counter()
        r = auto(model, search_data, eval_fn=eval_fn, max_drop=MAX_DROP, objective=objective, analysis=a,
                 cache_dir=cache, progress=False)
        elapsed = time.perf_counter() - t0
        out = r.save(workdir / f"auto_{objective}")
        results[objective] = {"result": r, "seconds": elapsed, "artifact_bytes": artifact_bytes(out)}
    fp32_bytes = float_safetensors_bytes(model)
    example = test[0][0][:64]
    log("test accuracy and ONNX Runtime latency")
    fig = {"fp32": ort_figures(model, example, test, workdir, "fp32")}
    for objective, res in results.items():
        fig[objective] = ort_figures(res["result"].model, example, test, workdir, objective)
    per_round = {k: [] for k in fig}
    for _ in range(ROUNDS):  # alternated: the machine has slow spells
        for k, f in fig.items():
            feed = f["runtime"].feed(example)
            per_round[k].append(onnx_latency(f["runtime"].session, feed, warmup=5, runs=50).median_ms)
    speedup = {k: statistics.median(b / c for b, c in zip(per_round["fp32"], per_round[k])) for k in fig}
    summary = {}
    for objective, res in results.items():
        r = res["result"]
        summary[objective] = {
            "fits": r.fits, "message": r.message, "plan": r.candidates[r.chosen]["plan"],
            "candidates": len(r.candidates), "seconds": res["seconds"],
            "artifact_bytes": res["artifact_bytes"], "size_ratio": fp32_bytes / res["artifact_bytes"],
            "search_metric": r.candidates[r.chosen]["metric"],
            "test_accuracy_torch": fig[objective]["accuracy_torch"], "test_accuracy_onnx": fig[objective]["accuracy_onnx"],
            "onnx_latency_ms": min(per_round[objective]), "speedup_vs_fp32_onnx": speedup[objective],
        }
    base = fig["fp32"]
    total_search = t_analyze + sum(res["seconds"] for res in results.values())
    targets = [
        target("size_ratio", "objective size: fp32 safetensors / artifact", summary["size"]["size_ratio"], ">=",
               MIN_SIZE_RATIO, "x"),
        target("size_drop", "objective size: test accuracy drop, ONNX Runtime",
               100 * (base["accuracy_onnx"] - summary["size"]["test_accuracy_onnx"]), "<=", 100 * MAX_DROP, "pt"),
        target("latency_speedup", "objective latency: ONNX Runtime fp32 / chosen latency",
               summary["latency"]["speedup_vs_fp32_onnx"], ">=", MIN_SPEEDUP, "x"),
        target("latency_drop", "objective latency: test accuracy drop, ONNX Runtime",
               100 * (base["accuracy_onnx"] - summary["latency"]["test_accuracy_onnx"]), "<=", 100 * MAX_DROP, "pt"),
        target("search_time", "analysis + both searches, seconds", total_search, "<=", MAX_SEARCH_S, "s"),
        target("cached_analysis", "second analysis (cache), seconds", t_cached, "<=", MAX_CACHED_S, "s"),
    ]
    return {
        "benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS), "source": git_state(),
        "setup": {"model": "shrinktunnel.assets:mnist_cnn", "search_images": 1000, "test_images": 10000,
                  "max_drop": MAX_DROP, "actions": [x["name"] for x in a.actions], "skipped_actions": a.skipped_actions},
        "fp32": {"bytes": fp32_bytes, "test_accuracy_torch": base["accuracy_torch"], "test_accuracy_onnx": base["accuracy_onnx"],
                 "onnx_latency_ms": min(per_round["fp32"])},
        "analysis": {"seconds": t_analyze, "cached_seconds": t_cached, "evaluations": a.cache["evaluated"],
                     "cached_hits": a2.cache["hits"]},
        "auto": summary, "targets": targets, "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    lines = [f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads; torch "
             f"{m['torch']}, onnxruntime {m['onnxruntime']}; commit {commit}. Actions searched: "
             f"{', '.join(res['setup']['actions'])}.\n"]
    t = Table(f"MNIST CNN: st.auto at max_drop {100 * res['setup']['max_drop']:.1f} pt (search on 1,000 validation "
              f"images, figures on the 10,000 test images)", ["", "fp32", "objective size", "objective latency"])
    f, s, lt = res["fp32"], res["auto"]["size"], res["auto"]["latency"]
    t.add("test accuracy, PyTorch", fmt_pct(f["test_accuracy_torch"]), fmt_pct(s["test_accuracy_torch"]), fmt_pct(lt["test_accuracy_torch"]))
    t.add("test accuracy, ONNX Runtime", fmt_pct(f["test_accuracy_onnx"]), fmt_pct(s["test_accuracy_onnx"]), fmt_pct(lt["test_accuracy_onnx"]))
    t.add("size on disk", fmt_bytes(f["bytes"]), f"{fmt_bytes(s['artifact_bytes'])} ({s['size_ratio']:.1f}x smaller)",
          f"{fmt_bytes(lt['artifact_bytes'])} ({lt['size_ratio']:.1f}x smaller)")
    t.add("latency, ONNX Runtime (batch 64)", f"{f['onnx_latency_ms']:.2f} ms",
          f"{s['onnx_latency_ms']:.2f} ms ({s['speedup_vs_fp32_onnx']:.2f}x)", f"{lt['onnx_latency_ms']:.2f} ms ({lt['speedup_vs_fp32_onnx']:.2f}x)")
    t.add("plan", "", ", ".join(f"{k}: {v}" for k, v in s["plan"].items()) or "none",
          ", ".join(f"{k}: {v}" for k, v in lt["plan"].items()) or "none")
    t.add("candidates evaluated / seconds", "", f"{s['candidates']} / {s['seconds']:.0f} s", f"{lt['candidates']} / {lt['seconds']:.0f} s")
    lines.append(t.to_markdown())
    an = res["analysis"]
    lines.append(f"Analysis: {an['evaluations']} evaluations in {an['seconds']:.0f} s; the second run read {an['cached_hits']} "
                 f"from the cache in {an['cached_seconds']:.2f} s.\n")
    tt = Table("Targets", ["target", "measured", "required", "result"])
    for x in res["targets"]:
        tt.add(x["description"], f"{x['measured']:.3g} {x['unit']}", f"{x['op']} {x['limit']:g} {x['unit']}",
               "pass" if x["passed"] else "**FAIL**")
    lines.append(tt.to_markdown())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="search-mnist-"))
    try:
        res = run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    markdown = render(res)
    write_results(args.results, res, markdown)
    print(markdown)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

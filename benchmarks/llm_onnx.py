"""An int4 SmolLM2-135M generating in ONNX Runtime (issue 20): greedy tokens against fp32 PyTorch, decode
speed of int4 MatMulNBits against the fp32 graph, file sizes.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/llm_onnx.py [--method rtn|awq_gptq] [--prompts 8]

The int4 model: weight-only, asymmetric, groups of 64, tied lm_head float (tied: auto); `--method awq_gptq`
(the best perplexity, minutes) or `rtn` (seconds; the same graph and kernels, so the same speed). Both
graphs come from export_llm (one builder: only the Linears differ). Greedy: `--prompts` prompts of 16
tokens of prose, 16 new tokens; a prompt agrees for its first k tokens when int4 ONNX Runtime and fp32
PyTorch (transformers' generate) pick the same k first tokens. Decode speed: batch 1, 2 intra-op threads,
64 new tokens after a 16-token prompt, the two sessions alternated 3 times, the median of each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, today, write_results  # noqa: E402

THREADS = 2
CONFIGS = {
    "rtn": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}, "activations": None},
    "awq_gptq": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
                 "activations": None, "awq": True, "rounding": "gptq"},
}


def main() -> None:
    import torch

    import shrinktunnel as st
    import shrinktunnel.assets_text as A
    from shrinktunnel.export.llm import export_llm, generate, llm_session

    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="awq_gptq", choices=sorted(CONFIGS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--part", default="all", choices=["all", "greedy", "speed"],
                    help="greedy: agreement only (no timing, needs no lock); speed: decode tokens/s only (under the lock)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    model, tok = A.smollm2()
    calib = A.token_windows(tok, A.tweets()[0][:3000], 256, samples=16)
    t = time.perf_counter()
    q = st.quantize(model, CONFIGS[args.method], data=[calib[i:i + 4] for i in range(0, 16, 4)], progress=False)
    quant_s = time.perf_counter() - t
    prompts = A.token_windows(tok, A.prose("calibration"), 16, samples=args.prompts * 7)[::7][:args.prompts]
    row = {"method": args.method, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quant_s": quant_s,
           "load": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        f32, i4 = Path(d) / "fp32.onnx", Path(d) / "int4.onnx"
        t = time.perf_counter()
        info32, info4 = export_llm(model, f32), export_llm(q, i4)
        row.update(export_s=time.perf_counter() - t, fp32_onnx_bytes=info32["bytes"], int4_onnx_bytes=info4["bytes"],
                   matmul_nbits=info4["nodes"].get("MatMulNBits", 0), notes=info4["notes"])
        s32, s4 = llm_session(f32, THREADS), llm_session(i4, THREADS)
        agree, example = [], None
        for p in (prompts if args.part != "speed" else []):
            ids = p.reshape(1, -1)
            with torch.no_grad():
                ref = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False)[0, ids.shape[1]:].tolist()
            got = generate(s4, ids, args.new_tokens)["tokens"][0].tolist()
            agree.append(next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref)))
            example = example or {"prompt": tok.decode(p), "fp32_torch": tok.decode(ref), "int4_ort": tok.decode(got)}
        row["first_tokens_agreeing"], row["example"] = agree, example
        speed = {"fp32": [], "int4": []}
        for _ in range(3 if args.part != "greedy" else 0):  # alternated: the machine's slow spells hit both
            for name, s in (("fp32", s32), ("int4", s4)):
                speed[name].append(generate(s, prompts[0].reshape(1, -1), args.decode_tokens + 1)["decode_tokens_per_s"])
        if speed["fp32"]:
            row["decode_tokens_per_s"] = {k: statistics.median(v) for k, v in speed.items()}
            row["decode_runs"] = speed
            row["speedup"] = row["decode_tokens_per_s"]["int4"] / row["decode_tokens_per_s"]["fp32"]
    row["load_after"] = os.getloadavg()
    with open(RESULTS_DIR / "llm_onnx.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    row["part"] = args.part
    print(json.dumps(row))
    if args.part != "all":
        return  # the table needs both parts: rows of llm_onnx.jsonl
    n8 = sum(a >= 8 for a in agree)
    md = [f"SmolLM2-135M-Instruct in ONNX Runtime ({args.method} int4 g64 asym, tied head float), batch 1, "
          f"{THREADS} threads; {today()}; load average {row['load'][0]:.1f} at the start", "",
          "| graph | file MB | decode tokens/s (median of 3) |", "|---|---|---|",
          f"| fp32 (MatMul) | {row['fp32_onnx_bytes'] / 1e6:.0f} | {row['decode_tokens_per_s']['fp32']:.1f} |",
          f"| int4 (MatMulNBits x {row['matmul_nbits']}) | {row['int4_onnx_bytes'] / 1e6:.0f} | "
          f"{row['decode_tokens_per_s']['int4']:.1f} ({row['speedup']:.2f}x) |", "",
          f"Greedy, {args.prompts} prompts of 16 tokens, {args.new_tokens} new: first tokens where int4 ONNX Runtime "
          f"agrees with fp32 PyTorch {agree}; {n8} of {args.prompts} prompts agree on at least the first 8."]
    write_results(RESULTS_DIR / "llm_onnx.json", {"machine": machine_info(THREADS), "row": row}, "\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(row["example"]))


if __name__ == "__main__":
    main()

"""An int4 SmolLM2-135M generating in ONNX Runtime (issue 20): greedy tokens against fp32 PyTorch, decode
speed of int4 MatMulNBits against the fp32 graph, file sizes.

    .venv/bin/python benchmarks/llm_onnx.py --part export [--method gptq|rtn|awq_gptq]   # quantize, write both graphs
    .venv/bin/python benchmarks/llm_onnx.py --part greedy [--method ...]            # agreement (no timing)
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/llm_onnx.py --part speed [--method ...]

The int4 model: weight-only, asymmetric, groups of 64, tied lm_head float (tied: auto); `--method awq_gptq`
or `gptq` (the best perplexities, minutes; calibrated on 16 x 256 tokens of the calibration prose) or `rtn`
(seconds; the same graph and kernels, so the same speed). Both
graphs come from export_llm (one builder: only the Linears differ). Greedy: `--prompts` prompts of 16
tokens of the evaluation prose's second half (`greedy_prompts`: disjoint from calibration and perplexity), 16 new tokens; a prompt agrees for its first k tokens when int4 ONNX Runtime and fp32
PyTorch (transformers' generate) pick the same k first tokens. Decode speed: batch 1, 2 intra-op threads,
32 new tokens after a 16-token prompt, the two sessions alternated 3 times, the median of each. The
graphs are cached in $SHRINKTUNNEL_CACHE/llm_onnx/<method> by the export part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
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
    "gptq": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
             "activations": None, "rounding": "gptq"},
    # the same, with the tied head quantized once at 8 bits for both uses (the float head is 113 MB read per token)
    "gptq_head8": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
                   "activations": None, "rounding": "gptq", "tied": "quantize",
                   "overrides": [{"pattern": "lm_head", "weights": {"bits": 8, "symmetric": False,
                                                                    "granularity": "per_group", "group_size": 64}}]},
    "gptq_head4": {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
                   "activations": None, "rounding": "gptq", "tied": "quantize"},
}


def greedy_prompts(tok, n: int):
    """n prompts of 16 tokens from the second half of the evaluation prose: disjoint from the calibration
    prose and from the perplexity windows (the first 4 x 512 tokens of the evaluation prose)."""
    import shrinktunnel.assets_text as A

    text = A.prose("evaluation")
    return A.token_windows(tok, text[len(text) // 2:], 16, samples=n * 7)[::7][:n]


def _cache(method: str) -> Path:
    root = Path(os.environ.get("SHRINKTUNNEL_CACHE", Path.home() / ".cache" / "shrinktunnel"))
    return root / "llm_onnx" / method


def export_part(args, model, tok) -> dict:
    """Quantize and export both graphs into the cache (no timing that matters: run outside the lock)."""
    import torch

    import shrinktunnel as st
    import shrinktunnel.assets_text as A
    from shrinktunnel.export.llm import export_llm

    # 16 x 256 tokens of the calibration prose (benchmarks/llm.py's default, disjoint from the evaluation prose)
    calib = A.token_windows(tok, A.prose("calibration"), 256, samples=16)
    t = time.perf_counter()
    with torch.no_grad():
        q = st.quantize(model, CONFIGS[args.method], data=[calib[i:i + 4] for i in range(0, 16, 4)], progress=False)
    quant_s = time.perf_counter() - t
    d = _cache(args.method)
    d.mkdir(parents=True, exist_ok=True)
    info32, info4 = export_llm(model, d / "fp32.onnx"), export_llm(q, d / "int4.onnx")
    row = {"quant_s_untimed": quant_s, "fp32_onnx_bytes": info32["bytes"], "int4_onnx_bytes": info4["bytes"],
           "matmul_nbits": info4["nodes"].get("MatMulNBits", 0), "notes": info4["notes"]}
    (d / "export.json").write_text(json.dumps(row))
    return row


def main() -> None:
    import torch

    import shrinktunnel.assets_text as A
    from shrinktunnel.export.llm import generate, llm_session

    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=sorted(CONFIGS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--part", required=True, choices=["export", "greedy", "speed"],
                    help="export: quantize and write both graphs to the cache (no lock); greedy: agreement with fp32 "
                         "PyTorch (no timing, no lock); speed: decode tokens/s of the cached graphs (under the lock)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    row = {"method": args.method, "part": args.part, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load": os.getloadavg()}
    d = _cache(args.method)
    if args.part == "export":
        model, tok = A.smollm2()
        row.update(export_part(args, model, tok))
    elif args.part == "greedy":
        # One thread: nothing is timed here, and on a loaded machine every op of a 2-thread pool waits for a
        # core at each synchronisation (measured: 8 prompts did not finish in 25 minutes with 2 threads at load 20).
        torch.set_num_threads(1)
        model, tok = A.smollm2()
        prompts = greedy_prompts(tok, args.prompts)
        s4 = llm_session(d / "int4.onnx", 1)
        agree, example, margins = [], None, []
        for p in prompts:
            ids = p.reshape(1, -1)
            with torch.no_grad():
                ref = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False)[0, ids.shape[1]:].tolist()
            got = generate(s4, ids, args.new_tokens)["tokens"][0].tolist()
            k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
            agree.append(k)
            if k < len(ref):  # how close fp32 itself was at the first disagreement (a near tie flips on any change)
                with torch.no_grad():
                    prob = model(torch.cat([ids, torch.tensor([ref[:k]], dtype=ids.dtype)], 1)).logits[0, -1].softmax(-1)
                margins.append({"at": k, "p_fp32_token": float(prob[ref[k]]), "p_int4_token": float(prob[got[k]])})
            example = example or {"prompt": tok.decode(p), "fp32_torch": tok.decode(ref), "int4_ort": tok.decode(got)}
        row.update(first_tokens_agreeing=agree, example=example, new_tokens=args.new_tokens, disagreements=margins)
    else:
        prompt = torch.arange(100, 116).reshape(1, -1)  # any 16 tokens: the speed does not depend on them
        sessions = {"fp32": llm_session(d / "fp32.onnx", THREADS), "int4": llm_session(d / "int4.onnx", THREADS)}
        speed = {"fp32": [], "int4": []}
        for _ in range(3):  # alternated: the machine's slow spells hit both
            for name, s in sessions.items():
                speed[name].append(generate(s, prompt, args.decode_tokens + 1)["decode_tokens_per_s"])
        row["decode_tokens_per_s"] = {k: statistics.median(v) for k, v in speed.items()}
        row["decode_runs"] = speed
        row["speedup"] = row["decode_tokens_per_s"]["int4"] / row["decode_tokens_per_s"]["fp32"]
        row["pairwise_speedups"] = [b / a for a, b in zip(speed["fp32"], speed["int4"])]
    row["load_after"] = os.getloadavg()
    with open(RESULTS_DIR / "llm_onnx.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    render(args.method)


def render(method: str) -> None:
    """results/llm_onnx.md from the latest row of each part in the jsonl."""
    latest = {}
    for line in (RESULTS_DIR / "llm_onnx.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("method") == method and r.get("part"):
            latest[r["part"]] = r
    ex, gr, sp = latest.get("export"), latest.get("greedy"), latest.get("speed")
    md = [f"SmolLM2-135M-Instruct in ONNX Runtime, int4 {method} (asymmetric, groups of 64, tied head float), "
          f"batch 1, {THREADS} threads; {today()}", ""]
    if ex and sp:
        md += ["| graph | file MB | decode tokens/s (median of 3, alternated) |", "|---|---|---|",
               f"| fp32 (MatMul) | {ex['fp32_onnx_bytes'] / 1e6:.0f} | {sp['decode_tokens_per_s']['fp32']:.1f} |",
               f"| int4 (MatMulNBits x {ex['matmul_nbits']}) | {ex['int4_onnx_bytes'] / 1e6:.0f} | "
               f"{sp['decode_tokens_per_s']['int4']:.1f} ({sp['speedup']:.2f}x; pairs "
               f"{', '.join(f'{x:.2f}' for x in sp['pairwise_speedups'])}) |", "",
               f"Speed measured {sp['date']}, load average {sp['load'][0]:.1f} at the start, {sp['load_after'][0]:.1f} at the end."]
    if gr:
        n8 = sum(a >= 8 for a in gr["first_tokens_agreeing"])
        md += ["", f"Greedy ({gr['date']}): {len(gr['first_tokens_agreeing'])} prompts of 16 tokens of prose, "
               f"{gr['new_tokens']} new tokens: leading tokens where int4 ONNX Runtime agrees with fp32 PyTorch "
               f"{gr['first_tokens_agreeing']}; {n8} of {len(gr['first_tokens_agreeing'])} agree on at least the first 8."]
        if gr.get("disagreements"):
            md += ["", "At each first disagreement, fp32's own probabilities of (its token, int4's token): " + ", ".join(
                f"({d['p_fp32_token']:.2f}, {d['p_int4_token']:.2f})" for d in gr["disagreements"]) + "."]
    write_results(RESULTS_DIR / "llm_onnx.json", {"machine": machine_info(THREADS), "rows": latest}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

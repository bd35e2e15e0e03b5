"""GPTQ time and memory on a 1B-shaped causal LM with random weights (issue 20): TinyLlama-1.1B's shape
(hidden 2048, MLP 5632, 32 heads, 4 key/value heads, vocabulary 32000, 22 blocks), weight-only int4
asymmetric, groups of 128, true-sequential GPTQ on 16 x 256 random tokens. Perplexity means nothing here.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/llm_1b.py [--layers 22] [--awq]

`--layers N` builds the first N blocks only (the time per block is what scales: calibration runs one block
at a time, so the peak memory is the model plus one block's activations and Hessians); the row then holds
`projected` figures for 22 blocks (time per block x 22, memory + 2 x fp32 bytes per extra block: the float
model and its quantized copy, an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

THREADS = 2
FULL_LAYERS = 22  # TinyLlama-1.1B's


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import shrinktunnel as st

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=FULL_LAYERS)
    ap.add_argument("--awq", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calib = torch.randint(0, 32000, (16, 256), generator=torch.Generator().manual_seed(1))
    qcfg = {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 128},
            "activations": None, "rounding": "gptq", "awq": args.awq}
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    st.quantize(model, qcfg, data=[calib[i:i + 4] for i in range(0, 16, 4)], progress=False)
    row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": args.layers, "params": params,
           "awq": args.awq, "quant_s": time.perf_counter() - t, "quant_cpu_s": time.process_time() - c,
           "rss_after_build_mib": rss0 / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "load_start": load, "load_end": os.getloadavg()[0]}
    row["s_per_block"] = row["quant_s"] / args.layers
    row["threads"] = THREADS
    if args.layers < FULL_LAYERS:  # a subset: the whole model's figures projected linearly from it
        per_block = 4 * sum(p.numel() for p in model.model.layers[0].parameters()) / 2**20  # MiB of one block, fp32
        row["projected"] = {"layers": FULL_LAYERS, "quant_s": row["s_per_block"] * FULL_LAYERS,
                            "params": params + (FULL_LAYERS - args.layers) * per_block * 2**20 / 4,
                            # st.quantize holds the float model and its quantized copy: ~2 x each extra block
                            "peak_rss_mib": row["peak_rss_mib"] + 2 * (FULL_LAYERS - args.layers) * per_block}
    with open(RESULTS_DIR / "llm_1b.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()

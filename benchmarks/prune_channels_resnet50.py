"""Benchmark: structured channel pruning at 0.3 on a ResNet-50-shaped model, in ONNX Runtime at batch 32.

Huawei AMCT reports ResNet-50 with 30 % channel sparsity about 40 % faster at batch 32 (on Ascend).
This measures `st.prune(model, st.ChannelPruneConfig(ratio=0.3, round_to=8))` on Hugging Face's
`ResNetForImageClassification(ResNetConfig(num_labels=1000))` (ResNetConfig's defaults are ResNet-50:
bottleneck blocks, depths 3-4-6-3, widths 256-512-1024-2048; random weights, BatchNorm statistics
from a few forward passes in train mode so that they are not the identity), beside the unpruned model,
both exported with `st.export_onnx` and timed in a DEFAULT `onnxruntime.InferenceSession` (every graph
optimisation, ONNX Runtime's own thread count) on the same batch of 32 images, as paired ratios of
alternated blocks (`measure.latency.paired_ratio`). The pruned model timed is the one its artifact
holds (`st.save` -> `st.load`). Beside it, the same ratio with `round_to=1` (exactly 30 % of every group):
at the same MACs it is far slower in ONNX Runtime, because channel counts off the kernels' block size
leave ONNX Runtime's blocked NCHWc convolutions (the table counts them).

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
# Kept channel counts rounded to multiples of 8. ONNX Runtime runs a conv in its blocked NCHWc kernels only
# when the channel counts suit the block; with exactly 30 % removed (round_to 1: 64 -> 45, 256 -> 179) 52 of
# ResNet-50's 53 convs fell back to the plain im2col + GEMM path and the pruned model, at half the MACs, ran
# only 1.1x faster (measured 2026-12-07); round_to 8 and 16 keep all 53 blocked. Both are measured.
ROUND_TO = 8
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


def ort_kernels(path: Path, tmp: Path) -> dict[str, int]:
    """The operators ONNX Runtime actually runs after its graph optimisations (a separate session that
    writes its optimised graph; the timed sessions stay default)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), opts)
    graph = onnx.load(opts.optimized_model_filepath).graph
    return dict(collections.Counter(f"{n.domain + ':' if n.domain else ''}{n.op_type}" for n in graph.node).most_common())


def prune_one(model: nn.Module, x: torch.Tensor, round_to: int) -> tuple[nn.Module, float, list[str]]:
    import warnings

    import shrinktunnel as st

    cfg = st.ChannelPruneConfig(ratio=RATIO, round_to=round_to)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        pruned = st.prune(model, cfg, example_inputs=x[:2], progress=False)
        seconds = time.perf_counter() - t0
    notes = list(dict.fromkeys(str(w.message) for w in caught if "prune_channels" in str(w.message)))
    for n in notes:
        log(f"round_to {round_to}: warning: {n[:300]}")
    return pruned, seconds, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=8, help="alternated pairs of blocks (paired_ratio), main contender")
    ap.add_argument("--block", type=int, default=2, help="timed runs per block")
    ap.add_argument("--pairs-exact", type=int, default=4, help="pairs for the round_to 1 contender (the explanation)")
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
    one = ((x[:1],), {})  # count_macs takes (args, kwargs)
    contenders: dict[str, dict[str, Any]] = {}
    for key, round_to in (("pruned", ROUND_TO), ("pruned_exact", 1)):
        log(f"pruning, round_to {round_to}")
        pruned, seconds, notes = prune_one(model, x, round_to)
        contenders[key] = {"round_to": round_to, "model": pruned, "prune_seconds": seconds, "warnings": notes,
                           "macs": int(count_macs(pruned, one)), "params": sum(p.numel() for p in pruned.parameters()),
                           "pruning": prune_summary(model, pruned)}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # What the artifact holds is what is timed: st.save -> st.load on a freshly built base.
        for key, c in contenders.items():
            artifact = st.save(c["model"], tmp / f"{key}-artifact")
            try:
                reloaded = st.load(artifact, model=build(bn_batches=0))
                with torch.no_grad():
                    c["roundtrip"] = torch.equal(reloaded(x[:4]), c["model"](x[:4]))
                c["load_error"] = None
                c["model"] = reloaded
            except Exception as exc:  # noqa: BLE001 - a library defect is a finding: time the model in memory
                from shrinktunnel.errors import one_line

                c["roundtrip"], c["load_error"] = False, one_line(exc)
                log(f"{key}: st.load failed, timing the pruned model in memory: {c['load_error'][:300]}")
        paths = {"fp32": st.export_onnx(model, tmp / "fp32.onnx", example_inputs=x[:2])}
        for key, c in contenders.items():
            paths[key] = st.export_onnx(c["model"], tmp / f"{key}.onnx", example_inputs=x[:2])
        kernels = {k: ort_kernels(p, tmp) for k, p in paths.items()}
        sessions = {k: ort.InferenceSession(str(p)) for k, p in paths.items()}  # DEFAULT sessions
        feed = {sessions["fp32"].get_inputs()[0].name: x.numpy()}
        with torch.no_grad():
            ref = {"fp32": model(x).numpy(), **{k: c["model"](x).numpy() for k, c in contenders.items()}}
        ort_diff = {k: float(np.abs(s.run(None, feed)[0] - ref[k]).max()) for k, s in sessions.items()}
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        ratios = {}
        for key, pairs in (("pruned", args.pairs), ("pruned_exact", args.pairs_exact)):
            log(f"timing {key} against fp32: {pairs} pairs of {args.block} runs at batch {BATCH}")
            r = paired_ratio(lambda: sessions[key].run(None, feed), lambda: sessions["fp32"].run(None, feed),
                             pairs=pairs, block=args.block, warmup=1)
            ratios[key] = r
            log(f"{key} / fp32 latency {r.ratio:.3f} [{r.low:.3f}, {r.high:.3f}] ({r.a_ms:.0f} ms / {r.b_ms:.0f} ms)")
        threads = sessions["fp32"].get_session_options().intra_op_num_threads

    macs_fp32 = int(count_macs(model, one))
    params_fp32 = sum(p.numel() for p in model.parameters())
    main_c = contenders["pruned"]
    speedup = 1.0 / ratios["pruned"].ratio
    worst_diff = max(ort_diff.values())
    checks = {
        "speedup_onnxruntime_batch32": {"value": round(speedup, 3), "limit": MIN_SPEEDUP, "pass": speedup >= MIN_SPEEDUP},
        "roundtrip_bit_identical": {"value": all(c["roundtrip"] for c in contenders.values()), "limit": True,
                                    "pass": all(c["roundtrip"] for c in contenders.values())},
        "onnx_matches_torch": {"value": worst_diff, "limit": 1e-3, "pass": worst_diff <= 1e-3},
    }
    results = {
        "name": NAME, "date": today(), "machine": machine_info(THREADS), "git": git_state(), "command": COMMAND,
        "batch": BATCH, "image": IMAGE, "ratio": RATIO, "ort_intra_op_threads_option": threads,
        "macs_per_image": {"fp32": macs_fp32, **{k: c["macs"] for k, c in contenders.items()}},
        "params": {"fp32": params_fp32, **{k: c["params"] for k, c in contenders.items()}},
        "onnx_bytes": sizes, "ort_max_abs_diff": ort_diff, "ort_kernels": kernels,
        "paired_ratio": {k: r.to_dict() for k, r in ratios.items()}, "speedup": speedup,
        "contenders": {k: {kk: v for kk, v in c.items() if kk != "model"} for k, c in contenders.items()},
        "checks": checks, "seconds": time.perf_counter() - started,
    }
    write_results(Path(args.out), results, markdown(results))
    print(markdown(results))
    return 0 if all(c["pass"] for c in checks.values()) else 1


def _nchwc(kernels: dict[str, int]) -> str:
    convs = sum(v for k, v in kernels.items() if k.endswith("Conv"))
    blocked = kernels.get("com.microsoft.nchwc:Conv", 0)
    return f"{blocked} of {convs}"


def markdown(r: dict[str, Any]) -> str:
    m, c, pr = r["machine"], r["contenders"], r["paired_ratio"]
    macs, params, sizes, k = r["macs_per_image"], r["params"], r["onnx_bytes"], r["ort_kernels"]
    exact_speedup = 1.0 / pr["pruned_exact"]["ratio"]
    whole = c["pruned"]["pruning"]["convs_whole_outputs"]
    ok = r["checks"]["speedup_onnxruntime_batch32"]["pass"]
    return "\n".join([
        f"Measured {r['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores; ONNX Runtime {m['onnxruntime']}, default "
        f"`InferenceSession` (every graph optimisation, its own thread count); torch {m['torch']}; commit "
        f"{str(r['git']['commit'])[:10]}{' (src/ modified)' if r['git'].get('src_modified') else ''}.",
        f"Reproduce with `{r['command']}`.",
        "",
        f"**ResNet-50 (HF `ResNetConfig()` defaults, 1000 classes, random weights), `prune_channels` ratio {r['ratio']}, "
        f"ONNX Runtime, batch {r['batch']} x 3 x {r['image']} x {r['image']}**",
        "",
        f"|  | unpruned | pruned, round_to {c['pruned']['round_to']} | pruned, round_to 1 |",
        "|---|---:|---:|---:|",
        f"| MACs per image | {macs['fp32'] / 1e9:.2f} G | {macs['pruned'] / 1e9:.2f} G ({macs['pruned'] / macs['fp32']:.3f}x) | "
        f"{macs['pruned_exact'] / 1e9:.2f} G ({macs['pruned_exact'] / macs['fp32']:.3f}x) |",
        f"| parameters | {params['fp32'] / 1e6:.2f} M | {params['pruned'] / 1e6:.2f} M | {params['pruned_exact'] / 1e6:.2f} M |",
        f"| ONNX file | {sizes['fp32'] / 2**20:.1f} MiB | {sizes['pruned'] / 2**20:.1f} MiB | {sizes['pruned_exact'] / 2**20:.1f} MiB |",
        f"| convs ONNX Runtime runs in its blocked NCHWc kernels | {_nchwc(k['fp32'])} | {_nchwc(k['pruned'])} | "
        f"{_nchwc(k['pruned_exact'])} |",
        f"| latency, ONNX Runtime (median of the timed runs) | {pr['pruned']['b_ms']:.0f} ms | {pr['pruned']['a_ms']:.0f} ms | "
        f"{pr['pruned_exact']['a_ms']:.0f} ms |",
        f"| latency / unpruned (median of per-pair ratios, 95 % interval) | 1 | {pr['pruned']['ratio']:.3f}x "
        f"[{pr['pruned']['low']:.3f}, {pr['pruned']['high']:.3f}] | {pr['pruned_exact']['ratio']:.3f}x "
        f"[{pr['pruned_exact']['low']:.3f}, {pr['pruned_exact']['high']:.3f}] |",
        f"| **speed-up** | | **{r['speedup']:.2f}x** | {exact_speedup:.2f}x |",
        "",
        f"Every convolution's channels shrink ({c['pruned']['pruning']['convs'] - len(whole)} of "
        f"{c['pruned']['pruning']['convs']} convs lose output channels"
        + (f"; kept whole: {', '.join(f'`{n}`' for n in whole[:6])}" if whole else "")
        + "; the classifier keeps its 1000 outputs). Pruning took "
        f"{c['pruned']['prune_seconds']:.1f} s. Both pruned models are timed as `st.load` rebuilt them from their "
        f"artifacts (round trip bit-identical: {'pass' if r['checks']['roundtrip_bit_identical']['pass'] else 'FAIL'}); "
        f"ONNX Runtime vs PyTorch max abs diff: {', '.join(f'{kk} {v:.2g}' for kk, v in r['ort_max_abs_diff'].items())}. "
        f"Latency: {pr['pruned']['pairs']} (round_to {c['pruned']['round_to']}) and {pr['pruned_exact']['pairs']} "
        f"(round_to 1) pairs of alternated blocks of {pr['pruned']['block']} runs, each block after one untimed run.",
        "",
        "| target | measured | limit | |",
        "|---|---:|---:|---|",
        f"| speed-up in ONNX Runtime, batch {r['batch']} (round_to {c['pruned']['round_to']}) | {r['speedup']:.2f}x | "
        f">= {MIN_SPEEDUP}x | {'pass' if ok else 'FAIL'} |",
    ]) + "\n"

if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: unstructured pruning of LeNet-300-100 on MNIST to 92 % sparsity (Deep Compression keeps
8 % of its weights at no loss), with AGP fine-tuning, next to one-shot pruning and random pruning (the
baseline), every contender in the same run; and the stored size of the pruned artifact.

    .venv/bin/python benchmarks/prune_lenet.py     # this benchmark alone
    .venv/bin/python benchmarks/run_all.py         # every benchmark, then docs/benchmarks.md rewritten

The trained net comes from benchmarks/lenet_300_100.safetensors (`_lenet.py --train` rebuilds it).
Writes benchmarks/results/prune_lenet.json and .md, exits with 1 when a target fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.api import run_stage
from shrinktunnel.export import OrtModel
from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes
from shrinktunnel.pruning import PruneConfig, SparseLayer, prune_context
from shrinktunnel.report import Table, fmt_bytes, fmt_pct

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: _common sits beside it
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from _lenet import MODEL_REF, WEIGHTS, lenet_300_100, recorded_metadata, train  # noqa: E402

NAME = "prune_lenet"
THREADS = 2  # default; --threads 1 when other work shares the cores (2 threads then spin and run ~15x slower)
SPARSITY = 0.92  # the target: 8 % of the weights kept, as in Deep Compression
MAX_DROP_PT = 0.2  # fp32 accuracy minus the pruned artifact's, percentage points
MAX_ONNX_VS_TORCH_PT = 0.05  # the exported graph computes what the pruned module does
EPOCHS = 6.0  # fine-tuning passes over the 50k training images, per fine-tuned contender
BATCH = 128

# The fine-tuning every fine-tuned contender gets: AGP over the first half, recovery in the second.
FINE_TUNE = {"epochs": EPOCHS, "schedule": "agp", "ramp": 0.5, "updates": 30, "lr": 5e-4}
CONTENDERS = {  # name -> (label, config)
    "oneshot": ("magnitude, one shot, no fine-tuning", {"sparsity": SPARSITY}),
    "random": ("random (baseline), AGP fine-tuning", {"sparsity": SPARSITY, "criterion": "random", **FINE_TUNE}),
    "layer": ("magnitude per layer, AGP fine-tuning", {"sparsity": SPARSITY, **FINE_TUNE}),
    "global": ("magnitude global, AGP fine-tuning", {"sparsity": SPARSITY, "scope": "global", **FINE_TUNE}),
}
HEADLINE = "global"


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def points(a: float, b: float) -> float:
    return round(100 * (a - b), 6)


def target(name: str, description: str, measured: float, op: str, limit: float, unit: str) -> dict[str, Any]:
    passed = measured <= limit if op == "<=" else measured >= limit
    return {"name": name, "description": description, "measured": measured, "op": op, "limit": limit,
            "unit": unit, "passed": bool(passed)}


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, SparseLayer):
            s = m.sparse_spec
            n = m.weight.numel()
            rows.append({"layer": name, "weights": n, "kept": s["kept"], "sparsity": 1 - s["kept"] / n,
                         "encoding": s["encoding"], "index_bits": s["index_bits"], "entries": s["entries"],
                         "values_bytes": m.values.numel() * m.values.element_size(), "index_bytes": m.index.numel()})
    return rows


def stored_tensors(path: Path) -> dict[str, int]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}


def run(workdir: Path, epochs: float, threads: int) -> dict[str, Any]:
    if not WEIGHTS.is_file():
        log("no trained LeNet-300-100 yet: training it (written to benchmarks/lenet_300_100.safetensors)")
        train(threads, log=log)
    model = lenet_300_100()
    train_data = assets.mnist_split("train", batch_size=BATCH)
    test = assets.mnist_test()
    images = sum(len(y) for _, y in test)
    acc = {"fp32": accuracy(model, test)}
    log(f"fp32 accuracy {acc['fp32']:.4f}")
    configs = {name: {**cfg, **({"epochs": epochs} if "epochs" in cfg else {})} for name, (_, cfg) in CONTENDERS.items()}
    pruned, seconds = {}, {}
    for name, cfg in configs.items():
        log(f"pruning: {CONTENDERS[name][0]}")
        started = time.perf_counter()
        ctx = prune_context(data=train_data, progress=True)
        pruned[name] = run_stage(model, "prune", PruneConfig(**cfg), ctx)
        seconds[name] = round(time.perf_counter() - started, 1)
        acc[name] = accuracy(pruned[name], test)
        log(f"  accuracy {acc[name]:.4f} ({seconds[name]} s)")

    # The headline as it is stored: saved, loaded back (bit-exact), measured from the artifact.
    artifact = st.save(pruned[HEADLINE], workdir / "artifact")
    loaded = st.load(artifact, model=model)
    x = test[0][0]
    exact = bool(torch.equal(loaded(x), pruned[HEADLINE](x)))
    acc["artifact"] = accuracy(loaded, test)
    onnx_path = st.export_onnx(loaded, workdir / "pruned.onnx", example_inputs=x)
    acc["artifact_onnx"] = accuracy(OrtModel(onnx_path, threads=threads), test)

    layers = layer_table(loaded)
    total_w = sum(r["weights"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    dense_bytes = float_safetensors_bytes(model)
    tensors = stored_tensors(artifact)
    size = {
        "fp32_safetensors_bytes": dense_bytes,
        "artifact_bytes": artifact_bytes(artifact),
        "tensors_file_bytes": (artifact / "model.safetensors").stat().st_size,
        "tensor_payload_bytes": sum(tensors.values()),
        "manifest_bytes": (artifact / "manifest.json").stat().st_size,
        "values_bytes": sum(r["values_bytes"] for r in layers),
        "index_bytes": sum(r["index_bytes"] for r in layers),
        "bias_bytes": sum(v for k, v in tensors.items() if k.endswith("bias")),
        "onnx_bytes": onnx_path.stat().st_size,
    }
    size["artifact_ratio"] = size["artifact_bytes"] / dense_bytes
    size["bits_per_weight"] = 8 * size["tensor_payload_bytes"] / (total_w + sum(v for k, v in tensors.items() if k.endswith("bias")) // 4)
    sparsities = {name: 1 - sum(m.sparse_spec["kept"] for m in p.modules() if isinstance(m, SparseLayer)) / total_w
                  for name, p in pruned.items()}
    targets = [
        target("sparsity", "sparsity of the three weight matrices (headline)", 1 - kept / total_w, ">=", SPARSITY, "ratio"),
        target("accuracy_drop", "accuracy drop vs fp32 after fine-tuning, the loaded artifact (headline)",
               points(acc["fp32"], acc["artifact"]), "<=", MAX_DROP_PT, "pt"),
        target("beats_random", "magnitude (headline) minus random pruning, same sparsity and fine-tuning",
               points(acc[HEADLINE], acc["random"]), ">=", 0.0, "pt"),
        target("onnx_matches", "pruned artifact: ONNX Runtime vs PyTorch accuracy, absolute difference",
               abs(points(acc["artifact_onnx"], acc["artifact"])), "<=", MAX_ONNX_VS_TORCH_PT, "pt"),
        target("reload_exact", "st.load of the artifact gives bit-identical outputs", float(exact), ">=", 1.0, "bool"),
    ]
    return {
        "benchmark": NAME,
        "date": today(),
        "command": COMMAND,
        "machine": machine_info(threads),
        "source": git_state(),
        "setup": {
            "model": MODEL_REF, "trained": recorded_metadata(), "train_images": sum(len(y) for _, y in train_data),
            "test_images": images, "batch": BATCH, "configs": {k: PruneConfig(**v).to_dict() for k, v in configs.items()},
            "headline": HEADLINE,
        },
        "accuracy": acc,
        "sparsity": sparsities,
        "seconds": seconds,
        "layers": layers,
        "size": size,
        "targets": targets,
        "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


def _measured(value: float, unit: str) -> str:
    return {"pt": f"{value:.2f} pt", "ratio": f"{100 * value:.2f} %", "bool": "yes" if value else "no"}[unit]


def render(res: dict[str, Any]) -> str:
    m, acc, size = res["machine"], res["accuracy"], res["size"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    fine = res["setup"]["configs"][HEADLINE]
    header = (f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads; "
              f"torch {m['torch']}; commit {commit}.\nReproduce with `{res['command']}`.\n")
    figures = Table(
        f"LeNet-300-100 on MNIST ({res['setup']['test_images']:,} test images), {100 * SPARSITY:.0f} % of the weights removed",
        ["contender", "sparsity", "accuracy", "vs fp32", "time"],
        note=f"Fine-tuning: {fine['epochs']:g} epochs of the built-in loop (Adam, lr {fine['lr']:g}, batch {res['setup']['batch']}), "
             f"AGP cubic ramp over the first {fine['ramp']:.0%} with {fine['updates']} mask updates, then the masks held. "
             f"Trained net: {res['setup']['trained'].get('recipe', {}).get('epochs', '?')} epochs of Adam.",
    )
    figures.add("fp32 (dense)", "0 %", fmt_pct(acc["fp32"]), "", "")
    for name, (label, _) in CONTENDERS.items():
        figures.add(label, f"{100 * res['sparsity'][name]:.2f} %", fmt_pct(acc[name]),
                    f"{points(acc[name], acc['fp32']):+.2f} pt", f"{res['seconds'][name]:.0f} s")
    figures.add("headline, loaded from the artifact", f"{100 * res['sparsity'][HEADLINE]:.2f} %", fmt_pct(acc["artifact"]),
                f"{points(acc['artifact'], acc['fp32']):+.2f} pt", "")
    figures.add("headline, ONNX Runtime", "", fmt_pct(acc["artifact_onnx"]),
                f"{points(acc['artifact_onnx'], acc['fp32']):+.2f} pt", "")

    storage = Table("Stored size of the headline artifact", ["layer", "weights", "kept", "encoding", "values", "index"],
                    note=f"Artifact (manifest + tensors): {fmt_bytes(size['artifact_bytes'])} = "
                         f"{100 * size['artifact_ratio']:.1f} % of the fp32 safetensors file ({fmt_bytes(size['fp32_safetensors_bytes'])}); "
                         f"tensors {fmt_bytes(size['tensor_payload_bytes'])} (values {fmt_bytes(size['values_bytes'])}, "
                         f"index {fmt_bytes(size['index_bytes'])}, biases {fmt_bytes(size['bias_bytes'])}), "
                         f"{size['bits_per_weight']:.2f} bits per original parameter; manifest {fmt_bytes(size['manifest_bytes'])}. "
                         f"ONNX export (dense weights): {fmt_bytes(size['onnx_bytes'])}.")
    for r in res["layers"]:
        enc = r["encoding"] + (f", {r['index_bits']}-bit, {r['entries']:,} entries" if r["encoding"] == "relative" else "")
        storage.add(r["layer"], f"{r['weights']:,}", f"{r['kept']:,} ({100 * (1 - r['sparsity']):.1f} %)", enc,
                    fmt_bytes(r["values_bytes"]), fmt_bytes(r["index_bytes"]))

    targets = Table("Targets", ["target", "measured", "required", "result"])
    for t in res["targets"]:
        targets.add(t["description"], _measured(t["measured"], t["unit"]), f"{t['op']} {_measured(t['limit'], t['unit'])}",
                    "pass" if t["passed"] else "**FAIL**")
    return "\n".join([header, figures.to_markdown(), storage.to_markdown(), targets.to_markdown()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="fine-tuning epochs per contender (default %(default)s)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch and ONNX Runtime threads (default %(default)s)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{NAME}.json",
                        help="results file; the tables go beside it as .md (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"shrinktunnel-{NAME}-") as tmp:
        results = run(Path(tmp), args.epochs, args.threads)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = render(results)
    write_results(args.json, results, markdown)
    print(markdown)
    failed = [name for name, ok in results["checks"].items() if not ok]
    log(f"FAILED: {', '.join(failed)}" if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

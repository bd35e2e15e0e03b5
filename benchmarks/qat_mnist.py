"""Benchmark: quantization-aware training of the MNIST CNN: W4A8 PTQ, then one epoch of QAT; W8A8 QAT;
binary and ternary weights trained with QAT; accuracy on all 10,000 test images in PyTorch and in ONNX
Runtime, artifact size and training time, in one run.

    .venv/bin/python benchmarks/qat_mnist.py          # this benchmark alone (about 10 minutes on 2 quiet cores)

W4A8 trains one full epoch, as the issue asks; binary weights a quarter epoch; the other QAT rows a
tenth (each row's label states its epochs).

Targets (quantization issue): W4A8 after one epoch of QAT loses at most 0.5 points against fp32;
binary weights with QAT: report the accuracy, aim at 98 % or better (recorded as a check, not hidden).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.export import OrtModel
from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "qat_mnist"
THREADS = 2
MAX_DROP_W4A8_PT = 0.5  # W4A8 PTQ + one epoch of QAT vs fp32, percentage points
BINARY_AIM = 0.98  # binary weights with QAT

# The first conv (1 input channel, 9 weights per output) and the classifier hold 0.1 % of the weights and
# most of the damage binarization does: BinaryConnect and XNOR-Net keep them at higher precision too.
FIRST_LAST_INT8 = [{"pattern": "conv_layers.0", "weights": {"bits": 8}},
                   {"pattern": "fc_layers.2", "weights": {"bits": 8}}]

EXTRA_EPOCHS = 0.1  # the rows beyond the required two (W4A8 QAT: one epoch; binary weights:
# a quarter) train a tenth of an epoch, so that the whole run stays near 10 minutes on 2 cores (a QAT
# step of this CNN costs about a third of a second there); their labels say so

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (method, config); QAT rows are labelled with their epochs
    "W4A8 PTQ": ("quantize", {"weights": {"bits": 4}}),
    "W4A8 QAT": ("qat", {"weights": {"bits": 4}, "epochs": 1}),
    "W4A8 QAT (LSQ)": ("qat", {"weights": {"bits": 4}, "scales": "lsq", "epochs": EXTRA_EPOCHS}),
    "W8A8 PTQ": ("quantize", {}),
    "W8A8 QAT": ("qat", {"epochs": EXTRA_EPOCHS}),
    "binary weights (first, last int8), A8, QAT": (
        "qat", {"weights": {"format": "binary"}, "overrides": FIRST_LAST_INT8, "lr": 1e-3, "epochs": 0.25}),
    "binary weights (every layer), A8, QAT": (
        "qat", {"weights": {"format": "binary"}, "lr": 1e-3, "epochs": EXTRA_EPOCHS}),
    "ternary weights (first, last int8), A8, QAT": (
        "qat", {"weights": {"format": "ternary"}, "overrides": FIRST_LAST_INT8, "lr": 1e-3, "epochs": EXTRA_EPOCHS}),
    "binary weights + binary activations (first, last int8 / A8), QAT": (
        "qat", {"weights": {"format": "binary"}, "activations": {"format": "binary"}, "lr": 1e-3, "epochs": EXTRA_EPOCHS,
                "overrides": [{"pattern": "conv_layers.0", "weights": {"bits": 8}, "activations": {}},
                              {"pattern": "fc_layers.2", "weights": {"bits": 8}}]}),
}
W4A8_QAT, BINARY = "W4A8 QAT", "binary weights (first, last int8), A8, QAT"


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def run(workdir: Path, epoch_scale: float, train_limit: int | None, only: list[str] | None) -> dict[str, Any]:
    model, calib, test = assets.mnist_cnn(), assets.mnist_calibration(), assets.mnist_test()
    train = assets.mnist_split("train", limit=train_limit)
    base_bytes = float_safetensors_bytes(model)
    base = accuracy(model, test)
    rows: dict[str, dict[str, Any]] = {"fp32": {"torch": base, "onnx": base, "bytes": base_bytes, "train_s": 0.0}}
    for name, (method, cfg) in VARIANTS.items():
        if only and name not in only:
            continue
        label = name
        started = time.perf_counter()
        if method == "qat":
            cfg = {**cfg, "epochs": cfg["epochs"] * epoch_scale}
            label = f"{name}, {cfg['epochs']:g} epoch" + ("" if cfg["epochs"] == 1 else "s")
            q = st.qat(model, cfg, data=train, progress=False)
        else:
            q = st.quantize(model, cfg, data=calib, progress=False)
        seconds = time.perf_counter() - started
        path = st.save(q, workdir / f"v{len(rows)}")
        loaded = st.load(path)  # the artifact is what is measured
        onnx = st.export_onnx(loaded, workdir / f"v{len(rows)}.onnx", calib[0])
        rows[label] = {"variant": name, "method": method, "config": cfg, "torch": accuracy(loaded, test),
                       "onnx": accuracy(OrtModel(onnx, threads=THREADS), test), "bytes": artifact_bytes(path),
                       "train_s": round(seconds, 1)}
        log(f"{label}: {100 * rows[label]['torch']:.2f} % (ONNX Runtime {100 * rows[label]['onnx']:.2f} %), "
            f"{seconds:.0f} s")
    checks = {}
    by_variant = {r.get("variant"): (label, r) for label, r in rows.items()}
    if W4A8_QAT in by_variant:
        label, r = by_variant[W4A8_QAT]
        drop = 100 * (base - min(r["torch"], r["onnx"]))
        checks[f"{label}: drop <= {MAX_DROP_W4A8_PT} pt vs fp32 (PyTorch and ONNX Runtime)"] = drop <= MAX_DROP_W4A8_PT
    if BINARY in by_variant:
        label, r = by_variant[BINARY]
        checks[f"{label}: accuracy >= {100 * BINARY_AIM:.0f} % (the issue's aim)"] = r["torch"] >= BINARY_AIM
    return {"benchmark": NAME, "date": today(), "command": COMMAND, "machine": machine_info(THREADS),
            "source": git_state(),
            "setup": {"model": "shrinktunnel.assets:mnist_cnn", "train_images": sum(len(y) for _, y in train),
                      "epoch_scale": epoch_scale, "batch": 64, "calibration_images_ptq": sum(len(y) for _, y in calib),
                      "test_images": sum(len(y) for _, y in test)},
            "rows": rows, "checks": checks, "passed": all(checks.values())}


def render(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["setup"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    base = res["rows"]["fp32"]
    lines = [f"Measured {res['date']} on {m['cpu']}, {m['threads']} threads; torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime']}; commit {commit}. MNIST CNN; QAT trains on "
             f"{s['train_images']:,} training images (batch {s['batch']}, Adam; its PTQ start calibrates on the first "
             f"16 batches), PTQ calibrates on {s['calibration_images_ptq']} images; accuracy on {s['test_images']:,} "
             f"test images, of the saved and reloaded artifact. Reproduce with `{res['command']}`.", "",
             "| variant | accuracy, PyTorch | accuracy, ONNX Runtime | drop vs fp32 | artifact | of fp32 | training |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in res["rows"].items():
        drop = 100 * (base["torch"] - r["torch"])
        lines.append(f"| {label} | {100 * r['torch']:.2f} % | {100 * r['onnx']:.2f} % | {drop:+.2f} pt | "
                     f"{r['bytes'] / 1024:.1f} KiB | {100 * r['bytes'] / base['bytes']:.1f} % | "
                     f"{r['train_s']:.0f} s |")
    lines += ["", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {'pass' if v else '**FAIL**'} |" for k, v in res["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiplies every QAT row's epochs (trials)")
    parser.add_argument("--train-limit", type=int, default=None, help="training images (default: all 50,000)")
    parser.add_argument("--only", action="append", help="run only this variant (repeatable)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")  # export notes (sub-byte weights run as int8) are in the docs
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"shrinktunnel-{NAME}-") as tmp:
        results = run(Path(tmp), args.epoch_scale, args.train_limit, args.only)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = render(results)
    write_results(args.json, results, markdown)
    print(markdown)
    failed = [k for k, ok in results["checks"].items() if not ok]
    log(f"FAILED: {', '.join(failed)}" if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

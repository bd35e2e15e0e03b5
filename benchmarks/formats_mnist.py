"""Benchmark: every quantization format and calibrator on the MNIST CNN, accuracy on all 10,000 test
images in PyTorch and ONNX Runtime, and artifact size, in one run.

    .venv/bin/python benchmarks/formats_mnist.py

Target (quantization issue): W8A8 with each calibrator loses at most 0.2 points.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.export import OrtModel
from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "formats_mnist"
MAX_DROP_PT = 0.2

VARIANTS = {  # label -> (method, config)
    "W8A8 minmax": ("quantize", {"activations": {"calibrator": "minmax"}}),
    "W8A8 percentile": ("quantize", {"activations": {"calibrator": "percentile"}}),
    "W8A8 entropy": ("quantize", {"activations": {"calibrator": "entropy"}}),
    "W8A8 mse": ("quantize", {"activations": {"calibrator": "mse"}}),
    "W8A8 minmax, reduce_range": ("quantize", {"weights": {"reduce_range": True}}),
    "W8 weight-only": ("quantize", {"activations": None}),
    "W4 weight-only, per channel": ("quantize", {"weights": {"bits": 4}, "activations": None}),
    "W4 weight-only, group 32": ("quantize", {"weights": {"bits": 4, "granularity": "per_group", "group_size": 32},
                                              "overrides": [{"pattern": "conv_layers.0", "weights": {"bits": 4}}],
                                              "activations": None}),
    "FP16 weights": ("cast", {"format": "float16"}),
    "BF16 weights": ("cast", {"format": "bfloat16"}),
    "FP8 e4m3fn weights": ("cast", {"format": "float8_e4m3fn"}),
    "FP8 e5m2 weights": ("cast", {"format": "float8_e5m2"}),
}


def main() -> int:
    warnings.simplefilter("ignore")
    model, calib, test = assets.mnist_cnn(), assets.mnist_calibration(), assets.mnist_test()
    base_bytes = float_safetensors_bytes(model)
    base = accuracy(model, test)
    rows = {"fp32": {"torch": base, "onnx": base, "bytes": base_bytes}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (method, cfg) in VARIANTS.items():
            result = st.compress(model, [{method: cfg}], data=calib, progress=False)
            path = result.save(Path(tmp) / label.replace(" ", "_").replace(",", ""))
            onnx = st.export_onnx(result, Path(tmp) / "m.onnx", calib[0])
            rows[label] = {"torch": accuracy(result.model, test), "onnx": accuracy(OrtModel(onnx), test),
                           "bytes": artifact_bytes(path)}
    checks = {f"{k}: drop <= {MAX_DROP_PT} pt (PyTorch and ONNX Runtime)":
              max(base - r["torch"], base - r["onnx"]) * 100 <= MAX_DROP_PT
              for k, r in rows.items() if k.startswith("W8A8")}
    md = [f"Measured {today()}; MNIST CNN, 256 calibration images, 10,000 test images. "
          "Reproduce with `.venv/bin/python benchmarks/run_all.py`.", "",
          "| variant | accuracy, PyTorch | accuracy, ONNX Runtime | artifact | of fp32 |", "|---|---:|---:|---:|---:|"]
    md += [f"| {k} | {100 * r['torch']:.2f} % | {100 * r['onnx']:.2f} % | {r['bytes'] / 1024:.1f} KiB | "
           f"{100 * r['bytes'] / base_bytes:.1f} % |" for k, r in rows.items()]
    md += ["", "| target | result |", "|---|---|"] + [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items()]
    text = "\n".join(md) + "\n"
    write_results(RESULTS_DIR / f"{NAME}.json", {"name": NAME, "date": today(), "machine": machine_info(2),
                                                  "git": git_state(), "rows": rows, "checks": checks}, text)
    print(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

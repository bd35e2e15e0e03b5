"""`shrink demo`: the whole tunnel on the built-in real default, no argument, no download.

The pretrained MNIST CNN of `digit-recognizer-py` goes through W8A8 post-training quantization
calibrated on 256 training images; both models are exported to ONNX and measured on all 10,000
test images in PyTorch and ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from . import assets
from .api import compress
from .compare import Variant, compare_variants, variants_table
from .core.artifact import check_output_dir
from .core.atomic import atomic_dir
from .measure import artifact_bytes, float_safetensors_bytes
from .report import write_reports

DEFAULT_RECIPE = """\
# W8A8 post-training quantization: int8 weights per output channel (symmetric), uint8 activations
# per tensor (asymmetric), min-max calibration; ReLUs fold into the output quantizers.
stages:
  - quantize:
      weights: {bits: 8, granularity: per_channel, symmetric: true}
      activations: {bits: 8, symmetric: false, calibrator: minmax}
"""


def run_demo(out: Path, *, threads: int = 2, progress: bool = True, console: Console | None = None) -> Path:
    console = console or Console()
    out = check_output_dir(out, overwrite=True, marker="artifact/manifest.json")
    console.print("[bold]shrinktunnel demo[/]: MNIST CNN (digit-recognizer-py) -> W8A8 PTQ, "
                  "256 calibration images, 10,000 test images")
    model = assets.mnist_cnn()
    calib, test = assets.mnist_calibration(), assets.mnist_test()
    result = compress(model, DEFAULT_RECIPE, data=calib, progress=progress)
    with atomic_dir(out) as tmp:
        artifact = result.save(tmp / "artifact")
        variants = [
            Variant("fp32", model, float_safetensors_bytes(model)),
            Variant("int8", result.model, artifact_bytes(artifact)),
        ]
        compare_variants(variants, test, tmp, threads=threads, progress=progress)
        table = variants_table(variants, "MNIST CNN, fp32 vs W8A8 (10,000 test images)", threads)
        data = {
            "model": "shrinktunnel.assets:mnist_cnn",
            "recipe": DEFAULT_RECIPE,
            "threads": threads,
            "variants": {v.name: v.figures for v in variants},
            "warnings": result.warnings,
        }
        notes = [
            "size: fp32 = the float state dict as one safetensors file; int8 = the artifact directory "
            "(int8 weights, float scales and biases, manifest).",
            "artifact/ reloads with `shrinktunnel.load`; fp32.onnx and int8.onnx run in ONNX Runtime "
            "(int8.onnx is QDQ, fused into integer kernels).",
        ]
        write_reports(tmp, "shrinktunnel demo: MNIST CNN, W8A8 post-training quantization", data, [table], notes)
    console.print(table.to_rich())
    console.print(f"artifact, ONNX files and report written to [bold]{out.resolve()}[/]")
    return out

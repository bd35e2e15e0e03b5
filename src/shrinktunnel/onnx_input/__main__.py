"""int8 on the ONNX graph itself, from the command line (for graphs the PyTorch importer cannot take):

    python -m shrinktunnel.onnx_input MODEL.onnx --data DATA --out OUT.onnx [--calibrator entropy]

DATA as `shrink` takes it (a factory reference or an .npz / .safetensors file with `x`). Bad input: one
line on stderr and exit code 2, nothing written at --out.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ShrinkError
from .ort_quant import CALIBRATORS, quantize_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrinktunnel.onnx_input", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--data", required=True, help="calibration data: 'package.module:factory', 'file.py:factory', .npz or .safetensors")
    parser.add_argument("--out", required=True, help="where to write the int8 (QDQ) ONNX file")
    parser.add_argument("--calibrator", default="entropy", choices=CALIBRATORS)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    from ..core.refs import load_data

    try:
        info = quantize_onnx(args.model, args.out, load_data(args.data, args.batch_size), calibrator=args.calibrator)
    except ShrinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    left = f"; left float (values not finite): {', '.join(info['left_float'][:5])}" if info["left_float"] else ""
    print(f"wrote {args.out}: {info['quantized_tensors']} tensors quantized, ranges from the {args.calibrator} calibrator{left}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ONNX models as input: `load_onnx(path)` reads an .onnx file into a PyTorch module (OnnxModule) so
every method applies, and `export_onnx` writes it back with the original input / output names and
dynamic dimensions. Graphs with operators the importer lacks are quantized on the ONNX graph itself
(`quantize_onnx`, ort_quant.py). docs/onnx-input.md."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .graph_module import OnnxModule, UnsupportedOpError, build_module
from .reader import OnnxFileError, read_onnx

__all__ = ["load_onnx", "OnnxModule", "UnsupportedOpError", "OnnxFileError", "is_onnx_ref"]


def is_onnx_ref(ref: str) -> bool:
    return str(ref).lower().endswith(".onnx")


def load_onnx(path: str | os.PathLike) -> OnnxModule:
    """A NEW PyTorch module computing what the ONNX model at `path` computes (eval mode). Reading runs
    no code: the file is parsed as data, external data is read only from the model's directory.
    Raises OnnxFileError (not ONNX, truncated, opset outside 11..21, unsafe external data) or
    UnsupportedOpError (naming the operators the importer lacks); both are ModelError."""
    from ..core.history import get_record, set_model_ref

    model = read_onnx(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    module = build_module(model, sha256=digest)
    set_model_ref(module, str(Path(path).resolve()))
    get_record(module)["ref_sha256"] = digest
    return module

"""ONNX models as input: `load_onnx(path)` reads an .onnx file into a PyTorch module (OnnxModule) so
every method applies, and `export_onnx` writes it back with the original input / output names and
dynamic dimensions. Graphs with operators the importer lacks are quantized on the ONNX graph itself
(`quantize_onnx`, ort_quant.py). docs/onnx-input.md."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..core.refs import MODEL_LOADERS
from .graph_module import OnnxModule, UnsupportedOpError, build_module
from .reader import OnnxFileError, read_onnx

__all__ = ["load_onnx", "OnnxModule", "UnsupportedOpError", "OnnxFileError", "is_onnx_ref"]


def is_onnx_ref(ref: str) -> bool:
    return str(ref).lower().endswith(".onnx")


def load_onnx(path: str | os.PathLike, *, expect_sha256: str | None = None) -> OnnxModule:
    """A NEW PyTorch module computing what the ONNX model at `path` computes (eval mode). Reading runs
    no code: the file is parsed as data, external data is read only from the model's directory.
    Raises OnnxFileError (not ONNX, truncated, opset outside 11..21, unsafe external data) or
    UnsupportedOpError (naming the operators the importer lacks); both are ModelError.
    `expect_sha256`: the digest the file must have (an artifact's record of the file it was made from)."""
    from ..core.history import set_model_ref, update_record

    model = read_onnx(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256:
        raise OnnxFileError(f"ONNX file {str(path)!r} changed since the artifact was made (sha256 {digest[:12]}..., recorded "
                            f"{expect_sha256[:12]}...); pass the original file with --model (model=...)")
    module = build_module(model, sha256=digest)
    set_model_ref(module, str(Path(path).resolve()))
    update_record(module, ref_sha256=digest)
    return module


MODEL_LOADERS[".onnx"] = load_onnx  # MODEL = model.onnx on the command line (core.refs.load_model)

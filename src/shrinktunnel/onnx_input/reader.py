"""Reading an .onnx file as data: never code, never outside its directory, sizes checked first.

An ONNX model is a protobuf message; parsing it runs nothing. What can still go wrong, and is
refused here with a typed error naming the problem and the fix:
- the file is not ONNX, or is truncated (the protobuf parser fails, or the graph is empty);
- its default-domain opset is outside 11..21 (what the importer's operators are written and tested for);
- an initializer's external data names a path outside the model's directory (`../`, an absolute path,
  a symbolic link out), or claims more bytes than the file holds (checked before anything is read).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError

__all__ = ["OnnxFileError", "read_onnx", "OPSETS", "default_opset"]

OPSETS = range(11, 22)  # 11..21: the default-domain opsets this importer is written and tested for
MAX_FILE = 1 << 36       # 64 GiB: a protobuf file larger than this is refused before reading


class OnnxFileError(ModelError):
    """An .onnx file cannot be read: not ONNX, truncated, an opset outside 11..21, unsafe external data."""


def default_opset(model) -> int | None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return None


def read_onnx(path: str | os.PathLike, *, check_opset: bool = True):
    """The onnx.ModelProto at `path`, external data loaded (from inside its directory only)."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise OnnxFileError(f"ONNX file {str(p)!r} does not exist; check the path (relative to {Path.cwd()})")
    size = p.stat().st_size
    if size == 0 or size > MAX_FILE:
        raise OnnxFileError(f"{str(p)!r} has {size} bytes: not an ONNX model; give an .onnx file exported by a framework")
    try:
        model = onnx.load_model_from_string(p.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OnnxFileError(f"{str(p)!r} is not an ONNX model or is truncated (protobuf: {str(exc)[:120] or type(exc).__name__}); "
                            "re-export or re-download the file") from None
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise OnnxFileError(f"{str(p)!r} holds no ONNX graph (no nodes, outputs or opset): not an ONNX model, or truncated; "
                            "re-export or re-download the file")
    opset = default_opset(model)
    if check_opset and opset is not None and opset not in OPSETS:
        raise OnnxFileError(f"{str(p)!r} uses ONNX opset {opset}; supported are {OPSETS.start}..{OPSETS.stop - 1}: "
                            "convert it with onnx.version_converter.convert_version(model, 17) and save it again")
    _load_external(model, p)
    return model


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _load_external(model, path: Path) -> None:
    """Fill every external-data tensor from its file, after checking that the file lies inside the
    model's directory and holds the bytes the tensor claims."""
    import numpy as np
    from onnx import helper

    tensors = _external_tensors(model)
    if not tensors:
        return
    base = path.resolve().parent
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise OnnxFileError(f"{str(path)!r}: tensor {t.name!r} names external data {location!r} outside the model's "
                                "directory; move the data file next to the .onnx file and name it relatively")
        if not target.is_file():
            raise OnnxFileError(f"{str(path)!r}: tensor {t.name!r} needs external data file {location!r}, which is missing; "
                                "copy it next to the .onnx file")
        offset = int(info.get("offset", 0) or 0)
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        need = int(np.prod(t.dims, dtype=np.int64)) * itemsize
        length = int(info.get("length", need) or need)
        have = target.stat().st_size
        if offset < 0 or length != need or offset + length > have:
            raise OnnxFileError(f"{str(path)!r}: tensor {t.name!r} claims {length} bytes at offset {offset} of {location!r} "
                                f"({have} bytes; the shape needs {need}): the data file is truncated or does not belong to this model")
        with open(target, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length)
        del t.external_data[:]
        t.data_location = 0  # DEFAULT: the bytes now live in the tensor

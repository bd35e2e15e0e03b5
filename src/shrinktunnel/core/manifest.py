"""Reading an artifact's files as untrusted data: bounded sizes, bounded nesting, a checked schema.

Every check raises ArtifactError with one line that names the file, the field and what is allowed
(docs/artifact-format.md, "Reading untrusted artifacts"). Nothing here imports or runs anything a file
names, and nothing is allocated in proportion to a number a file states before that number has been
checked against the bytes the file really holds.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .jsonio import BoundedJSONError, MAX_DEPTH, loads_bounded

__all__ = ["MAX_MANIFEST_BYTES", "MAX_HEADER_BYTES", "MAX_INPUT_ELEMENTS", "read_regular_file", "open_regular",
           "parse_manifest", "check_manifest", "tensors_path", "read_safetensors_header", "sha256_file", "DTYPE_BYTES"]

MAX_MANIFEST_BYTES = 16 << 20  # 16 MiB: a 1,000-layer quantized model's manifest is about 1 MiB
MAX_HEADER_BYTES = 16 << 20  # the safetensors JSON header (about 100 bytes a tensor)
MAX_INPUT_ELEMENTS = 1 << 24  # elements of one sample of a recorded input (export builds zeros of it)
MAX_STAGES = 10_000
MAX_REF_CHARS = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")

# safetensors dtype -> bytes per element (the format's own names)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# torch dtype names an input signature may hold
_INPUT_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _fail(where: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{where}: {msg}; the artifact is corrupted or was edited")


def open_regular(path: Path, what: str) -> tuple[int, int]:
    """(fd, size) of `path` opened read-only without following a symlink; it must be a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{str(path)!r} is missing; the artifact is incomplete, save it again") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{str(path)!r} is a symbolic link; an artifact's {what} must be a regular file inside it, "
                            "never a link to a file elsewhere")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{str(path)!r} is not a regular file; an artifact's {what} must be one")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ArtifactError(f"cannot open {str(path)!r}: {exc.strerror}") from None
    size = os.fstat(fd).st_size
    return fd, size


def read_regular_file(path: Path, what: str, limit: int) -> bytes:
    """The bytes of a regular (non-link) file of at most `limit` bytes."""
    fd, size = open_regular(path, what)
    try:
        if size > limit:
            raise ArtifactError(f"{str(path)!r} is {size:,} bytes, above the {limit:,}-byte limit for an artifact's "
                                f"{what}; it is not an artifact this reader accepts")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # grew while being read
            raise ArtifactError(f"{str(path)!r} is above the {limit:,}-byte limit for an artifact's {what}")
        return data
    finally:
        os.close(fd)


def sha256_file(path: Path, what: str = "tensors file") -> str:
    fd, _ = open_regular(path, what)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def parse_manifest(mpath: Path, data: bytes) -> Any:
    try:
        return loads_bounded(data, max_depth=MAX_DEPTH)
    except BoundedJSONError as exc:
        raise ArtifactError(f"{str(mpath)!r} is not valid JSON ({exc}); the artifact is corrupted, save it again") from None


# -- the schema ------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or (isinstance(v, float) and math.isfinite(v))) or v in ("nan", "inf", "-inf")


def _check_signature(where: str, sig: Any) -> None:
    if not isinstance(sig, dict) or not isinstance(sig.get("shape"), list) or not isinstance(sig.get("dtype"), str):
        raise _fail(where, "an input signature must be {\"shape\": [null, ...], \"dtype\": \"float32\"}")
    if sig["dtype"] not in _INPUT_DTYPES:
        raise _fail(where, f"input dtype {sig['dtype'][:40]!r} is not one of {sorted(_INPUT_DTYPES)}")
    shape = sig["shape"]
    if len(shape) > 8:
        raise _fail(where, f"an input of {len(shape)} dimensions; at most 8")
    n = 1
    for i, d in enumerate(shape):
        if d is None and i == 0:
            continue
        if not _is_int(d) or d < 0:
            raise _fail(where, f"input shape {shape!r}: dimension {i} must be an integer >= 0 (null only for the batch)")
        n *= d
    if n > MAX_INPUT_ELEMENTS:
        raise _fail(where, f"input shape {shape!r} holds {n:,} elements a sample, above the {MAX_INPUT_ELEMENTS:,} "
                           "a reader builds example inputs for")


def check_manifest(mpath: Path, m: Any) -> dict[str, Any]:
    """The manifest, if every field a reader uses has the type and range docs/artifact-format.md gives
    (format and version are checked by the caller, which words their errors)."""
    w = repr(str(mpath))
    for key, kind in (("stages", list), ("tensors", dict), ("model", dict)):
        if not isinstance(m.get(key), kind):
            raise _fail(w, f"field {key!r} is missing or not {'an array' if kind is list else 'an object'}")
    for key, kind, name in (("toolkit", dict, "object"), ("metrics", dict, "object"), ("warnings", list, "array"),
                            ("created", str, "string")):
        if key in m and not isinstance(m[key], kind):
            raise _fail(w, f"field {key!r} is not a {name}")
    if any(not isinstance(v, str) for v in m.get("warnings", [])):
        raise _fail(w, "'warnings' must be an array of strings")
    if any(not isinstance(v, (str, int, float, type(None))) for v in m.get("toolkit", {}).values()):
        raise _fail(w, "'toolkit' must map names to strings")

    model = m["model"]
    ref = model.get("ref")
    if ref is not None and (not isinstance(ref, str) or not ref or len(ref) > MAX_REF_CHARS or "\0" in ref):
        raise _fail(w, f"model.ref must be null or a non-empty string of at most {MAX_REF_CHARS} characters")
    if "class" in model and not isinstance(model["class"], str):
        raise _fail(w, "model.class must be a string")
    digest = model.get("ref_sha256")
    if digest is not None and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        raise _fail(w, "model.ref_sha256 must be 64 lowercase hex digits")
    hf = model.get("transformers")
    if hf is not None and not (isinstance(hf, dict) and isinstance(hf.get("architecture"), str)
                               and isinstance(hf.get("config"), dict) and isinstance(hf["config"].get("model_type"), str)):
        raise _fail(w, "model.transformers must be {\"architecture\": string, \"config\": config.json's object with its model_type}")

    inputs = m.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, dict) or not isinstance(inputs.get("args", []), list) or not isinstance(inputs.get("kwargs", {}), dict):
            raise _fail(w, "'inputs' must be null or {\"args\": [...], \"kwargs\": {...}}")
        if len(inputs.get("args", [])) + len(inputs.get("kwargs", {})) > 64:
            raise _fail(w, "'inputs' lists more than 64 inputs")
        for i, sig in enumerate(inputs.get("args", [])):
            _check_signature(f"{w}: inputs.args[{i}]", sig)
        for k, sig in inputs.get("kwargs", {}).items():
            _check_signature(f"{w}: inputs.kwargs[{k[:40]!r}]", sig)

    if len(m["stages"]) > MAX_STAGES:
        raise _fail(w, f"{len(m['stages']):,} stages, above {MAX_STAGES:,}")
    for i, stage in enumerate(m["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("method"), str):
            raise _fail(w, f"stages[{i}] must be an object with a string 'method', got {type(stage).__name__}")
        for key in ("config", "replay"):
            if not isinstance(stage.get(key), dict):
                raise _fail(w, f"stages[{i}].{key} must be an object")

    t = m["tensors"]
    if "file" in t and not isinstance(t["file"], str):
        raise _fail(w, "tensors.file must be a string")
    if t.get("sha256") is not None and not (isinstance(t["sha256"], str) and _HEX64.fullmatch(t["sha256"])):
        raise _fail(w, "tensors.sha256 must be 64 lowercase hex digits")
    if "bytes" in t and not (_is_int(t["bytes"]) and t["bytes"] >= 0):
        raise _fail(w, "tensors.bytes must be an integer >= 0")
    aliases = t.get("aliases", {})
    if not isinstance(aliases, dict) or any(not isinstance(v, str) for v in aliases.values()):
        raise _fail(w, "tensors.aliases must map state-dict names to stored names")

    metrics = m.get("metrics", {})
    for side in ("before", "after"):
        # Numbers, or a method's own report (cluster's weight_sharing table): informational, never executed;
        # readers (shrink inspect's table) check the fields they show.
        if side in metrics and not (isinstance(metrics[side], dict)
                                    and all(_is_num(v) or isinstance(v, (dict, list)) for v in metrics[side].values())):
            raise _fail(w, f"metrics.{side} must map names to numbers (or a method's report object)")
    return m


# -- the tensors file ------------------------------------------------------------------------------

def tensors_path(root: Path, tinfo: dict[str, Any], default: str) -> Path:
    """The tensors file, which must be named by a plain file name directly inside the artifact."""
    name = tinfo.get("file", default)
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or ":" in name
           or os.path.isabs(name) or len(name) > 255)
    if bad:
        raise ArtifactError(f"tensors.file {name[:80]!r} of {str(root)!r} is not a plain file name: the tensors must be "
                            "a file directly inside the artifact directory (no separators, no '..', no absolute path)")
    return root / name


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """{name: (dtype, shape)} of a safetensors file and its size, checked against the file's bytes
    before anything is allocated: the 8-byte header length within the file and the cap, valid JSON,
    known dtypes, each tensor's byte range inside the data section, exactly shape x dtype size long,
    the ranges not overlapping."""
    fd, size = open_regular(path, "tensors file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(repr(str(path)), f"{size} bytes: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _fail(repr(str(path)), f"its header claims {n:,} bytes, the file has {size - 8:,} after the length "
                                             f"(and the cap is {MAX_HEADER_BYTES:,})")
            raw = f.read(n)
    finally:
        os.close(fd)
    where = repr(str(path))
    try:
        header = loads_bounded(raw, max_depth=4)
    except BoundedJSONError as exc:
        raise _fail(where, f"its safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(where, "its safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or any(not isinstance(v, str) for v in entry.values()):
                raise _fail(where, "__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPE_BYTES:
            raise _fail(where, f"tensor {name[:80]!r}: dtype must be one of {sorted(DTYPE_BYTES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 16 or any(not _is_int(d) or d < 0 for d in shape):
            raise _fail(where, f"tensor {name[:80]!r}: shape must be a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise _fail(where, f"tensor {name[:80]!r}: data_offsets {str(offsets)[:60]} are not a range inside the "
                               f"{data_bytes:,} data bytes")
        need = math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
        if offsets[1] - offsets[0] != need:
            raise _fail(where, f"tensor {name[:80]!r}: shape {shape} of {entry['dtype']} takes {need:,} bytes, its range "
                               f"holds {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (entry["dtype"], tuple(shape))
    spans.sort()
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise _fail(where, f"tensors {a[:60]!r} and {b[:60]!r} overlap")
    return out, size

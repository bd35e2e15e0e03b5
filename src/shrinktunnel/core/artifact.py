"""The artifact: a directory with `manifest.json` and `model.safetensors`. Never pickle.

Format: docs/artifact-format.md. Saving writes into a hidden sibling directory and renames it into
place, so a crash leaves either the old artifact or the new one at the target, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from .._version import __version__
from ..errors import ArtifactError, ModelError
from .atomic import atomic_dir
from .jsonio import dumps, write_json
from .history import get_record, set_model_ref
from .registry import get_method

FORMAT = "shrinktunnel-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"

__all__ = ["save_artifact", "artifact_nbytes", "load_artifact", "read_manifest", "check_output_dir", "FORMAT_VERSION"]


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict made contiguous, with tensors that share storage stored once (aliases)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        # Same storage, offset, shape, strides and dtype: the same tensor (a transposed view is not).
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def build_manifest(model: nn.Module, metrics: dict[str, Any] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    record = get_record(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit": {"name": "shrinktunnel", "version": __version__, "torch": torch.__version__.split("+")[0]},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"ref": record["model_ref"], "class": type(model).__name__},
        "inputs": record.get("inputs"),
        "stages": record["stages"],
        "metrics": metrics or {},
        "warnings": warnings or [],
    }


def save_artifact(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `model` as an artifact directory at `path`, atomically; return the path."""
    target = check_output_dir(path, overwrite=overwrite)
    with atomic_dir(target) as tmp:
        tensors, aliases = _tensors(model)
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        manifest = build_manifest(model, metrics, warnings)
        manifest["tensors"] = _tensors_entry(_sha256(tmp / TENSORS), (tmp / TENSORS).stat().st_size, aliases)
        write_json(tmp / MANIFEST, manifest)
    return target


def artifact_nbytes(model: nn.Module) -> int:
    """The bytes `save_artifact(model, path)` writes (no metrics or warnings), counted in memory: the
    same tensors file and manifest, with any 64 hex digits standing for the tensors' sha256 (their
    length is what counts). No file is written, hashed or synced: cheap enough to call per candidate."""
    tensors, aliases = _tensors(model)
    nbytes = len(save(tensors, metadata={"format": FORMAT}))
    manifest = build_manifest(model)
    manifest["tensors"] = _tensors_entry("0" * 64, nbytes, aliases)
    return nbytes + len(dumps(manifest).encode("utf-8"))


def _tensors_entry(sha256: str, nbytes: int, aliases: Any) -> dict[str, Any]:
    return {"file": TENSORS, "sha256": sha256, "bytes": nbytes, "aliases": aliases}


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, marker: str = MANIFEST) -> Path:
    """The target as a Path, if writing there may replace only an earlier output of ours (it holds
    `marker`) or an empty directory; raise ArtifactError before any work is done otherwise."""
    target = Path(path)
    if target.exists():
        replaceable = target.is_dir() and ((target / marker).is_file() or not any(target.iterdir()))
        if not replaceable:
            raise ArtifactError(
                f"{str(target)!r} exists and is not an earlier shrinktunnel output (no {marker}); "
                f"choose a new or empty directory, so that nothing of yours is overwritten"
            )
        if not overwrite and any(target.iterdir()):
            raise ArtifactError(f"artifact {str(target)!r} already exists; pass overwrite=True (--force) to replace it")
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, checked manifest of the artifact at `path`."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist; give the folder `save` wrote")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(root)!r} has no {MANIFEST}: it is not a shrinktunnel artifact, or saving it did not finish")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{str(mpath)!r} is not valid JSON ({exc}); the artifact is corrupted, save it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(mpath)!r} is not a {FORMAT} manifest (its 'format' field is missing or different)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(
            f"artifact format version {version!r} is not supported by shrinktunnel {__version__} "
            f"(it reads versions 1 to {FORMAT_VERSION}); upgrade shrinktunnel"
        )
    for key, kind in (("stages", list), ("tensors", dict), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{str(mpath)!r}: field {key!r} is missing or not a {kind.__name__}; the artifact is corrupted")
    return manifest


def load_artifact(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the compressed module saved at `path`. `model`: the original architecture, needed only
    when the manifest has no model reference; it is copied, not changed."""
    root = Path(path)
    manifest = read_manifest(root)
    tinfo = manifest["tensors"]
    tpath = root / str(tinfo.get("file", TENSORS))
    if not tpath.is_file():
        raise ArtifactError(f"{str(tpath)!r} is missing; the artifact is incomplete, save it again")
    if tinfo.get("sha256") and _sha256(tpath) != tinfo["sha256"]:
        raise ArtifactError(f"{str(tpath)!r} does not match the checksum in the manifest: the file is corrupted or was changed")

    ref = manifest["model"].get("ref")
    if model is not None:
        import copy

        base = copy.deepcopy(model)
    elif ref:
        from .refs import load_model

        try:
            base = load_model(ref)
        except ModelError as exc:
            raise ArtifactError(f"cannot rebuild the original model from {ref!r}: {exc}; or pass model=...") from None
    else:
        raise ArtifactError(
            "the manifest records no model reference, so the original architecture is unknown: "
            "call st.load(path, model=<the original model>), or compress with model_ref='pkg.module:factory'"
        )
    base = base.eval()
    for i, stage in enumerate(manifest["stages"]):
        try:
            method = get_method(stage["method"])
            base = method.replay(base, stage["replay"])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ArtifactError(f"cannot replay stage {i} ({stage.get('method')!r}): {type(exc).__name__}: {exc}") from None
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {str(tpath)!r}: {exc}; the file is corrupted") from None
    for alias, original in tinfo.get("aliases", {}).items():
        if original in tensors:
            tensors[alias] = tensors[original]
    try:
        base.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ArtifactError("the tensors do not fit the model rebuilt from the manifest"
                            + (f": {details[0]}" if details else f": {str(exc).splitlines()[0]}")
                            + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
                            + "; the artifact is corrupted or its manifest was edited") from None
    record = get_record(base)
    record["stages"] = manifest["stages"]
    record["inputs"] = manifest.get("inputs")
    set_model_ref(base, ref)
    return base

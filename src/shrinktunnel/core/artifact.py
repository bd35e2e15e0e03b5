"""The artifact: a directory with `manifest.json` and `model.safetensors`. Never pickle.

Format: docs/artifact-format.md. Saving writes into a hidden sibling directory and renames it into
place, so a crash leaves either the old artifact or the new one at the target, never half of one.
"""

from __future__ import annotations

import copy
import datetime as _dt
import itertools
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from .._version import __version__
from ..errors import ArtifactError, ModelError, one_line
from .atomic import atomic_dir
from .jsonio import dumps, write_json
from .history import get_record, update_record
from .manifest import (MAX_MANIFEST_BYTES, check_manifest, open_regular, parse_manifest, read_regular_file, read_safetensors_header,
                       sha256_file, tensors_path)
from .rebuild import (MAX_CHAIN, ST_DTYPES, build_transformers, is_builtin_ref, meta_copy, transformers_entry, untrusted,
                      wrap_model_error)
from .factory import call_factory, file_ref_digest, is_file_ref
from .registry import get_method

FORMAT = "shrinktunnel-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "model.safetensors"

__all__ = ["save_artifact", "artifact_nbytes", "load_artifact", "read_manifest", "verify_tensors", "check_output_dir",
           "FORMAT_VERSION", "MAX_MANIFEST_BYTES"]


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


def _model_entry(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """`model` of the manifest: the reference (a file reference resolved to an absolute path, with the
    sha256 of the file's content so a reader can tell it changed), the class, and a Hugging Face
    model's config (what rebuilds it without running any code of the artifact's)."""
    ref = record["model_ref"]
    entry: dict[str, Any] = {"ref": ref, "class": type(model).__name__}
    resolved = file_ref_digest(ref) if ref else None
    if resolved is not None:
        entry["ref"], entry["ref_sha256"] = resolved
    elif record.get("ref_sha256") and ref:
        entry["ref_sha256"] = record["ref_sha256"]
    hf = record.get("transformers")
    if hf is None and not record["stages"]:
        hf = transformers_entry(model)  # no stage yet: the config still describes the original
    if hf is not None:
        entry["transformers"] = hf
    return entry


def build_manifest(model: nn.Module, metrics: dict[str, Any] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    record = get_record(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit": {"name": "shrinktunnel", "version": __version__, "torch": torch.__version__.split("+")[0]},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": _model_entry(model, record),
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
    overwrite: bool = False,
) -> Path:
    """Write `model` as an artifact directory at `path`, atomically; return the path. An existing
    artifact there is replaced only with `overwrite=True` (docs/artifact-format.md: a writer SHOULD
    refuse); an empty directory is always replaceable, anything else never."""
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
    return sha256_file(path)


def open_regular_size(path: Path) -> tuple[Path, int]:
    fd, size = open_regular(path, "tensors file")
    os.close(fd)
    return path, size


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, checked manifest of the artifact at `path`: at most MAX_MANIFEST_BYTES, a regular
    file (not a link), JSON nested at most 64 deep, every field a reader uses of the documented type.
    Raises ArtifactError (one line) on anything else."""
    root = Path(path)
    if not root.is_dir():
        if root.exists() or root.is_symlink():
            raise ArtifactError(f"{str(root)!r} is a file, not an artifact directory; give the folder `save` wrote "
                                "(the one holding manifest.json)")
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist; give the folder `save` wrote")
    mpath = root / MANIFEST
    if not (mpath.exists() or mpath.is_symlink()):
        raise ArtifactError(f"{str(root)!r} has no {MANIFEST}: it is not a shrinktunnel artifact, or saving it did not finish")
    manifest = parse_manifest(mpath, read_regular_file(mpath, "manifest", MAX_MANIFEST_BYTES))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{str(mpath)!r} is not a {FORMAT} manifest (its 'format' field is missing or different)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise ArtifactError(
            f"artifact format version {version if isinstance(version, int) else repr(str(version)[:40])} is not supported by shrinktunnel {__version__} "
            f"(it reads versions 1 to {FORMAT_VERSION}); upgrade shrinktunnel"
        )
    return check_manifest(mpath, manifest)


def verify_tensors(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the tensors file of the artifact at `path` without loading a tensor: a regular file directly
    inside the directory, its size as recorded, a well-formed safetensors header whose ranges fit the
    file, aliases naming stored tensors, and its sha256 as recorded. Returns {"file", "bytes",
    "sha256_checked", "header"}."""
    root = Path(path)
    manifest = read_manifest(root) if manifest is None else manifest
    tinfo = manifest["tensors"]
    tpath = tensors_path(root, tinfo, TENSORS)
    _, size = open_regular_size(tpath)
    # sha256 pins the content; `bytes` is informational (the header check below finds a truncated
    # file whatever it says), named in the error when it tells what happened
    checked = bool(tinfo.get("sha256"))
    size_differs = "bytes" in tinfo and tinfo["bytes"] != size
    if checked and sha256_file(tpath) != tinfo["sha256"]:
        raise ArtifactError(f"{str(tpath)!r} does not match the checksum in the manifest"
                            + (f" ({size:,} bytes, {tinfo['bytes']:,} recorded: truncated or extended)" if size_differs else "")
                            + ": the file is corrupted or was changed")
    header, size = read_safetensors_header(tpath)
    for alias, original in tinfo.get("aliases", {}).items():
        if original not in header or alias in header:
            raise ArtifactError(f"tensors.aliases: {alias[:80]!r} -> {original[:80]!r} must name a stored tensor from a "
                                "name that is not stored; the artifact is corrupted or was edited")
    return {"file": tpath, "bytes": size, "sha256_checked": checked, "header": header}


def load_artifact(path: str | os.PathLike, model: nn.Module | None = None, *, trust_code: bool = False,
                  _chain: tuple[Path, ...] = ()) -> nn.Module:
    """Rebuild the compressed module saved at `path`. `model`: the original architecture (copied, not
    changed); without it the architecture comes from the project's own assets, a Hugging Face config or
    another artifact, and code the manifest names (`model.ref`) runs only with `trust_code=True`.
    Everything is checked against the bytes the files hold before anything sized by the manifest is
    allocated: the replay runs first on the meta device, and its tensors must match the file's header."""
    root = Path(path)
    here = root.resolve()
    if here in _chain:
        raise ArtifactError(f"artifact {str(root)!r}: model.ref leads back to an artifact already being loaded "
                            f"({' -> '.join(str(p) for p in (*_chain, here))}); a model reference must not refer to itself")
    if len(_chain) >= MAX_CHAIN:
        raise ArtifactError(f"artifact {str(root)!r}: more than {MAX_CHAIN} artifacts chained through model.ref")
    manifest = read_manifest(root)
    checked = verify_tensors(root, manifest)
    ref = manifest["model"].get("ref")
    base, _how = _base_model(root, manifest, model, trust_code, (*_chain, here))
    stages = manifest["stages"]
    aliases = manifest["tensors"].get("aliases", {})
    before = _nonpersistent_bytes(base)
    try:  # the dry run: structure only, on the meta device
        with torch.device("meta"):
            rebuilt = _replay(meta_copy(base), stages, meta=True)
    except _MetaLimit:
        rebuilt = None
    if rebuilt is not None:
        _fits_the_file(root, rebuilt, checked["header"], aliases, checked["bytes"], before)
    else:
        # A replay that needs tensor values (prune_channels' index arithmetic) cannot run on meta, or
        # the replay is malformed: bound every integer it holds by what the file and the original model
        # hold, replay for real, and check the result against the file before loading any tensor.
        _bound_replay_numbers(stages, base, checked["bytes"])
    base = _replay(base.eval(), stages)
    if rebuilt is None:
        _fits_the_file(root, base, checked["header"], aliases, checked["bytes"], before)
    try:
        tensors = load_file(str(checked["file"]))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {str(checked['file'])!r}: {one_line(exc)}; the file is corrupted") from None
    for alias, original in manifest["tensors"].get("aliases", {}).items():
        tensors[alias] = tensors[original]
    try:
        base.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise _state_dict_error(exc) from None
    update_record(base, stages=stages, inputs=manifest.get("inputs"), model_ref=ref)
    if manifest["model"].get("transformers"):  # the original's description travels on, however it was rebuilt
        update_record(base, transformers=manifest["model"]["transformers"])
    if manifest["model"].get("ref_sha256"):
        update_record(base, ref_sha256=manifest["model"]["ref_sha256"])
    return base


def _mismatch(first: str, more: int = 0) -> ArtifactError:
    return ArtifactError(f"the tensors do not fit the model rebuilt from the manifest: {first}"
                         + (f" (and {more} more)" if more else "")
                         + "; the artifact is corrupted or its manifest was edited")


def _state_dict_error(exc: RuntimeError) -> ArtifactError:
    text = str(exc)
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    return _mismatch(details[0] if details else (text.splitlines()[0] if text else "?"), max(len(details) - 1, 0))


def _base_model(root: Path, manifest: dict[str, Any], model: nn.Module | None, trust_code: bool,
                chain: tuple[Path, ...]) -> tuple[nn.Module, str]:
    """The original architecture and where it came from (see core/rebuild.py for the consent rules)."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ArtifactError(f"model= must be a torch.nn.Module (the original architecture), got {type(model).__name__}")
        return copy.deepcopy(model), "model"
    info = manifest["model"]
    ref, hf = info.get("ref"), info.get("transformers")
    if ref and is_builtin_ref(ref):
        return _call(ref), "assets"
    if ref and trust_code:
        target = Path(ref) if not is_file_ref(ref) and ":" not in ref else None
        if target is not None and target.is_dir():  # another artifact, outside this one: same rules, chain kept
            if not (target / MANIFEST).exists():
                raise ArtifactError(f"model.ref {ref[:200]!r} is a directory but not an artifact (no {MANIFEST})")
            return load_artifact(target, trust_code=trust_code, _chain=chain), "artifact"
        return _call(ref, expect_sha256=info.get("ref_sha256")), "code"
    if hf:
        return build_transformers(hf, meta=False), "transformers"
    if ref:
        raise untrusted(ref, root)
    raise ArtifactError(
        "the manifest records no model reference, so the original architecture is unknown: "
        "call st.load(path, model=<the original model>) (--model REF), or compress with model_ref='pkg.module:factory'"
    )


def _call(ref: str, **kw) -> nn.Module:
    """The base model from its factory, a factory's ModelError told as the artifact's."""
    try:
        return call_factory(ref, **kw)
    except ArtifactError:
        raise
    except ModelError as exc:
        raise wrap_model_error(ref, exc) from None


class _MetaLimit(Exception):
    """A replay needs tensor values, which the meta device does not have."""


def _is_meta_limit(exc: Exception) -> bool:
    # torch's words for an op meta tensors cannot run: data-dependent ops (nonzero, masking) raise
    # NotImplementedError; .item() / .tolist() / numpy conversion name the meta device
    return isinstance(exc, NotImplementedError) or "meta" in str(exc).lower()


def _replay(base: nn.Module, stages: list[dict[str, Any]], *, meta: bool = False) -> nn.Module:
    """Apply each stage's replay; any failure becomes an ArtifactError. `meta`: the dry run, where a
    failure that only says the op needs real data raises _MetaLimit instead."""
    for i, stage in enumerate(stages):
        try:
            method = get_method(stage["method"])
        except Exception as exc:
            raise ArtifactError(f"cannot replay stage {i}: {one_line(exc)}") from None
        try:
            base = method.replay(base, stage["replay"])
        except ArtifactError:
            raise
        except Exception as exc:  # a malformed replay of any kind is a corrupt artifact, never a traceback
            if meta and _is_meta_limit(exc):
                raise _MetaLimit() from None
            raise ArtifactError(f"cannot replay stage {i} ({stage['method'][:60]!r}): {one_line(exc)}; "
                                "the artifact is corrupted or its manifest was edited") from None
        if not isinstance(base, nn.Module):
            raise ArtifactError(f"cannot replay stage {i} ({stage['method'][:60]!r}): it gave no module")
    return base


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nonpersistent_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a module holds outside its state dict (non-persistent buffers)."""
    state = model.state_dict(keep_vars=True)
    return sum(_nbytes(b) for name, b in model.named_buffers(remove_duplicate=False) if name not in state)


def _bound_replay_numbers(stages: list[dict[str, Any]], base: nn.Module, file_bytes: int) -> None:
    """Every integer in every replay, and the product of every shape (a list under a key named *shape*), at
    most 4 x max(8 x the file's bytes, the original model's elements) + 2^20: no layer a replay builds
    holds more weights than 8 per stored byte (1-bit packing, 1-bit codes) or than the original model
    (pruning, sharing, decomposition never grow a layer)."""
    numel = sum(t.numel() for t in itertools.chain(base.parameters(), base.buffers()))
    bound = 4 * max(8 * file_bytes, numel) + (1 << 20)
    stack = [(i, None, stage["replay"]) for i, stage in enumerate(stages)]
    while stack:
        i, key, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((i, k, v) for k, v in node.items())
        elif isinstance(node, list):
            # a shape (a key named so): its product is the element count a layer would be built with
            if isinstance(key, str) and "shape" in key and node and all(isinstance(v, int) for v in node) \
                    and math.prod(abs(v) for v in node) > bound:
                raise ArtifactError(f"stage {i} ({stages[i]['method'][:60]!r}): {key} {str(node)[:80]} holds more elements "
                                    f"than the artifact's {file_bytes:,} bytes and the original model can account for; "
                                    "the artifact is corrupted or its manifest was edited")
            stack.extend((i, key, v) for v in node)
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > bound:
            raise ArtifactError(f"stage {i} ({stages[i]['method'][:60]!r}): the number {node} is beyond anything the "
                                f"artifact's {file_bytes:,} bytes can hold; the artifact is corrupted or its manifest was edited")


def _fits_the_file(root: Path, meta: nn.Module, header: dict[str, tuple[str, tuple[int, ...]]], aliases: dict[str, str],
                   file_bytes: int, before: int) -> None:
    """The rebuilt module's state dict must be exactly the file's tensors: same names, shapes and
    dtypes. Its other tensors (non-persistent buffers) may not grow by more than the file's size + 64 MiB
    over the original's."""
    state = meta.state_dict()
    stored = {k: v for k, v in state.items() if k not in aliases}
    missing = [k for k in stored if k not in header]
    unexpected = [k for k in header if k not in stored]
    if missing or unexpected:
        first = (f'Missing key(s) in state_dict: "{missing[0]}"' if missing else f'Unexpected key(s) in state_dict: "{unexpected[0]}"')
        raise _mismatch(first, len(missing) + len(unexpected) - 1)
    for name, t in stored.items():
        dtype, shape = header[name]
        if tuple(t.shape) != shape:
            raise _mismatch(f"size mismatch for {name}: shape {list(shape)} in the file, "
                            f"{list(t.shape)} in the rebuilt model")
        if ST_DTYPES.get(t.dtype) != dtype:
            raise _mismatch(f"dtype mismatch for {name}: {dtype} in the file, {str(t.dtype).removeprefix('torch.')} in the rebuilt model")
    for alias, original in aliases.items():
        if alias in state and tuple(state[alias].shape) != header[original][1]:
            raise _mismatch(f"size mismatch for {alias} (an alias of {original})")
    extra = _nonpersistent_bytes(meta) - before
    if extra > file_bytes + (64 << 20):
        raise ArtifactError(f"artifact {str(root)!r}: its replay builds {extra:,} bytes of tensors that the file does not "
                            "hold; the artifact is corrupted or its manifest was edited")

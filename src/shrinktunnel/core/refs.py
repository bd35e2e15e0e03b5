"""MODEL and DATA references, as the command line takes them.

A reference names a zero-argument callable:
- `package.module:factory`: imported from the installed packages (e.g. `shrinktunnel.assets:mnist_cnn`);
- `path/to/file.py:factory`: loaded from a Python file.
A MODEL factory returns a trained `torch.nn.Module`. A file is loaded as a module named by the
sha256 of its content (`_shrinktunnel_user_<digest>`): the same file gives the same module name in
every process, so caches keyed by the model's class (search/cache.py) hit across runs. A DATA factory returns an iterable of batches
(see core/data.py). DATA may also be an `.npz` or `.safetensors` file holding `x` and optionally `y`,
split into batches of `batch_size`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import DataError, ModelError, one_line
from .history import get_record, set_model_ref

__all__ = ["resolve_callable", "load_model", "load_data", "is_file_ref", "file_ref_digest", "file_module_name"]

# sha256 of every file executed by resolve_callable in this process, by absolute path: what ran, not
# what the file holds by the time an artifact is saved
_EXECUTED: dict[str, str] = {}


def is_file_ref(ref: str) -> bool:
    target, sep, attr = ref.rpartition(":")
    return bool(sep and attr and target.endswith(".py"))


def file_module_name(digest: str) -> str:
    return f"_shrinktunnel_user_{digest[:32]}"


def file_ref_digest(ref: str) -> tuple[str, str] | None:
    """(ref with its file's absolute path, sha256 of the file's content) for a 'file.py:factory'
    reference, else None. The digest is that of the code this process executed, when it did."""
    if not is_file_ref(ref):
        return None
    target, _, attr = ref.rpartition(":")
    path = Path(target).expanduser().resolve()
    digest = _EXECUTED.get(str(path))
    if digest is None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
    return f"{path}:{attr}", digest


def resolve_callable(ref: str, what: str = "model", *, expect_sha256: str | None = None) -> Callable[[], Any]:
    """The callable a reference names. `expect_sha256`: for a file reference, the digest its content
    must have (an artifact's record of the file it was made from); checked before anything runs."""
    err = ModelError if what == "model" else DataError
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise err(
            f"{what} reference {ref!r} has no factory name: write 'package.module:factory' or "
            f"'path/to/file.py:factory' (e.g. shrinktunnel.assets:mnist_cnn)"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise err(f"{what} file {str(path)!r} does not exist; check the path (relative to {Path.cwd()})")
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise err(f"cannot read {what} file {str(path)!r}: {exc.strerror}") from None
        digest = hashlib.sha256(source).hexdigest()
        if expect_sha256 is not None and digest != expect_sha256:
            raise err(f"{what} file {str(path)!r} changed since the artifact was made (sha256 {digest[:12]}..., "
                      f"recorded {expect_sha256[:12]}...); pass it explicitly with --model {ref} (model=...) to use it as it is now")
        mod_name = file_module_name(digest)  # stable across processes (str hash() is salted per process)
        module = sys.modules.get(mod_name)
        if module is None or getattr(module, "__file__", None) != str(path.resolve()):
            module = types.ModuleType(mod_name)
            module.__file__ = str(path.resolve())
            sys.modules[mod_name] = module
            try:
                exec(compile(source, str(path.resolve()), "exec"), module.__dict__)  # the bytes hashed above
            except Exception as exc:
                sys.modules.pop(mod_name, None)
                raise err(f"importing {what} file {str(path)!r} failed: {one_line(exc)}") from exc
        _EXECUTED[str(path.resolve())] = digest
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise err(
                f"cannot import module {target!r} of {what} reference {ref!r}: {one_line(exc)}; install the package "
                f"or give a file path ending in .py"
            ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise err(f"{target!r} has no callable {attr!r}; callables there: {', '.join(names[:12]) or 'none'}")
    return fn


def load_model(ref: str, *, base: nn.Module | None = None, trust_code: bool = False,
               expect_sha256: str | None = None) -> nn.Module:
    """The model a MODEL reference names: a zero-argument factory ('package.module:factory',
    'file.py:factory'), or an artifact directory (st.load: the model as a recipe left it, so one run's
    output is the next one's input, e.g. attention fused before `shrink auto`). For an artifact, `base`
    and `trust_code` are st.load's `model=` and `trust_code=` (no code the artifact names runs without
    them). A factory named here is the caller's choice, so it runs."""
    path = Path(ref)
    if path.is_dir():
        from .artifact import MANIFEST, load_artifact

        if not (path / MANIFEST).exists():
            raise ModelError(f"{ref!r} is a directory but not an artifact (no {MANIFEST}); MODEL is "
                             "'package.module:factory', 'path/to/file.py:factory' or an artifact directory")
        return load_artifact(path, base, trust_code=trust_code).eval()
    fn = resolve_callable(ref, "model", expect_sha256=expect_sha256)
    try:
        model = fn()
    except SystemExit as exc:  # `sys:exit` as a factory must not end the process silently with status 0
        raise ModelError(f"model factory {ref!r} called exit({exc.code!r}) instead of returning a model") from None
    except Exception as exc:
        raise ModelError(f"model factory {ref!r} failed: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    record = get_record(model)
    if not record["stages"] and "transformers" not in record:
        from .rebuild import transformers_entry

        # The original's Hugging Face config, before any stage can change it (keep_layers does):
        # what lets st.load rebuild the architecture without running this factory.
        hf = transformers_entry(model)
        if hf is not None:
            record["transformers"] = hf
    return set_model_ref(model.eval(), ref)


def load_data(ref: str, batch_size: int = 64) -> Any:
    path = Path(ref)
    if path.suffix in (".npz", ".safetensors"):
        if not path.is_file():
            raise DataError(f"data file {ref!r} does not exist; check the path (relative to {Path.cwd()})")
        arrays = _read_arrays(path)
        if "x" not in arrays:
            raise DataError(f"data file {ref!r} holds {sorted(arrays)}, but needs an array named 'x' (and optionally 'y')")
        x = torch.as_tensor(arrays["x"])
        y = torch.as_tensor(arrays["y"]) if "y" in arrays else None
        if len(x) == 0:
            raise DataError(f"data file {ref!r} has an empty 'x'; it must hold at least one sample")
        if y is not None and len(y) != len(x):
            raise DataError(f"data file {ref!r}: 'x' has {len(x)} samples but 'y' has {len(y)}; they must match")
        chunks = range(0, len(x), batch_size)
        return [x[i : i + batch_size] if y is None else (x[i : i + batch_size], y[i : i + batch_size]) for i in chunks]
    fn = resolve_callable(ref, "data")
    try:
        return fn()
    except Exception as exc:
        raise DataError(f"data factory {ref!r} failed: {one_line(exc)}") from exc


def _read_arrays(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:  # never unpickle user data
                return {k: npz[k] for k in npz.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {one_line(exc)}") from exc

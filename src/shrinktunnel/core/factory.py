"""Zero-argument factories named by reference: `package.module:factory` or `path/to/file.py:factory`.

The bottom half of core/refs.py, split off so that core/artifact.py (which rebuilds an artifact's base
model from its factory, with the caller's consent) and core/refs.py (which dispatches a MODEL reference:
factory, artifact directory, ...) do not import each other. A file is executed as a module named by
the sha256 of its content, so the same file gives the same module name in every process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import DataError, ModelError, one_line
from .history import get_record, set_model_ref, update_record

__all__ = ["resolve_callable", "call_factory", "is_file_ref", "file_ref_digest", "file_module_name"]

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


def call_factory(ref: str, *, expect_sha256: str | None = None) -> nn.Module:
    """The model a factory reference returns, checked to be an nn.Module, in eval mode, carrying its
    reference (and its Hugging Face config, which lets st.load rebuild it without running this factory)."""
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
            update_record(model, transformers=hf)
    return set_model_ref(model.eval(), ref)

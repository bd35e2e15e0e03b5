"""MODEL and DATA references, as the command line takes them.

A reference names a zero-argument callable:
- `package.module:factory`: imported from the installed packages (e.g. `shrinktunnel.assets:mnist_cnn`);
- `path/to/file.py:factory`: loaded from a Python file.
A MODEL factory returns a trained `torch.nn.Module`. A DATA factory returns an iterable of batches
(see core/data.py). DATA may also be an `.npz` or `.safetensors` file holding `x` and optionally `y`,
split into batches of `batch_size`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import DataError, ModelError, one_line
from .history import set_model_ref

__all__ = ["resolve_callable", "load_model", "load_data"]


def resolve_callable(ref: str, what: str = "model") -> Callable[[], Any]:
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
        mod_name = f"_shrinktunnel_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise err(f"importing {what} file {str(path)!r} failed: {one_line(exc)}") from exc
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


def load_model(ref: str) -> nn.Module:
    """The model a MODEL reference names: a zero-argument factory ('package.module:factory',
    'file.py:factory'), or an artifact directory (st.load: the model as a recipe left it, so one run's
    output is the next one's input, e.g. attention fused before `shrink auto`)."""
    path = Path(ref)
    if path.is_dir():
        from .artifact import MANIFEST, load_artifact

        if not (path / MANIFEST).is_file():
            raise ModelError(f"{ref!r} is a directory but not an artifact (no {MANIFEST}); MODEL is "
                             "'package.module:factory', 'path/to/file.py:factory' or an artifact directory")
        return load_artifact(path).eval()
    fn = resolve_callable(ref, "model")
    try:
        model = fn()
    except Exception as exc:
        raise ModelError(f"model factory {ref!r} failed: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
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

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

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import DataError, ModelError, one_line
from .factory import call_factory, file_module_name, file_ref_digest, is_file_ref, resolve_callable  # noqa: F401  (re-exported)

# Model files read as data, by suffix: loader(ref, expect_sha256=...) -> nn.Module. Registered by the
# package that reads them (onnx_input: ".onnx"), a higher layer that core must not import.
MODEL_LOADERS: dict[str, Callable[..., nn.Module]] = {}

__all__ = ["MODEL_LOADERS", "resolve_callable", "load_model", "load_data", "is_file_ref", "file_ref_digest", "file_module_name"]


def load_model(ref: str, *, base: nn.Module | None = None, trust_code: bool = False,
               expect_sha256: str | None = None) -> nn.Module:
    """The model a MODEL reference names: a zero-argument factory ('package.module:factory',
    'file.py:factory'), or an artifact directory (st.load: the model as a recipe left it, so one run's
    output is the next one's input, e.g. attention fused before `shrink auto`). For an artifact, `base`
    and `trust_code` are st.load's `model=` and `trust_code=` (no code the artifact names runs without
    them). A factory named here is the caller's choice, so it runs. An `.onnx` file is read as data
    (onnx_input.load_onnx: no code runs)."""
    loader = MODEL_LOADERS.get(Path(str(ref)).suffix.lower())
    if loader is not None:
        return loader(ref, expect_sha256=expect_sha256)
    path = Path(ref)
    from .hf_input import is_hf_model_dir, load_hf_model

    if is_hf_model_dir(path):  # a Hugging Face model directory: config.json + safetensors, no code runs
        return load_hf_model(path)
    if path.is_dir():
        from .artifact import MANIFEST, load_artifact

        if not (path / MANIFEST).exists():
            raise ModelError(f"{ref!r} is a directory but not an artifact (no {MANIFEST}); MODEL is "
                             "'package.module:factory', 'path/to/file.py:factory' or an artifact directory")
        return load_artifact(path, base, trust_code=trust_code).eval()
    return call_factory(ref, expect_sha256=expect_sha256)


def load_data(ref: str, batch_size: int = 64, *, text: dict | None = None) -> Any:
    """`text`: for a .txt DATA, {tokenizer (a model directory or a tokenizer), seq_len, samples}
    (hf_input.text_batches)."""
    path = Path(ref)
    if path.suffix == ".txt":
        from .hf_input import text_batches

        if not text or text.get("tokenizer") is None:
            raise DataError(f"text DATA {ref!r} needs a tokenizer: MODEL must be a Hugging Face model directory "
                            "holding one (tokenizer.json)")
        # Windows of hundreds of tokens: batches of 4 (the logits of 64 windows would not fit in memory).
        return text_batches(path, text["tokenizer"], text.get("seq_len", 512), text.get("samples", 128), 4)
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

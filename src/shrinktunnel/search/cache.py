"""The on-disk cache of evaluations: a second run with the same inputs reads instead of measuring,
and an interrupted run resumes where it stopped.

Layout: `cache_dir/<base>/` where `base` hashes the model (architecture and state dict), the data,
the eval_fn and the toolkit version; inside, `profile.json` (per-layer figures and the baseline) and
`evals.jsonl`, one line per evaluated (layer, action) whose `key` also hashes the action's method and
its exact stage config. Lines are appended and flushed one at a time, so a run killed mid-way loses
at most the evaluation in progress; a torn last line is ignored on reading.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._version import __version__
from ..core import data as D
from ..core.jsonio import dumps, json_safe

__all__ = ["fingerprint", "model_hash", "data_hash", "fn_hash", "EvalCache"]


def _update(h, obj: Any, depth: int = 0) -> None:
    """Feed a plain value into a hash: tensors by dtype, shape and bytes; containers recursively;
    anything else by its type name (a live object cannot be hashed by content)."""
    if depth > 6:
        h.update(b"<deep>")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                     else t.numpy().tobytes())
    elif isinstance(obj, (str, int, float, bool, type(None))):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in obj:
            _update(h, k, depth + 1)
            _update(h, obj[k], depth + 1)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _update(h, item, depth + 1)
        h.update(b"]")
    elif isinstance(obj, nn.Module):
        h.update(model_hash(obj).encode())
    elif callable(obj):
        h.update(fn_hash(obj).encode())
    else:
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        _update(h, p)
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """The architecture (the module tree as printed, with its class's module and name) and every state
    dict tensor. Stable across processes: a `file.py:factory` model's classes live in a module named
    by the file's content digest (core/refs.py), never by the salted `hash()` of a string."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def data_hash(data: Any) -> str:
    h = hashlib.sha256()
    for batch in D.batches(data):
        _update(h, batch)
    return h.hexdigest()


def fn_hash(fn: Callable | None) -> str:
    """An eval_fn by what it computes as far as it can be seen: its qualified name, bytecode and
    constants, default arguments and the values it closes over (tensors and lists of them by
    content), so `lambda m: accuracy(m, other_data)` does not reuse another data set's entries."""
    if fn is None:
        return "none"
    h = hashlib.sha256()
    if isinstance(fn, functools.partial):  # partial(accuracy, data=test): the function and its bound arguments
        h.update(fn_hash(fn.func).encode())
        _update(h, list(fn.args))
        _update(h, dict(fn.keywords))
        return h.hexdigest()
    target = getattr(fn, "__func__", fn)  # bound methods: the function and its instance's type
    h.update(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', type(target).__qualname__)}".encode())
    code = getattr(target, "__code__", None)
    if isinstance(code, types.CodeType):
        h.update(code.co_code)
        _update(h, [c for c in code.co_consts if isinstance(c, (str, int, float, bool, type(None)))])
        _update(h, list(getattr(target, "__defaults__", None) or ()))
        cells = getattr(target, "__closure__", None) or ()
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            _update(h, value if not callable(value) or isinstance(value, nn.Module) else
                    f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}")
    return h.hexdigest()


class EvalCache:
    """Entries of one base key. `cache_dir=None` keeps them in memory only."""

    def __init__(self, cache_dir: str | os.PathLike | None, base: str) -> None:
        self.base = base
        self.dir = None if cache_dir is None else Path(cache_dir) / base[:32]
        self.entries: dict[str, dict[str, Any]] = {}
        self.profile: dict[str, Any] | None = None
        if self.dir is not None and self.dir.is_dir():
            self._read()

    def _read(self) -> None:
        profile = self.dir / "profile.json"
        if profile.is_file():
            try:
                self.profile = json.loads(profile.read_text())
            except ValueError:
                self.profile = None
        evals = self.dir / "evals.jsonl"
        if evals.is_file():
            for line in evals.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by an interruption
                if isinstance(entry, dict) and "key" in entry:
                    self.entries[entry["key"]] = entry

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entry = {"key": key, **entry}
        self.entries[key] = entry
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "evals.jsonl", "a") as f:
                f.write(json.dumps(json_safe(entry), allow_nan=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def set_profile(self, profile: dict[str, Any]) -> None:
        self.profile = profile
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / "profile.json.tmp"
            tmp.write_text(dumps(profile))
            os.replace(tmp, self.dir / "profile.json")


def entry_key(base: str, layer: str, method: str, config: dict[str, Any]) -> str:
    return fingerprint(base, layer, method, config, __version__)

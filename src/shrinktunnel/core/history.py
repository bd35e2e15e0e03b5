"""What a compressed model carries with it: where it came from and which stages made it.

Methods return new modules; the record travels on the module itself (a plain dict attribute, copied
by `copy.deepcopy`), so that any model a method returns can be saved and replayed. Reading it never
changes the model (`get_record` hands out a read-only view); `update_record`, `set_model_ref`,
`record_inputs` and `append_stage` write it, copy-on-write.
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

_ATTR = "_shrinktunnel"

__all__ = ["get_record", "update_record", "set_model_ref", "append_stage", "model_ref", "stages"]


def _stored(model: nn.Module) -> dict[str, Any]:
    record = model.__dict__.get(_ATTR)
    return record if record is not None else {"model_ref": None, "inputs": None, "stages": []}


def get_record(model: nn.Module) -> Mapping[str, Any]:
    """The record `model` carries, read only: a model that carries none reads as an empty record, and
    reading attaches nothing to it."""
    return MappingProxyType(_stored(model))


def update_record(model: nn.Module, **fields: Any) -> None:
    """Set fields of `model`'s record (attached on the first write). Copy-on-write: a model copied from
    another with `copy.copy` does not share the change."""
    model.__dict__[_ATTR] = {**_stored(model), **fields}


def set_model_ref(model: nn.Module, ref: str | None) -> nn.Module:
    """Record how to rebuild `model`'s original architecture: `"pkg.module:factory"` or
    `"path/to/file.py:factory"`, a zero-argument callable returning the model. `st.load` uses it."""
    update_record(model, model_ref=ref)
    return model


def model_ref(model: nn.Module) -> str | None:
    return get_record(model)["model_ref"]


def stages(model: nn.Module) -> list[dict[str, Any]]:
    return get_record(model)["stages"]


def append_stage(model: nn.Module, method: str, config: dict, replay: dict, coverage: dict | None = None) -> None:
    record = _stored(model)
    stage = {"method": method, "config": config, "replay": replay}
    if coverage is not None:
        stage["coverage"] = coverage  # what the stage did to each layer (core/coverage.py); replay ignores it
    # Copy-on-write: a model deep-copied from another must not share the parent's stage list.
    model.__dict__[_ATTR] = {**record, "stages": copy.deepcopy(record["stages"]) + [stage]}


def record_inputs(model: nn.Module, batch: Any) -> None:
    """Remember the input signature (shapes with the batch dimension as null, dtypes) of one batch,
    so that export can build example inputs from an artifact alone."""
    from .data import split

    (args, kwargs), _ = split(batch)
    describe = lambda t: {"shape": [None, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}  # noqa: E731
    update_record(model, inputs={
        "args": [describe(a) for a in args],
        "kwargs": {k: describe(v) for k, v in kwargs.items()},
    })


def example_inputs(spec: dict[str, Any] | None, batch: int = 2) -> Any:
    """Zeros shaped as a recorded input signature (see `record_inputs`), or None."""
    import torch

    if not spec:
        return None
    make = lambda d: torch.zeros([batch, *d["shape"][1:]], dtype=getattr(torch, d["dtype"]))  # noqa: E731
    args = [make(d) for d in spec.get("args", [])]
    kwargs = {k: make(d) for k, d in spec.get("kwargs", {}).items()}
    if kwargs:
        return kwargs
    return args[0] if len(args) == 1 else (tuple(args), None)

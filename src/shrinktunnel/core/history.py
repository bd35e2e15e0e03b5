"""What a compressed model carries with it: where it came from and which stages made it.

Methods return new modules; the record travels on the module itself (a plain dict attribute, copied
by `copy.deepcopy`), so that any model a method returns can be saved and replayed.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

_ATTR = "_shrinktunnel"

__all__ = ["get_record", "set_model_ref", "append_stage", "model_ref", "stages"]


def get_record(model: nn.Module) -> dict[str, Any]:
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = {"model_ref": None, "stages": []}
        model.__dict__[_ATTR] = record
    return record


def set_model_ref(model: nn.Module, ref: str | None) -> nn.Module:
    """Record how to rebuild `model`'s original architecture: `"pkg.module:factory"` or
    `"path/to/file.py:factory"`, a zero-argument callable returning the model. `st.load` uses it."""
    get_record(model)["model_ref"] = ref
    return model


def model_ref(model: nn.Module) -> str | None:
    return get_record(model)["model_ref"]


def stages(model: nn.Module) -> list[dict[str, Any]]:
    return get_record(model)["stages"]


def append_stage(model: nn.Module, method: str, config: dict, replay: dict) -> None:
    record = get_record(model)
    # Copy-on-write: a model deep-copied from another must not share the parent's stage list.
    model.__dict__[_ATTR] = {
        "model_ref": record["model_ref"],
        "stages": copy.deepcopy(record["stages"]) + [{"method": method, "config": config, "replay": replay}],
    }

"""The stage runner every entry point shares (the public functions, recipes, analysis and search):
canonicalize the layers (core/layers.py), run one registered method on the result, record the stage
with its replay and its coverage (core/coverage.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ModelError
from . import data as D
from .coverage import measure_coverage
from .history import append_stage, get_record, record_inputs
from .layers import canonicalize
from .registry import Context, get_method

__all__ = ["run_stage"]


def run_stage(model: nn.Module, method: str, config: Any, ctx: Context) -> nn.Module:
    """Apply one registered method to a copy of `model` and record it for replay."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    m = get_method(method)
    cfg = m.config_cls.parse(config)
    canonical, record, unreachable = canonicalize(model, recurrent=m.recurrent)
    ctx.skipped = {}
    new_model, replay = m.apply(canonical, cfg, ctx)
    if record:
        replay = {**replay, "canonical": record}
    coverage = measure_coverage(canonical, new_model, unreachable, ctx.skipped)
    ctx.skipped.update(unreachable)  # the layer model's reason is the one the coverage records
    ctx.flush_skips(method)
    append_stage(new_model, method, cfg.to_dict(), replay, coverage=coverage)
    example = ctx.example_inputs if ctx.example_inputs is not None else (
        next(D.batches(ctx.data)) if ctx.data is not None else None)
    if example is not None and get_record(new_model).get("inputs") is None:
        record_inputs(new_model, example)
    return new_model

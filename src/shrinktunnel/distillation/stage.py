"""The registered methods of the distill package.

- `distill`: a copy of the model learns from a teacher (by default the model before the recipe's
  first stage), so it follows prune, decompose, cluster or quantize in a recipe. Distillation
  changes values only: its replay leaves the structure as it is.
- `keep_layers`: a shallower student made from the teacher's own blocks (DistilBERT's
  initialisation: every other layer), replayed by dropping the same blocks from the original.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..core.registry import Context, register_method
from ..core.select import set_submodule
from ..errors import ConfigError, DataError, ModelError
from .config import DistillConfig, KeepLayersConfig
from .trainer import distill_train

__all__ = ["distill_model", "replay_distill", "keep_layers", "replay_keep_layers", "find_blocks"]


def replay_distill(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Distillation changes no structure: nothing to rebuild."""
    return model


def _teacher(cfg: DistillConfig, ctx: Context) -> nn.Module:
    if cfg.teacher == "original":
        if ctx.original is None:
            raise ConfigError("distill: teacher 'original' is unknown here (no original model was recorded); "
                              "call st.distill(student, teacher, data) or set teacher: 'pkg.module:factory'")
        return ctx.original
    from ..core.refs import load_model

    return load_model(cfg.teacher)


@register_method("distill", DistillConfig, replay=replay_distill)
def distill_model(model: nn.Module, cfg: DistillConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Knowledge distillation of a copy of `model` from a teacher (soft targets, hints, embeddings)."""
    if ctx.data is None:
        raise DataError("distill needs data to train on: pass data= (batches of the model's inputs; labels optional)")
    teacher = _teacher(cfg, ctx)
    student = copy.deepcopy(model)
    log = distill_train(student, teacher, ctx.data, cfg, eval_fn=ctx.eval_fn, progress=ctx.progress, warn=ctx.warn)
    return student.eval(), {"log": log.summary()}


# ------------------------------------------------------------------------------------------------
# keep_layers: a shallower student from the teacher's blocks
# ------------------------------------------------------------------------------------------------
def find_blocks(model: nn.Module, name: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of blocks named `name`, or with "auto" the longest one of identical module types."""
    if name != "auto":
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"keep_layers: the model has no module {name!r}; give the dotted name of its "
                              "nn.ModuleList of blocks (e.g. encoder.layer for BERT), or blocks: auto") from None
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"keep_layers: {name!r} is a {type(blocks).__name__}, not an nn.ModuleList of blocks")
        return name, blocks
    best: tuple[str, nn.ModuleList] | None = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (n, m)
    if best is None:
        raise ModelError("keep_layers: the model has no nn.ModuleList of two or more blocks of one type; "
                         "give the stack's name with blocks: <name>")
    return best


def _resolve_keep(keep: list[int] | str, n: int, where: str) -> list[int]:
    if keep == "alternate":
        return list(range(n - 1, -1, -2))[::-1]
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ConfigError(f"keep_layers: block indices {bad} are out of range: {where} has {n} blocks (0 to {n - 1})")
    return sorted(keep)


def _keep(model: nn.Module, name: str, blocks: nn.ModuleList, keep: list[int]) -> None:
    n = len(blocks)
    set_submodule(model, name, nn.ModuleList([blocks[i] for i in keep]))
    # Hugging Face models also record the depth in their config; keep it true (it is saved and read).
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == n:
            config.num_hidden_layers = len(keep)


def replay_keep_layers(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    name, blocks = find_blocks(model, replay["blocks"])
    if len(blocks) != replay["of"]:
        raise ModelError(f"keep_layers replay: {name} has {len(blocks)} blocks, the artifact was made from {replay['of']}")
    _keep(model, name, blocks, list(replay["keep"]))
    return model


@register_method("keep_layers", KeepLayersConfig, replay=replay_keep_layers)
def keep_layers(model: nn.Module, cfg: KeepLayersConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` keeping only some blocks of its stack (a student initialised from the teacher)."""
    model = copy.deepcopy(model)
    name, blocks = find_blocks(model, cfg.blocks)
    keep = _resolve_keep(cfg.keep, len(blocks), name)
    _keep(model, name, blocks, keep)
    return model, {"blocks": name, "keep": keep, "of": len(blocks)}

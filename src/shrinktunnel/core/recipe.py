"""Recipes: an ordered list of stages, each a method name with its config.

YAML (a top-level list, or a mapping with a `stages` list):

    stages:
      - quantize:
          activations: {calibrator: minmax}
          skip: ["fc_layers.2"]

In Python: a list whose items are config instances (`st.QuantConfig()`), one-key dicts
(`{"quantize": {...}}`) or `(name, config)` pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, one_line
from .config import Config
from .registry import get_method, method_for_config

__all__ = ["Stage", "load_recipe"]


@dataclass(frozen=True)
class Stage:
    method: str
    config: Config


def load_recipe(recipe: Any) -> list[Stage]:
    """Parse a recipe from a YAML path, a YAML string, a list of stages or a single config."""
    if isinstance(recipe, Config):
        recipe = [recipe]
    if isinstance(recipe, (str, os.PathLike)):
        recipe = _read_yaml(recipe)
    if isinstance(recipe, dict):
        unknown = [k for k in recipe if k not in ("stages", "name", "description")]
        if unknown:
            raise ConfigError(f"recipe: unknown key {unknown[0]!r}; allowed top-level keys: stages, name, description")
        recipe = recipe.get("stages")
    if not isinstance(recipe, list) or not recipe:
        raise ConfigError("a recipe must be a non-empty list of stages, e.g. [{quantize: {}}] or stages: [...]")
    return [_stage(i, item) for i, item in enumerate(recipe)]


def _read_yaml(source: str | os.PathLike) -> Any:
    """A path (os.PathLike, a name ending in .yaml/.yml, or an existing file) is read; any other
    string is YAML text itself."""
    text = str(source)
    is_path = isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or (
        "\n" not in text and len(text) < 4096 and Path(text).is_file()
    )
    if is_path:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"recipe file {text!r} does not exist; check the path (relative to {Path.cwd()})")
        text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or one_line(exc)
        raise ConfigError(f"recipe {str(source)[:60]!r} is not valid YAML{at}: {problem}; fix the YAML syntax") from None


def _stage(i: int, item: Any) -> Stage:
    if isinstance(item, Config):
        return Stage(method_for_config(item).name, item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        name, cfg = item
    elif isinstance(item, dict) and len(item) == 1:
        (name, cfg), = item.items()
    elif isinstance(item, str):
        name, cfg = item, None
    else:
        raise ConfigError(
            f"recipe stage {i}: {item!r} is not a stage; write a one-key mapping such as {{quantize: {{...}}}}"
        )
    method = get_method(name)
    try:
        return Stage(name, method.config_cls.parse(cfg))
    except ConfigError as exc:
        raise ConfigError(f"recipe stage {i} ({name}): {exc}") from None

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

from ..errors import ConfigError
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
    text = str(source)
    is_text = isinstance(source, str) and ("\n" in text or ":" in text and not text.endswith((".yaml", ".yml")))
    if not is_text:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"recipe file {text!r} does not exist; check the path (relative to {Path.cwd()})")
        text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(source)[:80]!r} is not valid YAML: {exc}") from None


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

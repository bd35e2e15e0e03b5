"""Module-tree primitives: find a submodule's parent, replace a submodule, every name of a module.

The bottom of core: `layers.py` (the layer model) and `select.py` (glob selection, which needs the
layer model's `visible_modules`) both build on it, so neither imports the other both ways.
"""

from __future__ import annotations

from torch import nn

__all__ = ["get_submodule_parent", "set_submodule", "names_by_module"]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, module)


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every module, keyed by id: a module registered twice has two names."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names

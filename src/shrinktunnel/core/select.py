"""Layer selection by ordered glob patterns over module names (`fnmatch` syntax).

Patterns are matched against the dotted names of `visible_modules(model)`: `conv_layers.*`,
`*.attention.*`, `fc_layers.0`. Rules are ordered and the last matching rule wins, so a broad rule
first and narrow exceptions after it reads naturally, and a search can later set anything per layer.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Sequence, TypeVar

from torch import nn

from .layers import logical_name, visible_modules
from .modtree import get_submodule_parent, names_by_module, set_submodule  # noqa: F401  (re-exported: methods import them from here)

T = TypeVar("T")

__all__ = ["matches", "select_modules", "resolve"]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """A wrapped layer (core/layers.py: `<module>.compute`) also matches under its module's name."""
    logical = logical_name(name)
    return any(fnmatchcase(name, p) or fnmatchcase(logical, p) for p in patterns)


def resolve(name: str, rules: Sequence[tuple[str, T]], default: T) -> T:
    """The value of the last rule whose pattern matches `name`, else `default`."""
    value, logical = default, logical_name(name)
    for pattern, rule_value in rules:
        if fnmatchcase(name, pattern) or fnmatchcase(logical, pattern):
            value = rule_value
    return value


def select_modules(
    model: nn.Module,
    kinds: tuple[type[nn.Module], ...],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of the given kinds whose names match an include pattern and no exclude pattern."""
    return [
        (name, module)
        for name, module in visible_modules(model)
        if name and isinstance(module, kinds) and matches(name, include) and not matches(name, exclude)
    ]


def unmatched_patterns(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Patterns that match no module at all: almost always a typo worth reporting."""
    names = [n for n, _ in visible_modules(model) if n]
    return [p for p in patterns if p != "*" and not any(matches(n, [p]) for n in names)]

"""Config base: plain data that validates, with unknown keys rejected by name.

Configs hold only plain values (numbers, strings, string enums, lists, nested configs) so that they
survive YAML and JSON round trips. Live objects (models, data, losses) are always function arguments.
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import ConfigError

__all__ = ["Config", "StrEnum"]


class _ConfigMeta(type(BaseModel)):
    """Direct construction (`st.QuantConfig(...)`) raises ConfigError, as `parse` does. Done in the
    metaclass, not in `__init__`: pydantic validates nested configs without going through here, so
    messages are converted once, at the top, with the full path to the bad key."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_describe(cls.__name__, exc)) from None


class Config(BaseModel, metaclass=_ConfigMeta):
    """Base of every method config: unknown keys fail, assignment re-validates."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(_describe(type(self).__name__, exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # Checked here, not by pydantic's extra="forbid", so the message can list what is allowed.
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in allowed:
                    hint = difflib.get_close_matches(str(key), allowed, n=1)
                    guess = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise ValueError(
                        f"unknown key {key!r}{guess}; allowed keys: {', '.join(allowed)}"
                    )
        return data

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Build from a dict (YAML/JSON), an instance, or None (all defaults); raise ConfigError."""
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{cls.__name__} must be a mapping of keys to values, got {type(data).__name__}: "
                f"{data!r}; allowed keys: {', '.join(cls.model_fields)}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(cls.__name__, exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; string enums become their values."""
        return self.model_dump(mode="json")


def _describe(name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{name}.{loc}" if loc else name
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
        parts.append(f"{where}: {msg}{shown}")
    return "; ".join(parts)

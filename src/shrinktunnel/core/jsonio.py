"""JSON that stays valid JSON: non-finite floats become the strings "inf", "-inf", "nan"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["json_safe", "dumps", "write_json"]


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, allow_nan=False, default=str) + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(dumps(obj))


MAX_DEPTH = 64  # nesting of arrays and objects a reader accepts (a manifest needs about 8)


class BoundedJSONError(ValueError):
    """The text is not JSON, or not JSON a reader accepts (NaN / Infinity, nested too deep)."""


def _reject_constant(name: str) -> Any:
    raise BoundedJSONError(f"{name} is not JSON (writers store non-finite floats as strings)")


def loads_bounded(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON that came from a file someone else wrote: strict UTF-8, no NaN / Infinity, at most
    `max_depth` levels of nesting. The caller caps the size before reading. Raises BoundedJSONError
    with a one-line reason; never RecursionError (the C parser's own recursion guard is caught, and the
    depth is checked without recursion)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BoundedJSONError(f"not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise BoundedJSONError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise BoundedJSONError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    # Iterative depth walk: the parsed tree may still be deeper than a recursive checker could walk.
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise BoundedJSONError(f"nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return obj

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

"""Helpers shared by the distillation and fusion benchmarks: named targets and Markdown tables."""

from __future__ import annotations

import operator
import sys
import time
from typing import Any

_COMPARE = {"<=": operator.le, ">=": operator.ge}
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def target(name: str, description: str, measured: float, op: str, limit: float, unit: str) -> dict[str, Any]:
    return {"name": name, "description": description, "measured": measured, "op": op, "limit": limit,
            "unit": unit, "passed": bool(_COMPARE[op](measured, limit))}


def md_table(title: str, header: list[str], rows: list[list[Any]], note: str = "") -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [[t["description"], f"{t['measured']:.4g} {t['unit']}", f"{t['op']} {t['limit']:g} {t['unit']}",
             "pass" if t["passed"] else "**MISS**"] for t in targets]
    return md_table("Targets", ["target", "measured", "limit", ""], rows)


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"

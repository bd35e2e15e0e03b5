"""Write a report as JSON (for machines) and Markdown (for people)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.jsonio import write_json
from .tables import Table

__all__ = ["write_reports"]


def write_reports(directory: Path, title: str, data: dict[str, Any], tables: list[Table], notes: list[str] = ()) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    jpath, mpath = directory / "report.json", directory / "report.md"
    write_json(jpath, data)
    parts = [f"# {title}", ""]
    for table in tables:
        parts += [table.to_markdown(), ""]
    from ..core.coverage import coverage_lines

    if isinstance(data.get("stages"), list) and (lines := coverage_lines(data["stages"])):
        parts += ["### Coverage (what each stage did to the weight layers)", ""] + [f"- {line}" for line in lines] + [""]
    warnings = data.get("warnings") or []
    if warnings:
        parts += ["### Warnings (skipped or unchanged)", ""] + [f"- {w}" for w in warnings] + [""]
    if notes:
        parts += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    mpath.write_text("\n".join(parts))
    return jpath, mpath

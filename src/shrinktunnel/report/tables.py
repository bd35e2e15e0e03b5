"""A small table type rendered both by rich (terminal) and as GitHub Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

__all__ = ["Table", "print_table", "print_fitted", "fmt_bytes", "fmt_ms", "fmt_pct"]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: Any) -> None:
        self.rows.append([("" if c is None else str(c)) for c in cells])

    def to_rich(self) -> RichTable:
        table = RichTable(title=self.title, caption=self.note or None, title_justify="left")
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def widths(self) -> list[int]:
        """Each column's widest cell (header included), in characters."""
        return [max([len(c), *(len(r[i]) for r in self.rows if i < len(r))]) for i, c in enumerate(self.columns)]

    def rendered_width(self) -> int:
        """Characters rich's default box takes for this table: a space either side of every cell and
        a rule between and around the columns."""
        return sum(w + 3 for w in self.widths()) + 1

    def split(self, width: int, keep: int = 1) -> list["Table"]:
        """This table as parts no wider than `width`, each repeating the first `keep` columns (the row
        names) with as many of the others as fit, in order; the table itself when it fits. A column too
        wide for any part gets a part of its own (rich wraps its cells)."""
        if self.rendered_width() <= width or len(self.columns) <= keep:
            return [self]
        w = self.widths()
        fixed = sum(x + 3 for x in w[:keep]) + 1
        groups: list[list[int]] = [[]]
        used = fixed
        for i in range(keep, len(self.columns)):
            if groups[-1] and used + w[i] + 3 > width:
                groups.append([])
                used = fixed
            groups[-1].append(i)
            used += w[i] + 3
        parts = []
        for n, group in enumerate(groups, 1):
            cols = list(range(keep)) + group
            part = Table(f"{self.title} ({n}/{len(groups)})" if n == 1 else f"({n}/{len(groups)}) continued",
                         [self.columns[i] for i in cols], note=self.note if n == len(groups) else "")
            part.rows = [[r[i] if i < len(r) else "" for i in cols] for r in self.rows]
            parts.append(part)
        return parts

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table.to_rich())


def print_fitted(table: Table, console: Console, *, full: Any = None, keep: int = 1) -> None:
    """Print `table` within the console's width (80 columns when no terminal is attached): split into
    parts that repeat the row names when it is wider; `full` names where the whole table is."""
    parts = table.split(console.width, keep)
    for part in parts:
        console.print(part.to_rich())
    if len(parts) > 1 and full is not None:
        console.print(f"(the table in {len(parts)} parts to fit {console.width} columns; all of it in one: {full})",
                      highlight=False)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def fmt_pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"

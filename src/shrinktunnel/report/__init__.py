"""Reports: tables for the terminal and Markdown, JSON beside them."""

from .tables import Table, fmt_bytes, fmt_ms, fmt_pct, print_table
from .writers import write_reports

__all__ = ["Table", "fmt_bytes", "fmt_ms", "fmt_pct", "print_table", "write_reports"]

"""The storage report as a table: per layer and in total, bits per weight beside the entropy bound."""

from __future__ import annotations

from typing import Any

from ..report.tables import Table

__all__ = ["storage_table"]


def storage_table(report: dict[str, Any], title: str = "Weight sharing: bits per weight against the entropy bound") -> Table:
    """Rows of `storage_report(model)`: stored bits per weight (streams, and with codebooks and code
    tables), the zeroth-order entropy of each stream, and how far the streams are above it."""
    table = Table(title, ["layer", "weights", "kept", "clusters", "index b/sym (H)", "position b/sym (H)",
                          "streams b/w", "entropy b/w", "total b/w"],
                  note="b/sym: stored bits per symbol of the stream, its Shannon entropy in brackets; b/w: bits per "
                       "weight of the layer (zeros included); total adds the float32 codebook and the code tables.")
    for name, s in report.get("layers", {}).items():
        idx = s["streams"]["indices"]
        pos = s["streams"].get("positions")
        table.add(name, s["weights"], s["kept"], s["clusters"],
                  f"{idx['bits_per_symbol']:.3f} ({idx['entropy_bits_per_symbol']:.3f})",
                  "-" if pos is None else f"{pos['bits_per_symbol']:.3f} ({pos['entropy_bits_per_symbol']:.3f})",
                  f"{s['stream_bits_per_weight']:.3f}", f"{s['entropy_bits_per_weight']:.3f}", f"{s['bits_per_weight']:.3f}")
    t = report.get("total")
    if t:
        table.add("total", t["weights"], "", "", "", "", f"{t['stream_bits_per_weight']:.3f}",
                  f"{t['entropy_bits_per_weight']:.3f}", f"{t['bits_per_weight']:.3f}")
    return table

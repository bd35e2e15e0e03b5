"""benchmarks/run_all.py: each benchmark's tables go into its marked block of docs/benchmarks.md, the
parts of a benchmark measured in parts into theirs, and nothing else changes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_all(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("run_all_under_test", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DOCS, mod.RESULTS_DIR = tmp_path / "benchmarks.md", tmp_path / "results"
    mod.RESULTS_DIR.mkdir()
    return mod


def test_blocks_and_parts_are_spliced_and_old_or_unmarked_files_are_not(tmp_path):
    mod = _run_all(tmp_path)
    mod.DOCS.write_text(
        "# B\n\n<!-- begin one: written by benchmarks/run_all.py from benchmarks/results/one.md -->\nold one\n"
        "<!-- end one -->\n\ntext between\n\n<!-- begin two_a: written by benchmarks/two.py --part a -->\nold a\n"
        "<!-- end two_a -->\n")
    (mod.RESULTS_DIR / "one.md").write_text("new one\n")
    (mod.RESULTS_DIR / "two_a.md").write_text("new a\n")
    (mod.RESULTS_DIR / "two_extra.md").write_text("a part with no block in the docs\n")
    assert mod.update_docs("one", since=0) and mod.update_docs("two", since=0)
    doc = mod.DOCS.read_text()
    assert "new one" in doc and "old one" not in doc and "new a" in doc and "old a" not in doc
    assert "text between" in doc and "two_extra" not in doc and doc.count("<!-- end two_a -->") == 1
    stale = mod.RESULTS_DIR / "one.md"
    stale.write_text("stale\n")
    os.utime(stale, (1, 1))
    assert not mod.update_docs("one", since=100)  # written before this run started: a crash leaves the docs alone
    assert "stale" not in mod.DOCS.read_text()

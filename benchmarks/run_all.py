"""Run every benchmark and rewrite the figures: benchmarks/results/NAME.json and NAME.md, and each
benchmark's block in docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py

A benchmark is any benchmarks/NAME.py whose name does not start with "_" (this file excepted). Each
runs in its own process, so that the threads and memory of one never disturb the timing of the next.
Exits with 1 when a benchmark misses a target or crashes; the figures measured are written anyway.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, REPO, RESULTS_DIR, write_text_atomic  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"


def discover() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name)


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- begin {name}: written by benchmarks/run_all.py from benchmarks/results/{name}.md -->",
            f"<!-- end {name} -->")


def splice(doc: str, name: str, block: str) -> str:
    """Replace the text between the benchmark's markers (its begin line as written, whoever wrote it); append
    a new marked block when there is none."""
    begin, end = markers(name)
    at = doc.find(f"<!-- begin {name}:")
    if at >= 0 and end in doc[at:]:
        line_end = doc.index("-->", at) + len("-->")
        _, tail = doc[line_end:].split(end, 1)
        return f"{doc[:line_end]}\n{block.strip()}\n{end}{tail}"
    return f"{doc.rstrip()}\n\n{begin}\n{block.strip()}\n{end}\n"


def update_docs(name: str, since: float) -> bool:
    """Paste results/NAME.md into the docs if this run wrote it (a crash leaves the old figures alone), and
    each results/NAME_PART.md it wrote whose block the docs already have (benchmarks measured in parts:
    log2_mnist_ptq / _qat / _minilm, sparse_kernels_models / _sweep)."""
    doc = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    written = []
    for tables in sorted(RESULTS_DIR.glob(f"{name}*.md")):
        block = tables.stem
        if tables.stat().st_mtime < since or not (block == name or block.startswith(name + "_") and f"<!-- begin {block}:" in doc):
            continue
        doc = splice(doc, block, tables.read_text())
        written.append(block)
    if written:
        write_text_atomic(DOCS, doc)
    return bool(written)


def main() -> int:
    failed = []
    for script in discover():
        name = script.stem
        print(f"== {name}", flush=True)
        started = time.time()
        # The same interpreter as ours, from the repository root, as the docs' command line says.
        code = subprocess.run([sys.executable, str(script)], cwd=REPO).returncode
        written = update_docs(name, started)
        print(f"== {name}: {'ok' if code == 0 else f'exit code {code}'}; "
              f"{'docs/benchmarks.md updated' if written else 'no new results, docs left as they were'}", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

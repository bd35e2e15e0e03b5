"""What every benchmark shares: the description of the machine and the writing of result files.

A benchmark `NAME.py` writes `results/NAME.json` (every figure, for machines) and `results/NAME.md`
(the tables, for people); `run_all.py` pastes the latter into docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
COMMAND = ".venv/bin/python benchmarks/run_all.py"  # the one command that reproduces every figure


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (virtual machines often give only the family)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ differed from it (then the figures are of a work tree)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {"commit": git("rev-parse", "HEAD"), "src_modified": None if status is None else bool(status)}


def machine_info(threads: int) -> dict[str, Any]:
    # Imported here so that run_all.py, which only pastes tables, starts without loading torch.
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    import shrinktunnel

    return {
        "arch": platform.machine(),  # what `uname -m` prints
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "shrinktunnel": shrinktunnel.__version__,
    }


def today() -> str:
    return dt.date.today().isoformat()


def write_text_atomic(path: Path, text: str) -> None:
    # A crash mid-write must not leave half a results file behind (`*.tmp` is git-ignored).
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(json_path: Path, results: dict[str, Any], markdown: str) -> None:
    """Write the figures as JSON and the tables as Markdown beside it (same stem, `.md`)."""
    write_text_atomic(json_path, json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_text_atomic(json_path.with_suffix(".md"), markdown)


def finish(res: dict[str, Any], *, name: str, command: str, started: float, threads: int, render, stem: str | None = None) -> int:
    """Stamp a benchmark's results (date, machine, commit, command, load, wall time), write
    results/<stem or name>.json and .md, print the Markdown; 0 for sys.exit."""
    import os
    import time

    res.update(benchmark=name, date=today(), machine=machine_info(threads), source=git_state(), command=command,
               load=" ".join(f"{x:.1f}" for x in os.getloadavg()), wall_s=round(time.perf_counter() - started, 1))
    markdown = render(res)
    write_results(RESULTS_DIR / f"{stem or name}.json", res, markdown)
    print(markdown)
    return 0


def targets_markdown(targets: list[dict[str, Any]], title: str = "Targets", miss: str = "**FAIL**",
                     digits: int = 4) -> str:
    """The targets table of a benchmark: each {description, measured, unit, op, limit, passed}."""
    from shrinktunnel.report import Table

    t = Table(title, ["target", "measured", "required", "result"])
    for x in targets:
        t.add(x["description"], f"{x['measured']:.{digits}g} {x['unit']}", f"{x['op']} {x['limit']:g} {x['unit']}",
              "pass" if x["passed"] else miss)
    return t.to_markdown()

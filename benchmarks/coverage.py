"""The model-zoo conformance matrix: every zoo model x every method, written to docs/coverage.md.

    .venv/bin/python benchmarks/coverage.py                    # the whole matrix (about 20-30 minutes)
    .venv/bin/python benchmarks/coverage.py --models bert,gpt2 --methods prune,cluster   # a few cells
    # in groups of models, each run short enough to hold the machine's benchmark lock, then merged:
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/coverage.py --models bert,gpt2 --json /tmp/a.json --doc /tmp/a.md
    .venv/bin/python benchmarks/coverage.py --render /tmp/a.json,/tmp/b.json   # -> docs/coverage.md, results/coverage.json

The zoo (tests/zoo/models.py): Hugging Face architectures from tiny configs with random weights, timm
models (pretrained=False) where timm is installed, a CNN whose convs are Conv2d subclasses that pad in
their own forward, and the awkward nets of tests/conftest.py. Nothing is downloaded.

Per cell (tests/zoo/conformance.py): does the method run, what share of the eligible weights it
transformed (counted here and compared with the library's own coverage record), does `st.save` ->
`st.load` give bit-identical outputs, does the ONNX export run in ONNX Runtime and match PyTorch, and the
method's wall time. A cell is green when all hold (the share target of 95 % applies to quantize, cast,
prune, cluster and qat); otherwise it carries what failed, in words.

Writes docs/coverage.md (the whole matrix, generated), benchmarks/results/coverage.json (every cell) and
benchmarks/results/coverage.md (the summary that run_all.py pastes into docs/benchmarks.md). Exits 1
when a cell is not green.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import REPO, RESULTS_DIR, git_state, machine_info, today, write_results, write_text_atomic  # noqa: E402

DOC = REPO / "docs" / "coverage.md"
COMMAND = ".venv/bin/python benchmarks/coverage.py"
THREADS = 2


def _versions() -> dict[str, str]:
    import transformers

    out = {"transformers": transformers.__version__}
    try:
        import warnings

        from zoo.models import _timm_path

        _timm_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import timm
            import torchvision
        out["timm"] = timm.__version__
        out["torchvision"] = torchvision.__version__
    except ImportError:
        out["timm"] = "not installed"
    return out


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if x < 0.9995 or x == 1 else f"{100 * x:.2f} %"


def _pending(c: dict[str, Any]) -> bool:
    """Every check holds but the ONNX one, which the time budget did not reach (or whose export outran the
    cell's time limit on a loaded machine: not a verdict either way)."""
    def unchecked(p: str) -> bool:
        return p.startswith("ONNX not checked") or (p.startswith("ONNX:") and "_Timeout: took longer than" in p)

    return c["runs"] and not c["green"] and all(unchecked(p) for p in c["problems"])


def _cell_text(c: dict[str, Any], note: int | None) -> str:
    ref = f" [{note}]" if note is not None else ""
    if not c["runs"]:
        return f"❌ fails{ref}"
    mark = "✅" if c["green"] else "⏳" if _pending(c) else "❌"
    share = "n/a" if c["share"] is None else f"{100 * c['share']:.0f} %"
    return f"{mark} {share}{ref}"


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reasons(c: dict[str, Any], shown: int = 4) -> list[str]:
    """Layers left alone, one line per reason: `N layers: reason (a, b, c, +k more)`."""
    by: dict[str, list[str]] = {}
    for layer, reason in c["left"].items():
        by.setdefault(reason, []).append(layer)
    out = []
    for reason, layers in sorted(by.items(), key=lambda kv: -len(kv[1])):
        names = ", ".join(f"`{n}`" for n in layers[:shown]) + (f", +{len(layers) - shown} more" if len(layers) > shown else "")
        out.append(f"{len(layers)} left: {_short(reason, 240)} ({names})")
    return out


def markdown(cells: list[dict[str, Any]], zoo: dict[str, Any], methods: list[str], info: dict[str, Any],
             seconds: float) -> tuple[str, str]:
    """(docs/coverage.md, the summary for docs/benchmarks.md)."""
    from zoo.conformance import METHOD_TITLES, SHARE_TARGET, TARGETED, TOLERANCE

    models = list(dict.fromkeys(c["model"] for c in cells))
    by = {(c["model"], c["method"]): c for c in cells}
    green = sum(c["green"] for c in cells)
    pending = sum(_pending(c) for c in cells)
    waiting = f", {pending} more waiting only on their ONNX check (⏳)" if pending else ""
    m = info["machine"]
    head = (f"Generated {info['date']} by `{COMMAND}` on {m['arch']}, {m['cpu']}, {m['cores']} cores, "
            f"worker processes of one thread each; torch {m['torch']}, transformers {info['versions']['transformers']}, "
            f"timm {info['versions']['timm']}, onnxruntime {m['onnxruntime']}; commit {str(info['git']['commit'])[:10]}"
            f"{' (src/ modified)' if info['git'].get('src_modified') else ''}. {len(cells)} cells in {seconds / 60:.1f} min."
            + (f" {info['note']}" if info.get("note") else ""))

    notes: list[str] = []
    note_of: dict[tuple[str, str], int] = {}
    for c in cells:
        if not c["green"] and not _pending(c):
            notes.append(f"{c['model']} / {c['method']}: " + "; ".join(_short(p, 500) for p in c["problems"]))
            note_of[(c["model"], c["method"])] = len(notes)

    lines = [
        "# Model-zoo conformance matrix",
        "",
        "<!-- generated by benchmarks/coverage.py: do not edit by hand, rerun it -->",
        head,
        "",
        "Every zoo model (tests/zoo/models.py: Hugging Face architectures from tiny configs with random weights, "
        "timm models with `pretrained=False`, a CNN whose convolutions are Conv2d subclasses padding in their own "
        "forward, the awkward nets of tests/conftest.py) through every method with default settings "
        "(tests/zoo/conformance.py). A cell is ✅ when the method runs, the share of eligible weights it "
        f"transformed is at least {100 * SHARE_TARGET:.0f} % (for {', '.join(TARGETED)}; the structural methods "
        "report it), every layer left alone carries a reason, the library's coverage record agrees with the "
        "independent count, `st.save` -> `st.load(dir, model=<fresh base>)` gives bit-identical outputs, and "
        "the ONNX export runs in ONNX Runtime within the method's tolerance. Otherwise ❌ and a note says why; "
        "⏳: everything else holds but the run's time budget ran out before this cell's ONNX export (each "
        "export takes seconds; they run after every other check, spread over models and methods).",
        "",
        "- **share**: weights transformed / eligible weights, from the library's own coverage record of the "
        "stage (`shrinktunnel.core.coverage.stage_coverage`: every weight layer, plus weight holders no method "
        "reaches, such as an LSTM, each with its reason). Cross-checked by an independent count here (the "
        "`weight` of every Linear, Conv1d/2d/3d, ConvTranspose, Embedding, Hugging Face `Conv1D`; "
        "`in_proj_weight` of `nn.MultiheadAttention`; a layer is transformed when it was replaced or wrapped, or "
        "its weight changed shape or dtype), which must agree over the layers both count. fuse_ops bn keeps no "
        "record: BatchNorm channels folded / BatchNorm channels, counted here (n/a: the model has none).",
        "- **ONNX tolerance**: largest |ONNX Runtime - PyTorch| over the largest |output| (at least 1): "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ".",
        "- **settings**: quantize `QuantConfig()` (int8 per-channel weights, static uint8 activations, min-max, "
        "4 calibration batches) and `activations: {dynamic: true}`; cast `float16`; prune `sparsity: 0.5`; "
        "cluster `ClusterConfig()` (5 bits); decompose `DecomposeConfig(keep_if_slower=False)` (ratio 0.5; tiny "
        "layers would otherwise all stay whole as slower, which says nothing about reach); prune_channels "
        "`ratio: 0.3`; fuse_ops `{bn: true, linear: never}`; qat `steps: 2, loss: mse_to_float`.",
        "",
        f"**{green} of {len(cells)} cells green{waiting}.**",
        "",
        "## Matrix",
        "",
        "| model | source | " + " | ".join(METHOD_TITLES.get(x, x) for x in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for model in models:
        row = [f"`{model}`", zoo[model]["source"]]
        for method in methods:
            c = by.get((model, method))
            row.append(_cell_text(c, note_of.get((model, method))) if c else "")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Why a cell is not green", ""]
    lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)] or ["Every cell is green."]

    lines += ["", "## Per method", "",
              "| method | green | runs | share >= target | round trip exact | ONNX Runtime matches | median time |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        cs = [c for c in cells if c["method"] == method]
        times = sorted(c["seconds"] for c in cs if c["seconds"] is not None)
        med = f"{times[len(times) // 2]:.2f} s" if times else "-"
        share_ok = sum(1 for c in cs if c["runs"] and (c["share"] is None or c["share"] >= SHARE_TARGET))
        lines.append(f"| {METHOD_TITLES.get(method, method)} | {sum(c['green'] for c in cs)} / {len(cs)} | "
                     f"{sum(c['runs'] for c in cs)} | {share_ok} | {sum(bool(c['roundtrip']) for c in cs)} | "
                     f"{sum(bool(c['onnx']) for c in cs)} | {med} |")

    lines += ["", "## Every cell", "",
              "`share`: the library's own coverage record of the stage (`shrinktunnel.core.coverage.stage_coverage`) "
              "where it keeps one, else this script's count; `independent count`: this script's count over the "
              "weights of Linear / Conv / ConvTranspose / Embedding / HF Conv1D / MultiheadAttention layers, which "
              "must agree with the record over the layers both count (weight holders only the record counts, such "
              "as an LSTM or Swin's relative position bias table, are listed with the record's reason).", ""]
    for model in models:
        z = zoo[model]
        lines += [f"### `{model}`", "", f"{z['source']}, {z['family']}, {z['params']:,} parameters"
                  + (f"; {z['note'].rstrip('.')}" if z["note"] else "") + ".", "",
                  "| method | runs | share (weights) | independent count | round trip | ONNX max abs diff | time | layers left alone |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in methods:
            c = by.get((model, method))
            if c is None:
                continue
            if not c["runs"]:
                lines.append(f"| {method} | ❌ {_short(c['error'], 300)} | | | | | | |")
                continue
            share = "n/a" if c["share"] is None else f"{_pct(c['share'])} ({c['done']:,} / {c['eligible']:,})"
            rec = "-" if not c.get("own") else _pct(c["own"]["share"])
            rt = "✅ exact" if c["roundtrip"] else f"❌ {_short(c['roundtrip_error'] or '', 200)}"
            if c["onnx"]:
                ox = f"✅ {c['onnx_max_abs']:.2g}"
            elif c["onnx"] is None:
                ox = "⏳ not checked (time budget)"
            elif "_Timeout: took longer than" in (c["onnx_error"] or ""):
                ox = f"⏳ the export outran the cell's time limit ({_short(c['onnx_error'], 160)})"
            else:
                ox = f"❌ {_short(c['onnx_error'] or '', 200)}"
            left = "<br>".join(_reasons(c)) or "none"
            lines.append(f"| {method} | ✅ | {share} | {rec} | {rt} | {ox} | {c['seconds']:.2f} s | {left} |")
        lines.append("")

    summary = [
        f"Generated {info['date']}; {head.split(' on ', 1)[1]}",
        "",
        f"**{green} of {len(cells)} cells green**{waiting} over {len(models)} models x {len(methods)} methods; the whole "
        "matrix with the reason for every cell that is not green is in [docs/coverage.md](coverage.md).",
        "",
        "| method | green | runs | round trip exact | ONNX Runtime matches |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in methods:
        cs = [c for c in cells if c["method"] == method]
        summary.append(f"| {METHOD_TITLES.get(method, method)} | {sum(c['green'] for c in cs)} / {len(cs)} | "
                       f"{sum(c['runs'] for c in cs)} | {sum(bool(c['roundtrip']) for c in cs)} | "
                       f"{sum(bool(c['onnx']) for c in cs)} |")
    return "\n".join(lines) + "\n", "\n".join(summary) + "\n"


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated zoo names (default: every model)")
    ap.add_argument("--methods", help="comma-separated methods (default: every method)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export check (faster)")
    ap.add_argument("--onnx-only", action="store_true", help="only the cells whose ONNX check the --budget reaches, "
                    "each run whole (for a locked run whose other cells come from a --no-onnx run; merge with --render)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds allowed per cell (a tiny model that takes "
                    "longer has met something pathological: the cell says where it stopped)")
    ap.add_argument("--doc", default=str(DOC), help="where the matrix goes (default docs/coverage.md)")
    ap.add_argument("--json", default=str(RESULTS_DIR / "coverage.json"), help="where every cell goes")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes, each with its share of the models "
                    "(default 2: the export step is single-threaded, so two workers halve the time on 2 cores)")
    ap.add_argument("--budget", type=float, default=None, help="minutes: ONNX checks not started by then are "
                    "recorded as not checked (the matrix is written in time whatever the machine's load)")
    ap.add_argument("--render", metavar="JSON[,JSON...]", help="write the docs from the results JSON of earlier "
                    "runs, without running anything; several (runs of model groups, each short enough for the "
                    "benchmark lock) are merged, a later file's cell replacing an earlier one's, and the merged "
                    "cells go to --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: write this worker's cells to this JSON file
    args = ap.parse_args(argv)

    if args.render:
        return _render(args)

    import warnings

    import torch

    from zoo.conformance import METHODS
    from zoo.models import ZOO

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1 if args.worker else THREADS)  # workers: one thread each, two workers on 2 cores
    models = args.models.split(",") if args.models else list(ZOO)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    for n in models:
        if n not in ZOO:
            ap.error(f"unknown model {n!r}; the zoo has {', '.join(ZOO)}")
    for n in methods:
        if n not in METHODS:
            ap.error(f"unknown method {n!r}; choose from {', '.join(METHODS)}")

    started = time.perf_counter()
    if args.worker is None and args.jobs > 1 and len(models) > 1:
        cells, zoo = _in_workers(args, models, methods)
    else:
        cells, zoo = _run(args, models, methods)
    if args.worker is not None:
        write_text_atomic(Path(args.worker), json.dumps(_finite({"cells": cells, "zoo": zoo}), allow_nan=False))
        return 0

    seconds = time.perf_counter() - started
    info = {"date": today(), "machine": machine_info(THREADS), "versions": _versions(), "git": git_state(),
            "command": COMMAND, "seconds": seconds}
    doc, summary = markdown(cells, zoo, methods, info, seconds)
    whole = not args.models and not args.methods and not args.no_onnx
    json_path = Path(args.json)
    if whole or args.doc != str(DOC):
        write_text_atomic(Path(args.doc), doc)
    else:
        partial = Path(os.environ.get("TMPDIR", "/tmp")) / "coverage_partial.md"
        write_text_atomic(partial, doc)
        print(f"a partial run: {args.doc} left as it is; this run's matrix is in {partial} (--doc PATH writes it there)")
    if whole or args.json != str(RESULTS_DIR / "coverage.json"):
        counts = Counter("green" if c["green"] else "not green" for c in cells)
        write_results(json_path, _finite({**info, "zoo": zoo, "cells": cells, "counts": dict(counts),
                                  "checks": {"every_cell_green": counts.get("not green", 0) == 0}}), summary)
    green = sum(c["green"] for c in cells)
    print(f"{green} of {len(cells)} cells green in {seconds / 60:.1f} min")
    return 0 if green == len(cells) else 1



def _merge(paths: list[Path]) -> dict[str, Any]:
    """The runs' results as one: cells by (model, method), a later run's replacing an earlier one's, in the
    zoo's order; the latest run's date, machine and commit; the runs' times summed."""
    from zoo.conformance import METHODS
    from zoo.models import ZOO

    runs = [json.loads(p.read_text()) for p in paths]
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    zoo: dict[str, Any] = {}
    for run in runs:
        cells.update({(c["model"], c["method"]): c for c in run["cells"]})
        zoo.update(run["zoo"])
    order = {n: i for i, n in enumerate(ZOO)}
    rank = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(cells.values(), key=lambda c: (order.get(c["model"], len(order)), rank.get(c["method"], len(rank))))
    info = {k: runs[-1][k] for k in ("date", "machine", "versions", "git", "command")}
    info["seconds"] = sum(r["seconds"] for r in runs)
    if len(runs) > 1:
        info["command"] = f"{COMMAND} --models <group> (in {len(runs)} runs), then --render"
        onnx = sum(1 for c in merged if c.get("onnx") is not None)
        info["note"] = (f"Merged from {len(runs)} runs (dates {', '.join(sorted({r['date'] for r in runs}))}): a run of every "
                        f"cell without its ONNX check, then ONNX checks in runs under the machine's benchmark lock, as far "
                        f"as the lock and their time budget allowed ({onnx} of {len(merged)} cells checked in ONNX Runtime; "
                        "⏳ marks the rest).")
    return {**info, "zoo": {n: zoo[n] for n in sorted(zoo, key=lambda n: order.get(n, len(order)))}, "cells": merged}


def _render(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.render.split(",")]
    saved = _merge(paths)
    cells, zoo = saved["cells"], saved["zoo"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    doc, summary = markdown(cells, zoo, methods, saved, saved["seconds"])
    write_text_atomic(Path(args.doc), doc)
    if len(paths) > 1:
        counts = Counter("green" if c["green"] else "not green" for c in cells)
        write_results(Path(args.json), _finite({**saved, "counts": dict(counts),
                                                "checks": {"every_cell_green": counts.get("not green", 0) == 0}}), summary)
        print(f"wrote {args.doc}, {args.json} and {Path(args.json).with_suffix('.md')} from {len(paths)} runs")
    else:
        write_text_atomic(paths[0].with_suffix(".md"), summary)
        print(f"wrote {args.doc} and {paths[0].with_suffix('.md')} from {paths[0]}")
    return 0


def _finite(obj: Any) -> Any:
    """JSON without NaN / inf: a difference that is not finite is written as null (the cell says why)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _in_workers(args: argparse.Namespace, models: list[str], methods: list[str]) -> tuple[list, dict]:
    """Split the models over `args.jobs` processes of this script (round robin, so that the large timm
    models spread), then gather their cells in the zoo's order."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(args.jobs):
            share = models[i:: args.jobs]
            if not share:
                continue
            out = Path(tmp) / f"worker{i}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--models", ",".join(share), "--methods",
                   ",".join(methods), "--timeout", str(args.timeout), "--worker", str(out)]
            if args.budget is not None:
                cmd += ["--budget", str(args.budget)]
            if args.no_onnx:
                cmd.append("--no-onnx")
            if args.onnx_only:
                cmd.append("--onnx-only")
            procs.append((subprocess.Popen(cmd, cwd=REPO), out, share))
        cells, zoo = [], {}
        for proc, out, share in procs:
            code = proc.wait()
            if code != 0 or not out.is_file():
                raise SystemExit(f"a worker ({', '.join(share)}) ended with exit code {code}")
            got = json.loads(out.read_text())
            cells += got["cells"]
            zoo.update(got["zoo"])
    order = {n: i for i, n in enumerate(models)}
    cells.sort(key=lambda c: (order[c["model"]], methods.index(c["method"])))
    return cells, {n: zoo[n] for n in models}


def _run(args: argparse.Namespace, models: list[str], methods: list[str]) -> tuple[list, dict]:
    """Two passes. First every cell without its ONNX check (method, share, round trip: a fraction of a
    second each). Then the ONNX export of each cell (seconds each: torch.export dominates): the int8
    models of every architecture first, then the other methods spread over the models (model i takes
    method i + k in round k), until the budget runs out; a cell not reached says so."""
    from zoo.conformance import run_cell
    from zoo.models import ZOO, build

    stop = time.monotonic() + 60 * args.budget if args.budget is not None else None
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    zoo: dict[str, Any] = {}
    bases = {}
    for name in models:
        bases[name] = base = build(name)
        z = ZOO[name]
        zoo[name] = {"source": z.source, "family": z.family, "note": z.note,
                     "params": sum(p.numel() for p in base.parameters())}
        for method in methods:
            if args.onnx_only:
                break
            t0 = time.perf_counter()
            cell = run_cell(name, method, onnx=False, timeout=args.timeout, base=base).to_dict()
            cells[(name, method)] = cell
            print(f"{name:24s} {method:17s} {time.perf_counter() - t0:6.1f} s  "
                  f"{'; '.join(p for p in cell['problems'] if p != 'ONNX not checked')[:160] or 'ok'}", flush=True)
    if not args.no_onnx:
        # The int8 models first (issue 15: the int8 model of every zoo architecture exports and runs in ONNX
        # Runtime), then the other methods spread over the models.
        first = [m for m in ("quantize_w8a8", "quantize_dynamic") if m in methods]
        rest = [m for m in methods if m not in first]
        order = [(name, m) for m in first for name in models]
        order += [(models[i], rest[(i + k) % len(rest)]) for k in range(len(rest)) for i in range(len(models))] if rest else []
        for name, method in order:
            if not args.onnx_only and not cells[(name, method)]["runs"]:
                continue  # nothing to export
            if stop is not None and time.monotonic() > stop:
                if not args.onnx_only:
                    cells[(name, method)]["onnx_error"] = f"not checked: the run's time budget ({args.budget:g} min) ran out first"
                continue
            t0 = time.perf_counter()
            cell = run_cell(name, method, onnx=True, timeout=3 * args.timeout, base=bases[name]).to_dict()
            cells[(name, method)] = cell
            status = "green" if cell["green"] else "; ".join(cell["problems"])[:160]
            print(f"{name:24s} {method:17s} {time.perf_counter() - t0:6.1f} s  ONNX: {status}", flush=True)
    return [cells[(n, m)] for n in models for m in methods if (n, m) in cells], zoo


if __name__ == "__main__":
    sys.exit(main())

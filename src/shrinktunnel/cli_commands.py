"""Bodies of the CLI verbs, kept apart from argument parsing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console

from .api import compress, load
from .core import data as D
from .compare import Variant, compare_variants, variants_table
from .core.artifact import check_output_dir, read_manifest
from .core.atomic import atomic_dir
from .core.history import example_inputs, get_record
from .core.refs import load_data, load_model
from .errors import ExportError
from .export import export_onnx
from .measure import accuracy, artifact_bytes
from .report import Table, fmt_bytes, fmt_pct, write_reports


def run_compress(model_ref, recipe, data_ref, out, eval_ref, batch_size, force, console: Console) -> None:
    from .core.recipe import load_recipe

    out = check_output_dir(out, overwrite=force)  # fail before any work, never after
    stages = load_recipe(Path(recipe) if not Path(recipe).suffix == "" else recipe)
    model = load_model(model_ref)
    data = load_data(data_ref, batch_size)
    eval_data = load_data(eval_ref, batch_size) if eval_ref else None
    eval_fn = (lambda m: accuracy(m, eval_data)) if eval_data is not None else None
    result = compress(model, [(s.method, s.config) for s in stages], data=data, eval_fn=eval_fn)
    with atomic_dir(out) as tmp:
        result.save(tmp)
        table = _before_after(result.metrics)
        write_reports(tmp, f"shrink compress {model_ref}", {**result.manifest, "model_reference": model_ref, "recipe": recipe}, [table])
    console.print(table.to_rich())
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"artifact written to [bold]{out.resolve()}[/]")


def _before_after(metrics: dict) -> Table:
    b, a = metrics["before"], metrics["after"]
    table = Table("before / after", ["", "original", "compressed", "ratio"])
    table.add("size on disk", fmt_bytes(b["bytes"]), fmt_bytes(a["bytes"]), f"{a['bytes'] / b['bytes']:.3f}")
    table.add("bits per weight", f"{b['bits_per_weight']:.2f}", f"{a['bits_per_weight']:.2f}", "")
    table.add("weights", f"{b['weights']:,}", f"{a['weights']:,}", "")
    if "macs" in b:
        table.add("MACs per sample", f"{b['macs']:,}", f"{a['macs']:,}", f"{a['macs'] / max(b['macs'], 1):.3f}")
    if "metric" in b:
        table.add("accuracy", fmt_pct(b["metric"]), fmt_pct(a["metric"]), f"{100 * (a['metric'] - b['metric']):+.2f} pt")
    return table


def run_inspect(path: Path, console: Console) -> None:
    manifest = read_manifest(path)
    console.print(f"[bold]{path}[/]: shrinktunnel artifact v{manifest['format_version']}, "
                  f"written by shrinktunnel {manifest['toolkit']['version']} on {manifest.get('created', '?')}")
    console.print(f"model: {manifest['model'].get('class')} (rebuilt from {manifest['model'].get('ref') or 'a model you pass'})")
    total = artifact_bytes(path)
    console.print(f"size on disk: {fmt_bytes(total)} ({total:,} bytes)")
    for i, stage in enumerate(manifest["stages"]):
        console.print(f"stage {i}: [bold]{stage['method']}[/] {json.dumps(stage['config'])}", highlight=False)
        layers = stage.get("replay", {}).get("layers", {})
        if layers:
            t = Table(f"stage {i}: quantized layers", ["layer", "kind", "weight", "input (scale, zp)", "output (scale, zp)"])
            for name, spec in layers.items():
                q = lambda s: "float" if not s else f"{s['scale']:.4g}, {s['zero_point']} {s['dtype']}"  # noqa: E731
                relu = " +relu" if spec.get("activation") else ""
                t.add(name, spec["kind"] + relu, "x".join(map(str, spec["weight_shape"])) + " " + spec["weight"]["dtype"],
                      q(spec.get("input")), q(spec.get("output")))
            console.print(t.to_rich())
    for w in manifest.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    if manifest.get("metrics"):
        console.print(_before_after(manifest["metrics"]).to_rich())


def run_export(path: Path, onnx: Path, console: Console) -> None:
    model = load(path)
    example = example_inputs(get_record(model).get("inputs"))
    if example is None:
        raise ExportError(f"artifact {str(path)!r} records no input signature; export from Python with st.export_onnx(model, path, example_inputs=...)")
    export_onnx(model, onnx, example)
    console.print(f"ONNX written to [bold]{onnx.resolve()}[/] ({fmt_bytes(onnx.stat().st_size)})")


def run_eval(path: Path, data_ref: str, batch_size: int, threads: int, console: Console) -> None:
    model = load(path)
    data = D.reiterable(load_data(data_ref, batch_size))
    D.check_model_runs(model, data)  # a readable error before the exporter fails on the same shapes
    with tempfile.TemporaryDirectory() as d:
        v = Variant(path.name or "artifact", model, artifact_bytes(path))
        compare_variants([v], data, Path(d), threads=threads)
    console.print(variants_table([v], f"{path}", threads).to_rich())


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "shrinktunnel" / "analyze"


def run_analyze(model_ref, data_ref, out, eval_ref, actions, layers, cache_dir, no_cache, batch_size, threads,
                console: Console) -> None:
    from .search import analyze

    model = load_model(model_ref)
    data = load_data(data_ref, batch_size)
    eval_data = D.reiterable(load_data(eval_ref, batch_size)) if eval_ref else None
    eval_fn = (lambda m: accuracy(m, eval_data)) if eval_data is not None else None
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    result = analyze(model, data, eval_fn=eval_fn, actions=split(actions), layers=split(layers) or ("*",),
                     cache_dir=None if no_cache else (cache_dir or default_cache_dir()), threads=threads)
    jpath, hpath = result.save(out, title=f"shrink analyze {model_ref}")
    console.print(result.table().to_rich())
    for note in result.skipped_actions + result.warnings:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"{result.cache['evaluated']} evaluations run, {result.cache['hits']} read from the cache"
                  + (f" ({result.cache['dir']})" if result.cache.get("dir") else ""))
    console.print(f"written: [bold]{jpath.resolve()}[/] and [bold]{hpath.resolve()}[/]")


def parse_drop(text: str) -> float:
    """'0.01' -> 0.01; '0.5%' or '0.5pt' -> 0.005 (points of a metric in [0, 1])."""
    from .errors import ConfigError

    t = text.strip().lower()
    scale = 1.0
    for suffix in ("%", "pt"):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)].strip(), 0.01
    try:
        value = float(t) * scale
    except ValueError:
        raise ConfigError(f"--max-drop {text!r} is not a number; write e.g. 0.01, 1% or 0.5pt") from None
    return value


def run_auto(model_ref, data_ref, max_drop, objective, out, eval_ref, actions, max_evaluations, cache_dir, batch_size,
             force, console: Console, *, verify_ref=None, margin=0.0, train_ref=None, workers=1, seed=0) -> None:
    from .search import auto

    drop = parse_drop(max_drop)
    out = check_output_dir(out, overwrite=force)
    model = load_model(model_ref)
    data = load_data(data_ref, batch_size)
    eval_data = D.reiterable(load_data(eval_ref, batch_size)) if eval_ref else None
    eval_fn = (lambda m: accuracy(m, eval_data)) if eval_data is not None else None
    names = [x.strip() for x in actions.split(",") if x.strip()] if actions else None
    verify = D.reiterable(load_data(verify_ref, batch_size)) if verify_ref else None
    verify_fn = (lambda m: accuracy(m, verify)) if verify is not None and eval_fn is not None else None
    train = load_data(train_ref, batch_size) if train_ref else None
    result = auto(model, data, max_drop=drop, objective=objective, eval_fn=eval_fn, actions=names,
                  cache_dir=cache_dir or default_cache_dir(), max_evaluations=max_evaluations,
                  verify_fn=verify_fn, verify_data=verify if verify_fn is None else None, margin=margin,
                  recovery={} if train is not None else None, train_data=train, workers=workers, seed=seed)
    with atomic_dir(out) as tmp:
        result.save(tmp)
    console.print(result.analysis.table().to_rich())
    style = "green" if result.fits else "bold red"
    console.print(f"[{style}]{result.message}[/]", highlight=False)
    console.print(f"written: [bold]{out.resolve()}[/] (auto.json, auto.html beside the artifact)")

"""Bodies of the CLI verbs, kept apart from argument parsing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.console import Console

from .api import compress, load
from .core import data as D
from .compare import Variant, compare_variants, variants_table
from .core.artifact import check_output_dir, read_manifest, verify_tensors
from .core.atomic import atomic_dir
from .core.history import example_inputs, get_record
from .core.refs import load_data, load_model
from .errors import ArtifactError, DataError, ExportError, UntrustedCodeError, one_line
from .export import export_onnx
from .measure import accuracy, artifact_bytes
from .report import Table, fmt_bytes, fmt_pct, write_reports
from .report.tables import print_fitted
from .core.coverage import coverage_lines

EXIT_NO_CANDIDATE = 3  # `shrink auto`: nothing met the budget (docs/cli.md)


# -- checks made before any work ------------------------------------------------------------------

def check_writable(target: Path, what: str = "--out") -> None:
    """Fail now, not after the work, when `target` cannot be written: its nearest existing ancestor
    must be a directory in which a new directory can be made (tried, then removed)."""
    import tempfile

    parent = Path(target).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{what} {str(target)!r} cannot be written: {str(parent)!r} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".shrink-probe-", dir=parent)
        Path(probe).rmdir()
    except OSError as exc:
        raise ArtifactError(f"{what} {str(target)!r} cannot be written ({exc.strerror} in {str(parent)!r}); "
                            "choose a writable place") from None


def open_model(ref: str, base_ref: str | None, trust: bool) -> object:
    """MODEL (a factory or an artifact directory), with --model / --trust-model-code passed on to the
    artifact's loading: no code an artifact names runs without them."""
    base = load_model(base_ref) if base_ref else None
    try:
        return load_model(ref, base=base, trust_code=trust)
    except UntrustedCodeError as exc:
        raise _untrusted(exc) from None


def open_artifact(path: Path, base_ref: str | None, trust: bool) -> object:
    base = load_model(base_ref) if base_ref else None
    try:
        return load(path, base, trust_code=trust)
    except UntrustedCodeError as exc:
        raise _untrusted(exc) from None


def _untrusted(exc: UntrustedCodeError) -> ArtifactError:
    where = str(exc).split(" names code", 1)[0]
    return ArtifactError(
        f"{where} names code to rebuild its model ({exc.ref[:200]!r}), and shrink runs no code an artifact names "
        f"without your consent: pass the original model with --model REF (e.g. --model {exc.ref[:200]}), or, if you "
        "trust whoever made the artifact, --trust-model-code"
    )


def check_data(model, data, what: str, *, labelled: bool | None = False, console: Console | None = None) -> None:
    """Run the model on the first batch of a data argument before any work starts (a wrong shape is one
    line now, not a traceback after calibration). `labelled` True: the batches must hold targets; None:
    they may. Targets must be class indices the outputs can be compared with; labels outside the
    model's classes are warned about."""
    try:
        inputs = D.check_model_runs(model, data)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None
    if labelled is False:
        return
    batch = next(D.batches(data))
    _, target = D.split(batch)
    if target is None and labelled is None:
        return
    if target is None:
        raise DataError(f"{what} has no labels: accuracy needs (inputs, target) batches (an .npz with 'y')")
    import torch

    with torch.no_grad():
        logits = D.first_tensor(D.forward(model, inputs))
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
        raise DataError(f"{what}: labels must be integer class indices, got {getattr(target, 'dtype', type(target).__name__)}")
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise DataError(f"{what}: labels of shape {tuple(target.shape)} do not match the model's outputs "
                        f"{tuple(logits.shape)} (one label per output row expected)")
    classes = logits.shape[-1]
    lo = hi = None
    for b in D.batches(data):
        _, y = D.split(b)
        if isinstance(y, torch.Tensor) and y.numel():
            lo = int(y.min()) if lo is None else min(lo, int(y.min()))
            hi = int(y.max()) if hi is None else max(hi, int(y.max()))
    if console is not None and lo is not None and (lo < 0 or hi >= classes):
        console.print(f"[yellow]warning:[/] {what}: labels span [{lo}, {hi}] but the model has {classes} classes "
                      f"(0 to {classes - 1}); samples with other labels always count as wrong", highlight=False)


def _model_and_data(model_ref, base_ref, trust, data_ref, eval_ref, batch_size, console: Console, text=None):
    """(model, data, eval_fn) of compress / analyze / auto, every data argument checked on its first batch
    before any work; eval_fn is accuracy on --eval-data, or None. `text`: .txt DATA options (hf_input)."""
    model = open_model(model_ref, base_ref, trust)
    from .core.hf_input import is_hf_model_dir

    text = dict(text or {}, tokenizer=model_ref if is_hf_model_dir(model_ref) else None)
    data = D.reiterable(load_data(data_ref, batch_size, text=text))
    check_data(model, data, "--data")
    eval_data = D.reiterable(load_data(eval_ref, batch_size)) if eval_ref else None
    if eval_data is not None:
        check_data(model, eval_data, "--eval-data", labelled=True, console=console)
    eval_fn = (lambda m: accuracy(m, eval_data)) if eval_data is not None else None
    return model, data, eval_fn


def perplexity_fn(model_dir: str, eval_text: str, seq_len: int, other=None):
    """`--eval-text`: eval_fn(model) -> perplexity (lower is better) on every window of the file, with
    lm-evaluation-harness's rolling windows (measure.perplexity; prefix: the end-of-text token)."""
    from .core.hf_input import is_hf_model_dir, load_tokenizer, read_text, token_windows
    from .measure.perplexity import perplexity

    if other is not None:
        raise DataError("--eval-text and --eval-data both give the metric; pass one of them")
    if not is_hf_model_dir(model_dir):
        raise DataError(f"--eval-text needs MODEL to be a Hugging Face model directory (for its tokenizer); got {model_dir!r}")
    tok = load_tokenizer(model_dir)
    windows = token_windows(tok, read_text(eval_text), seq_len)
    prefix = getattr(tok, "eos_token_id", None)
    return lambda m: perplexity(m, windows, prefix_token=prefix)


def run_compress(model_ref, recipe, data_ref, out, eval_ref, batch_size, force, console: Console, *,
                 base_ref=None, trust=False, text=None) -> None:
    from .core.recipe import load_recipe

    check_writable(out)
    out = check_output_dir(out, overwrite=force)  # fail before any work, never after
    stages = load_recipe(Path(recipe) if not Path(recipe).suffix == "" else recipe)
    model, data, eval_fn = _model_and_data(model_ref, base_ref, trust, data_ref, eval_ref, batch_size, console, text)
    if text and text.get("eval_text"):
        eval_fn = perplexity_fn(model_ref, text["eval_text"], text["seq_len"], eval_fn)
    result = compress(model, [(s.method, s.config) for s in stages], data=data, eval_fn=eval_fn)
    with atomic_dir(out) as tmp:
        result.save(tmp)
        table = _before_after(result.metrics)
        write_reports(tmp, f"shrink compress {model_ref}", {**result.manifest, "model_reference": model_ref, "recipe": recipe},
                      [table] if table is not None else [])
    if table is not None:
        console.print(table.to_rich())
    for line in coverage_lines(result.model):
        console.print(f"coverage: {line}", highlight=False, markup=False)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"artifact written to [bold]{out.resolve()}[/]")


def _before_after(metrics: dict) -> Table | None:
    """The before / after table, or None when the metrics lack what it shows (an edited manifest)."""
    b, a = metrics.get("before"), metrics.get("after")
    num = lambda d, k: isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)  # noqa: E731
    if not (isinstance(b, dict) and isinstance(a, dict)
            and all(num(d, k) for d in (a, b) for k in ("bytes", "bits_per_weight", "weights"))):
        return None
    ratio = lambda x, y: f"{x / y:.3f}" if y else "-"  # noqa: E731
    table = Table("before / after", ["", "original", "compressed", "ratio"])
    table.add("size on disk", fmt_bytes(b["bytes"]), fmt_bytes(a["bytes"]), ratio(a["bytes"], b["bytes"]))
    table.add("bits per weight", f"{b['bits_per_weight']:.2f}", f"{a['bits_per_weight']:.2f}", "")
    table.add("weights", f"{b['weights']:,}", f"{a['weights']:,}", "")
    if num(b, "macs") and num(a, "macs"):
        table.add("MACs per sample", f"{b['macs']:,}", f"{a['macs']:,}", ratio(a["macs"], max(b["macs"], 1)))
    if num(b, "metric") and num(a, "metric"):
        table.add("accuracy", fmt_pct(b["metric"]), fmt_pct(a["metric"]), f"{100 * (a['metric'] - b['metric']):+.2f} pt")
    return table


def _layer_rows(i: int, layers: dict) -> Table:
    def q(s):
        if not s:
            return "float"
        if s.get("format") == "binary":
            return f"binary {s['scale']:.4g}"
        return f"{s['scale']:.4g}, {s['zero_point']} {s['dtype']}"

    t = Table(f"stage {i}: quantized layers", ["layer", "kind", "weight", "input (scale, zp)", "output (scale, zp)"])
    for name, spec in layers.items():
        try:
            relu = " +relu" if spec.get("activation") else ""
            t.add(str(name), str(spec["kind"]) + relu, "x".join(map(str, spec["weight_shape"])) + " " + str(spec["weight"]["dtype"]),
                  q(spec.get("input")), q(spec.get("output")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"stage {i}: layer {str(name)[:80]!r} is not a valid quantized-layer spec "
                                f"({one_line(exc, 80)}); the artifact is corrupted or its manifest was edited") from None
    return t


def run_inspect(path: Path, console: Console) -> None:
    """Reads the manifest and checks the tensors file (size, header, sha256); rebuilds nothing and so
    runs no code."""
    manifest = read_manifest(path)
    checked = verify_tensors(path, manifest)
    toolkit = manifest.get("toolkit", {})
    console.print(f"[bold]{path}[/]: shrinktunnel artifact v{manifest['format_version']}, "
                  f"written by shrinktunnel {toolkit.get('version', '?')} on {manifest.get('created', '?')}", highlight=False)
    model = manifest["model"]
    how = model.get("ref") or ("its Hugging Face config" if model.get("transformers") else "a model you pass")
    console.print(f"model: {model.get('class', '?')} (rebuilt from {how})", highlight=False)
    sha = "sha256 verified" if checked["sha256_checked"] else "[yellow]no sha256 recorded: not verified[/]"
    console.print(f"tensors: {checked['file'].name}, {len(checked['header'])} tensors, {checked['bytes']:,} bytes, {sha}",
                  highlight=False)
    total = artifact_bytes(path)
    console.print(f"size on disk: {fmt_bytes(total)} ({total:,} bytes)")
    for i, stage in enumerate(manifest["stages"]):
        console.print(f"stage {i}: [bold]{stage['method']}[/] {json.dumps(stage['config'])}", highlight=False, markup=False)
        for line in coverage_lines([stage]):
            console.print(f"  coverage: {line}", highlight=False, markup=False)
        layers = stage["replay"].get("layers", {})
        if isinstance(layers, dict) and layers and stage["method"] in ("quantize", "qat"):
            console.print(_layer_rows(i, layers).to_rich())
    for w in manifest.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    table = _before_after(manifest.get("metrics", {}))
    if table is not None:
        console.print(table.to_rich())


def run_export(path: Path, outputs: dict[str, Path], console: Console, *, force=False, base_ref=None, trust=False) -> None:
    """outputs: {runtime: file} (ort / openvino / executorch, export/runtimes.py)."""
    from .export import runtimes

    if not outputs:
        raise ExportError("export needs an output: --onnx FILE, --openvino FILE.xml or --executorch FILE.pte")
    flags = {"ort": "--onnx", "openvino": "--openvino", "executorch": "--executorch"}
    for runtime, out in outputs.items():
        if out.exists() or out.is_symlink():
            if out.is_dir():
                raise ExportError(f"{flags[runtime]} {str(out)!r} is a directory; give the path of the file to write")
            if not force:
                raise ExportError(f"{flags[runtime]} {str(out)!r} already exists; pass --force to replace it")
        check_writable(out, flags[runtime])
        runtimes.require(runtime)  # a missing runtime package is named before the model is loaded
    model = open_artifact(path, base_ref, trust)
    example = example_inputs(get_record(model).get("inputs"))
    if example is None:
        raise ExportError(f"artifact {str(path)!r} records no input signature; export from Python with st.export_onnx(model, path, example_inputs=...)")
    for runtime, out in outputs.items():
        if runtime == "ort":
            export_onnx(model, out, example)
        else:
            runtimes.export(model, out, runtime, example)
        label = {"ort": "ONNX", "openvino": "OpenVINO IR", "executorch": "ExecuTorch program"}[runtime]
        console.print(f"{label} written to [bold]{out.resolve()}[/] ({fmt_bytes(out.stat().st_size)})")


def run_eval(path: Path, data_ref: str, batch_size: int, threads: int, console: Console, *, base_ref=None, trust=False,
             backend: str | None = None) -> None:
    model = open_artifact(path, base_ref, trust)
    data = D.reiterable(load_data(data_ref, batch_size))
    # a readable error before the exporter fails on the same shapes; unlabelled data: latency only
    check_data(model, data, "--data", labelled=None, console=console)
    with tempfile.TemporaryDirectory() as d:
        runs, onnx_path = model, None
        if backend is not None:  # PyTorch runs the lowered model; ONNX Runtime the artifact's own export
            from .api import compile as compile_int8

            runs = compile_int8(model, backend=backend)  # ConfigError naming what this torch lacks
            onnx_path = export_onnx(model, Path(d) / "artifact.onnx", next(D.batches(data)))
        v = Variant(path.name or "artifact", runs, artifact_bytes(path), onnx_path=onnx_path)
        compare_variants([v], data, Path(d), threads=threads)
        if backend is not None:  # the compiled wrapper holds frozen copies: count the artifact's own weights
            from .measure import count_weights

            v.figures["weights"] = count_weights(model)
    title = f"{path}" + (f" (PyTorch: st.compile, backend {backend})" if backend else "")
    console.print(variants_table([v], title, threads).to_rich())


def default_cache_dir() -> Path:
    import os

    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "shrinktunnel" / "analyze"


ANALYSIS_MARKER = "analysis.json"


def run_analyze(model_ref, data_ref, out, settings: dict, console: Console, *, eval_ref=None, actions=None,
                batch_size=64, force=False, base_ref=None, trust=False) -> None:
    """`settings`: AnalyzeConfig keys from the command line (`layers` as a comma-separated string;
    `cache_dir` None: the default cache, False: none)."""
    from .search import AnalyzeConfig, analyze

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    settings = dict(settings)
    settings["layers"] = split(settings.get("layers")) or ["*"]
    cache = settings.get("cache_dir")
    settings["cache_dir"] = None if cache is False else str(cache or default_cache_dir())
    cfg = AnalyzeConfig.parse(settings)  # bad settings fail before anything is loaded or written
    check_writable(out)
    out = check_output_dir(out, overwrite=force, marker=ANALYSIS_MARKER)  # like compress: never into someone's folder
    model, data, eval_fn = _model_and_data(model_ref, base_ref, trust, data_ref, eval_ref, batch_size, console)
    result = analyze(model, data, cfg, eval_fn=eval_fn, actions=split(actions))
    with atomic_dir(out) as tmp:
        result.save(tmp, title=f"shrink analyze {model_ref}")
    jpath, hpath = out / ANALYSIS_MARKER, out / "analysis.html"
    print_fitted(result.table(), console, full=hpath)
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


def run_auto(model_ref, data_ref, out, flags: dict, console: Console, *, config_path=None, eval_ref=None,
             actions=None, cache_dir=None, batch_size=64, force=False, verify_ref=None, train_ref=None,
             base_ref=None, trust=False) -> bool:
    """Returns whether the chosen model meets the budget (the CLI exits EXIT_NO_CANDIDATE when not).
    `flags`: AutoConfig keys given on the command line; they override the --config file's."""
    from .search import auto
    from .search.config import auto_config

    if actions:
        flags["actions"] = [x.strip() for x in actions.split(",") if x.strip()]
    cfg = auto_config(config_path, flags)  # checked before the model loads: a bad flag costs nothing
    if train_ref and cfg.recovery is None:
        cfg.recovery = {}
    if cfg.cache_dir is None:
        cfg.cache_dir = str(cache_dir or default_cache_dir())
    check_writable(out)
    out = check_output_dir(out, overwrite=force)
    model, data, eval_fn = _model_and_data(model_ref, base_ref, trust, data_ref, eval_ref, batch_size, console)
    verify = D.reiterable(load_data(verify_ref, batch_size)) if verify_ref else None
    if verify is not None:
        check_data(model, verify, "--verify-data", labelled=eval_fn is not None, console=console)
    verify_fn = (lambda m: accuracy(m, verify)) if verify is not None and eval_fn is not None else None
    train = D.reiterable(load_data(train_ref, batch_size)) if train_ref else None
    if train is not None:
        check_data(model, train, "--train-data")
    result = auto(model, data, cfg, eval_fn=eval_fn, verify_fn=verify_fn,
                  verify_data=verify if verify_fn is None else None, train_data=train)
    with atomic_dir(out) as tmp:
        result.save(tmp)
    print_fitted(result.analysis.table(), console, full=out / "auto.html")
    style = "green" if result.fits else "bold red"
    console.print(f"[{style}]{result.message}[/]", highlight=False)
    console.print(f"written: [bold]{out.resolve()}[/] (auto.json, auto.html beside the artifact)")
    return bool(result.fits)

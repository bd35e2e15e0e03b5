"""The `shrink` command line. Every ShrinkError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub

import typer
from rich.console import Console

from .errors import ShrinkError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="shrinktunnel: make trained PyTorch models smaller and faster, with measured results.",
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors.")) -> None:
    _debug["on"] = debug


# Consent to run code an artifact names (docs/artifact-format.md, "Rebuilding"): every verb that reads
# an artifact takes both.
_BASE_HELP = ("The original model, when the artifact's own reference is code ('pkg.mod:factory', 'file.py:factory'): "
              "builds the architecture instead of the code the artifact names (it overrides model.ref).")
_TRUST_HELP = ("Run the code the artifact's model.ref names to rebuild its architecture (like transformers' "
               "trust_remote_code): only for artifacts from someone you trust.")


def _base_opt():
    return typer.Option(None, "--model", help=_BASE_HELP)


def _trust_opt():
    return typer.Option(False, "--trust-model-code", help=_TRUST_HELP)


@app.command()
def demo(
    out: Path = typer.Option(Path("shrink-out/demo"), "--out", help="Output folder (replaced if it holds an earlier run)."),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads for every latency measurement."),
) -> None:
    """Quantize the built-in MNIST CNN to int8 and print a before/after table."""
    from .demo import run_demo

    run_demo(out, threads=threads, console=console)


@app.command()
def compress(
    model: str = typer.Argument(..., help="MODEL: 'package.module:factory', 'file.py:factory', an artifact directory or an .onnx file."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe YAML file."),
    data: str = typer.Option(..., "--data", "-d", help="Calibration DATA: 'pkg.mod:factory', 'file.py:factory', .npz or .safetensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled DATA to measure accuracy before and after."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Batch size for .npz / .safetensors data."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact at --out."),
    base: Optional[str] = _base_opt(),
    trust: bool = _trust_opt(),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Text DATA (.txt, MODEL a Hugging Face directory): tokens per window."),
    samples: int = typer.Option(128, "--samples", min=1, help="Text DATA: at most this many calibration windows."),
    eval_text: Optional[str] = typer.Option(None, "--eval-text", help="A .txt file: perplexity before and after (MODEL a Hugging Face directory)."),
) -> None:
    """Run a recipe on MODEL and write the artifact (plus report.json and report.md) to --out."""
    from .cli_commands import run_compress

    run_compress(model, recipe, data, out, eval_data, batch_size, force, console, base_ref=base, trust=trust,
                 text={"seq_len": seq_len, "samples": samples, "eval_text": eval_text})


@app.command()
def inspect(path: Path = typer.Argument(..., help="Artifact directory.")) -> None:
    """Show what an artifact holds: model, stages, layers, sizes and metrics; verifies the tensors
    file (size, header, sha256). Rebuilds nothing, so it runs no code."""
    from .cli_commands import run_inspect

    run_inspect(path, console)


@app.command("export")
def export_cmd(
    path: Path = typer.Argument(..., help="Artifact directory."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX file to write (fast in a default ONNX Runtime session)."),
    openvino: Optional[Path] = typer.Option(None, "--openvino", help="OpenVINO IR to write (.xml, with its .bin beside it)."),
    executorch: Optional[Path] = typer.Option(None, "--executorch", help="ExecuTorch program to write (.pte, XNNPACK)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    base: Optional[str] = _base_opt(),
    trust: bool = _trust_opt(),
) -> None:
    """Export an artifact to ONNX (QDQ where quantized, dynamic batch), OpenVINO IR or ExecuTorch (docs/runtimes.md)."""
    from .cli_commands import run_export

    outputs = {k: v for k, v in (("ort", onnx), ("openvino", openvino), ("executorch", executorch)) if v is not None}
    run_export(path, outputs, console, force=force, base_ref=base, trust=trust)


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="Artifact directory."),
    data: str = typer.Option(..., "--data", "-d", help="Labelled DATA to score on."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    threads: int = typer.Option(2, "--threads", min=1),
    backend: Optional[str] = typer.Option(None, "--backend", help="inductor: PyTorch runs real int8 kernels (st.compile) "
                                          "instead of the simulated layers"),
    base: Optional[str] = _base_opt(),
    trust: bool = _trust_opt(),
) -> None:
    """Accuracy and latency of an artifact, in PyTorch and in ONNX Runtime."""
    from .cli_commands import run_eval

    run_eval(path, data, batch_size, threads, console, base_ref=base, trust=trust, backend=backend)


@app.command()
def analyze(
    model: str = typer.Argument(..., help="MODEL: 'package.module:factory', 'file.py:factory', an artifact directory or an .onnx file."),
    data: str = typer.Option(..., "--data", "-d", help="DATA the model runs on (profiling, and fidelity without --eval-data)."),
    out: Path = typer.Option(Path("shrink-out/analyze"), "--out", "-o", help="Folder for analysis.json and analysis.html."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled DATA: the metric becomes accuracy on it."),
    actions: Optional[str] = typer.Option(None, "--actions", help="Comma-separated action names (default: every available one)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated glob patterns of the layers to analyze."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Evaluation cache (default: ~/.cache/shrinktunnel/analyze)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure everything again and keep nothing."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Batch size for .npz / .safetensors data."),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads for the latency measurement."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier analysis at --out."),
    base: Optional[str] = _base_opt(),
    trust: bool = _trust_opt(),
) -> None:
    """Per-layer size, MACs, latency share and sensitivity to each candidate action."""
    from .cli_commands import run_analyze

    settings = {"layers": layers, "cache_dir": False if no_cache else cache_dir, "threads": threads}
    run_analyze(model, data, out, settings, console, eval_ref=eval_data, actions=actions, batch_size=batch_size,
                force=force, base_ref=base, trust=trust)


@app.command("auto")
def auto_cmd(
    model: str = typer.Argument(..., help="MODEL: 'package.module:factory', 'file.py:factory', an artifact directory or an .onnx file."),
    data: str = typer.Option(..., "--data", "-d", help="DATA the model runs on (calibration, fidelity without --eval-data)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory (plus auto.json and auto.html)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of AutoConfig keys (docs/search.md); the flags below override it."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Largest metric drop allowed: a number in the metric's units, or '0.5%' / '0.5pt' (= 0.005)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="size | latency | macs (default size)"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Objective size / macs: only candidates at least this many times faster in ONNX Runtime."),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="Objective latency / macs: only candidates of at most this many bytes on disk."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled DATA: the metric becomes accuracy on it."),
    actions: Optional[str] = typer.Option(None, "--actions", help="Comma-separated action names (default: every available one)."),
    max_evaluations: Optional[int] = typer.Option(None, "--max-evaluations", min=1, help="Real candidate evaluations after the analysis (default 12)."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Wall time of the search after the analysis: '600', '90s', '10m', '1h'."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Evaluation cache (default: ~/.cache/shrinktunnel/analyze)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Batch size for .npz / .safetensors data."),
    verify_data: Optional[str] = typer.Option(None, "--verify-data", help="Held-out DATA the chosen model must also meet the budget on (labelled when --eval-data is)."),
    margin: Optional[float] = typer.Option(None, "--margin", min=0.0, help="Safety margin: candidates must fit max_drop - margin on the search data."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="DATA for recovery after every lossy action (distillation, centroid tuning, QAT); none: one shot."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Candidate evaluations side by side (default 1)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="process (local forks, default) | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join ('auto', 'ray://host:10001'); default: a local one."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every candidate (same seed, same result, serial or parallel)."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="Where candidates are timed and the chosen one checked: ort (default) | openvino | executorch."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact at --out."),
    base: Optional[str] = _base_opt(),
    trust: bool = _trust_opt(),
) -> None:
    """Choose an action per layer under --max-drop for the --objective; write the model and its report.
    Exit code 3 when no candidate meets the budget (the best one is still written, marked fits=false)."""
    from .cli_commands import EXIT_NO_CANDIDATE, parse_drop, run_auto

    flags = {"max_drop": None if max_drop is None else parse_drop(max_drop), "objective": objective,
             "min_speedup": min_speedup, "max_bytes": max_bytes, "max_evaluations": max_evaluations,
             "time_budget": time_budget, "margin": margin, "workers": workers, "backend": backend,
             "ray_address": ray_address, "seed": seed, "runtime": runtime}
    fits = run_auto(model, data, out, {k: v for k, v in flags.items() if v is not None}, console, config_path=config,
                    eval_ref=eval_data, actions=actions, cache_dir=cache_dir, batch_size=batch_size, force=force,
                    verify_ref=verify_data, train_ref=train_data, base_ref=base, trust=trust)
    if not fits:
        err_console.print(f"shrink auto: no candidate meets the budget; the best one found is at "
                          f"{out} (fits=false); exit code {EXIT_NO_CANDIDATE}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(EXIT_NO_CANDIDATE)


def main(argv: list[str] | None = None) -> None:
    try:
        # Standalone mode: usage errors print as usual and exit 2; our errors arrive here.
        app(args=argv, prog_name="shrink")
    except ShrinkError as exc:
        if _debug["on"]:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(2)

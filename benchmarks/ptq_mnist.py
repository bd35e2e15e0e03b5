"""Benchmark: W8A8 post-training quantization of the MNIST CNN, next to fp32 and next to ONNX
Runtime's own static quantizer, every contender measured in the same run.

    .venv/bin/python benchmarks/ptq_mnist.py     # this benchmark alone
    .venv/bin/python benchmarks/run_all.py       # every benchmark, then docs/benchmarks.md rewritten

Prints the tables, writes benchmarks/results/ptq_mnist.json (every figure, the machine, pass / fail of
each target) and ptq_mnist.md (the tables), and exits with 1 when a target fails; the results are
written either way.
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

import shrinktunnel as st
from shrinktunnel import assets
from shrinktunnel.export import OrtModel, ort_session
from shrinktunnel.measure import accuracy, artifact_bytes, float_safetensors_bytes
from shrinktunnel.measure.latency import LatencyStats, interleaved, onnx_latency, torch_latency
from shrinktunnel.report import Table, fmt_bytes, fmt_ms, fmt_pct

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: _common sits beside it
from _common import COMMAND, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "ptq_mnist"
THREADS = 2  # intra-op threads of PyTorch and of every ONNX Runtime session
BATCH = 64  # latency batch: the first 64 test images
ROUNDS = 9  # alternated rounds: the machine has slow spells, so no contender is timed in one block;
            # odd, so that the median of the per-round ratios is one round's ratio
RUNS = 50  # timed runs per contender per round (the round's figure is their median)
WARMUP = 5

# The targets of the spine issue. Accuracy differences are in percentage points (pt).
MAX_DROP_PT = 0.2  # fp32 accuracy minus ours, in PyTorch and in ONNX Runtime
MAX_SIM_VS_ONNX_PT = 0.1  # our simulation must predict what ONNX Runtime computes
MAX_ARTIFACT_RATIO = 0.27  # artifact bytes / fp32 safetensors bytes
MAX_LATENCY_VS_ORT = 1.05  # our int8 ONNX latency / ORT quantize_static's, median of per-round ratios

# ONNX Runtime's quantizer, configured as the closest match to our default QuantConfig. The same dict
# is passed to quantize_static and recorded in the results, so the two can never disagree.
ORT_QUANTIZE = {
    "quant_format": QuantFormat.QDQ,
    "per_channel": True,
    "activation_type": QuantType.QUInt8,
    "weight_type": QuantType.QInt8,
    "calibrate_method": CalibrationMethod.MinMax,
}

LABELS = {"fp32": "fp32", "ours": "shrinktunnel W8A8", "ort": "ORT quantize_static",
          "ours_dynamic": "shrinktunnel dynamic", "ort_dynamic": "ORT quantize_dynamic"}
# Ours with dynamic activations, against ORT's quantize_dynamic: the Linears take int8 inputs quantized at
# run time; the convolutions keep float activations with int8 weights (quantize warns: dynamic
# activations are for Linears; ONNX Runtime's ConvInteger, which theirs uses, is slower than float here).
DYNAMIC = {"activations": {"dynamic": True, "per_token": False}}


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


# -- the models ----------------------------------------------------------------------------------

def quantize_ours(model: nn.Module, calib: list, workdir: Path) -> tuple[nn.Module, Path]:
    """Our W8A8 PTQ with the default config, saved as an artifact and loaded back: the model measured
    is the one the artifact holds, so its size and its accuracy describe the same thing."""
    quantized = st.quantize(model, st.QuantConfig(), data=calib, progress=False)
    artifact = st.save(quantized, workdir / "artifact")
    return st.load(artifact), artifact


class _CalibrationImages(CalibrationDataReader):
    """Hands ONNX Runtime's calibrator the very batches our quantizer saw."""

    def __init__(self, input_name: str, data: list) -> None:
        self._feeds = iter([{input_name: x.numpy()} for x, _ in data])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _input_name(path: Path) -> str:
    graph = onnx.load(str(path)).graph
    initializers = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def quantize_with_ort(fp32_onnx: Path, calib: list, workdir: Path) -> Path:
    """ONNX Runtime's own static quantizer on our fp32 export, after its recommended pre-processing."""
    preprocessed, quantized = workdir / "fp32_preprocessed.onnx", workdir / "ort_int8.onnx"
    scratch = workdir / "ort_scratch"
    scratch.mkdir()
    # quant_pre_process leaves large temporary models in the current directory: give it a throwaway one.
    with contextlib.chdir(scratch):
        quant_pre_process(str(fp32_onnx), str(preprocessed))
        quantize_static(str(preprocessed), str(quantized), _CalibrationImages(_input_name(preprocessed), calib),
                        **ORT_QUANTIZE)
        # Its dynamic quantizer too, with its defaults (int8 weights; Conv as ConvInteger, Gemm/MatMul as
        # MatMulInteger with activations quantized at run time): the same pre-processed graph.
        quantize_dynamic(str(preprocessed), str(workdir / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
    return quantized


def optimized_ops(path: Path, workdir: Path) -> list[str]:
    """Node types of the graph ONNX Runtime actually runs (after QDQ fusion): when the two int8 models
    differ in latency, this shows whether they differ in kernels."""
    optimized = workdir / f"{path.stem}.optimized.onnx"
    ort_session(path, threads=THREADS, optimized_model_path=optimized)
    return [node.op_type for node in onnx.load(str(optimized)).graph.node]


# -- measurement --------------------------------------------------------------------------------

def measure_accuracy(torch_models: dict[str, nn.Module], runtimes: dict[str, OrtModel], test: list) -> dict[str, float]:
    figures = {f"{name}_torch": accuracy(model, test) for name, model in torch_models.items()}
    figures.update({f"{name}_onnx": accuracy(runtime, test) for name, runtime in runtimes.items()})
    return figures


def alternated_rounds(contenders: dict[str, Callable[[], LatencyStats]], rounds: int) -> dict[str, list[LatencyStats]]:
    """Every contender once per round, `rounds` times; returns each contender's stats of every round.

    interleaved(rounds=1) is one alternated round: we keep every round, not only the best, for the
    per-round ratios. Odd rounds run in reverse order, so that no contender always runs first (right
    after a warm cache or a quiet spell) and the middle one always runs next to both others."""
    per_round: dict[str, list[LatencyStats]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name, stats in interleaved({n: contenders[n] for n in order}, rounds=1).items():
            per_round[name].append(stats)
    return per_round


def measure_latency(
    torch_models: dict[str, nn.Module], runtimes: dict[str, OrtModel], x: torch.Tensor, rounds: int, runs: int
) -> dict[str, list[LatencyStats]]:
    """ONNX Runtime contenders in their own rounds, then PyTorch eager ones in theirs: an eager run takes
    several times longer, and inside the same rounds it would put seconds between the ONNX Runtime
    contenders that the targets compare. `runtimes` is ordered so that ours runs next to both others."""
    onnx_contenders = {  # runtime.session is shrinktunnel.export.ort_session(path, threads=THREADS)
        f"{name}/onnx": lambda s=rt.session, f=rt.feed(x): onnx_latency(s, f, warmup=WARMUP, runs=runs)
        for name, rt in runtimes.items()
    }
    torch_contenders = {
        f"{name}/torch": lambda m=model: torch_latency(m, ((x,), {}), threads=THREADS, warmup=WARMUP, runs=runs)
        for name, model in torch_models.items()
    }
    return {**alternated_rounds(onnx_contenders, rounds), **alternated_rounds(torch_contenders, rounds)}


def latency_summary(rounds: list[LatencyStats]) -> dict[str, Any]:
    best = min(rounds, key=lambda s: s.median_ms)
    return {
        "best_median_ms": best.median_ms,  # the round least disturbed by the machine's slow spells
        "best_p90_ms": best.p90_ms,
        "round_medians_ms": [s.median_ms for s in rounds],
        "runs_per_round": best.runs,
        "batch": best.batch,
        "threads": best.threads,
    }


def latency_ratio(a: list[LatencyStats], b: list[LatencyStats]) -> dict[str, Any]:
    """a / b. Within one round both ran moments apart under the same machine load, so the median of the
    per-round ratios is steadier than the ratio of the two best rounds, which may come from different spells."""
    per_round = [x.median_ms / y.median_ms for x, y in zip(a, b)]
    return {
        "median_of_rounds": statistics.median(per_round),
        "per_round": per_round,
        "best_of_rounds": min(s.median_ms for s in a) / min(s.median_ms for s in b),
    }


# -- targets ------------------------------------------------------------------------------------

def points(a: float, b: float) -> float:
    """a - b in percentage points, rounded so that 20 images of 10,000 compare equal to 0.2."""
    return round(100 * (a - b), 6)


_COMPARE = {"<=": operator.le, ">=": operator.ge}


def target(name: str, description: str, measured: float, op: str, limit: float, unit: str) -> dict[str, Any]:
    return {"name": name, "description": description, "measured": measured, "op": op, "limit": limit,
            "unit": unit, "passed": bool(_COMPARE[op](measured, limit))}


def evaluate(acc: dict[str, float], size: dict[str, Any], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        target("accuracy_drop_torch", "accuracy drop vs fp32, PyTorch (simulation)",
               points(acc["fp32_torch"], acc["ours_torch"]), "<=", MAX_DROP_PT, "pt"),
        target("accuracy_drop_onnx", "accuracy drop vs fp32, ONNX Runtime",
               points(acc["fp32_onnx"], acc["ours_onnx"]), "<=", MAX_DROP_PT, "pt"),
        target("simulation_matches_onnx", "ours: simulated vs ONNX Runtime accuracy, absolute difference",
               abs(points(acc["ours_torch"], acc["ours_onnx"])), "<=", MAX_SIM_VS_ONNX_PT, "pt"),
        target("artifact_size", "artifact / fp32 safetensors", size["artifact_ratio"], "<=", MAX_ARTIFACT_RATIO, "ratio"),
        target("accuracy_vs_ort", "ours - ORT quantize_static accuracy, ONNX Runtime",
               points(acc["ours_onnx"], acc["ort_onnx"]), ">=", 0.0, "pt"),
        target("latency_vs_ort", "ours / ORT quantize_static latency, ONNX Runtime (median of per-round ratios)",
               ratios["ours_vs_ort_onnx"]["median_of_rounds"], "<=", MAX_LATENCY_VS_ORT, "x"),
        target("accuracy_vs_ort_dynamic", "ours dynamic - ORT quantize_dynamic accuracy, ONNX Runtime",
               points(acc["ours_dynamic_onnx"], acc["ort_dynamic_onnx"]), ">=", 0.0, "pt"),
        target("latency_vs_ort_dynamic", "ours dynamic / ORT quantize_dynamic latency, ONNX Runtime (median of per-round ratios)",
               ratios["ours_vs_ort_dynamic_onnx"]["median_of_rounds"], "<=", MAX_LATENCY_VS_ORT, "x"),
    ]


# -- the run ------------------------------------------------------------------------------------

def run(workdir: Path, rounds: int, runs: int) -> dict[str, Any]:
    model, calib, test = assets.mnist_cnn(), assets.mnist_calibration(), assets.mnist_test()
    log("quantizing with shrinktunnel, exporting ONNX")
    ours, artifact = quantize_ours(model, calib, workdir)
    onnx_paths = {
        "fp32": st.export_onnx(model, workdir / "fp32.onnx", example_inputs=calib[0]),
        "ours": st.export_onnx(ours, workdir / "ours_int8.onnx", example_inputs=calib[0]),
    }
    log("quantizing with onnxruntime.quantization.quantize_static")
    onnx_paths["ort"] = quantize_with_ort(onnx_paths["fp32"], calib, workdir)
    onnx_paths["ort_dynamic"] = workdir / "ort_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the convolutions' "dynamic activations apply to Linear layers only"
        ours_dynamic = st.quantize(model, DYNAMIC, progress=False)
    onnx_paths["ours_dynamic"] = st.export_onnx(ours_dynamic, workdir / "ours_dynamic.onnx", example_inputs=calib[0])

    torch_models = {"fp32": model, "ours": ours, "ours_dynamic": ours_dynamic}
    # Ours in the middle: it then runs next to both contenders it is compared with (see measure_latency).
    runtimes = {name: OrtModel(onnx_paths[name], threads=THREADS) for name in ("fp32", "ours", "ort", "ours_dynamic", "ort_dynamic")}
    log(f"accuracy on {sum(len(y) for _, y in test):,} test images")
    acc = measure_accuracy(torch_models, runtimes, test)
    log(f"latency: {rounds} alternated rounds of {runs} runs, batch {BATCH}, {THREADS} threads")
    per_round = measure_latency(torch_models, runtimes, test[0][0][:BATCH], rounds, runs)

    fp32_bytes, ours_bytes = float_safetensors_bytes(model), artifact_bytes(artifact)
    size = {
        "fp32_safetensors_bytes": fp32_bytes,
        "artifact_bytes": ours_bytes,
        "artifact_ratio": ours_bytes / fp32_bytes,
        "onnx_bytes": {name: path.stat().st_size for name, path in onnx_paths.items()},
    }
    ratios = {
        "ours_vs_ort_onnx": latency_ratio(per_round["ours/onnx"], per_round["ort/onnx"]),
        "ours_vs_fp32_onnx": latency_ratio(per_round["ours/onnx"], per_round["fp32/onnx"]),
        "ort_vs_fp32_onnx": latency_ratio(per_round["ort/onnx"], per_round["fp32/onnx"]),
        "ours_vs_ort_dynamic_onnx": latency_ratio(per_round["ours_dynamic/onnx"], per_round["ort_dynamic/onnx"]),
        "ours_dynamic_vs_fp32_onnx": latency_ratio(per_round["ours_dynamic/onnx"], per_round["fp32/onnx"]),
        "ort_dynamic_vs_fp32_onnx": latency_ratio(per_round["ort_dynamic/onnx"], per_round["fp32/onnx"]),
        "ours_vs_fp32_torch": latency_ratio(per_round["ours/torch"], per_round["fp32/torch"]),
    }
    targets = evaluate(acc, size, ratios)
    return {
        "benchmark": NAME,
        "date": today(),
        "command": COMMAND,
        "machine": machine_info(THREADS),
        "source": git_state(),
        "setup": {
            "model": "shrinktunnel.assets:mnist_cnn",
            "quant_config": st.QuantConfig().to_dict(),
            "ort_quantize_static": {"preprocess": "quant_pre_process",
                                    **{k: getattr(v, "name", v) for k, v in ORT_QUANTIZE.items()}},
            "calibration_images": sum(len(y) for _, y in calib),
            "test_images": sum(len(y) for _, y in test),
            "latency": {"batch": BATCH, "threads": THREADS, "rounds": rounds, "runs_per_round": runs, "warmup": WARMUP},
        },
        "accuracy": acc,
        "size": size,
        "latency": {name: latency_summary(stats) for name, stats in per_round.items()},
        "latency_ratio": ratios,
        "ort_optimized_ops": {name: optimized_ops(onnx_paths[name], workdir) for name in ("ours", "ort", "ours_dynamic", "ort_dynamic")},
        "targets": targets,
        "checks": {t["name"]: t["passed"] for t in targets},
        "passed": all(t["passed"] for t in targets),
    }


# -- the report ---------------------------------------------------------------------------------

def _measured(value: float, unit: str) -> str:
    return {"pt": f"{value:.2f} pt", "ratio": f"{100 * value:.1f} %", "x": f"{value:.3f}x"}[unit]


def figures_table(res: dict[str, Any]) -> Table:
    acc, size, lat, ratio = res["accuracy"], res["size"], res["latency"], res["latency_ratio"]
    setup = res["setup"]["latency"]
    table = Table(
        f"MNIST CNN: fp32, shrinktunnel W8A8, ONNX Runtime quantize_static and quantize_dynamic ({res['setup']['test_images']:,} test images)",
        ["", *LABELS.values()],
        note=f"Latency: batch {setup['batch']}, {setup['threads']} threads; {setup['rounds']} alternated rounds (ONNX Runtime "
             f"contenders together, PyTorch ones together) of {setup['runs_per_round']} runs after {setup['warmup']} "
             f"warm-up runs; a round's figure is the median of its runs; latency = best round, ratio = median of the "
             f"per-round ratios. n/a: the contender has no such form.",
    )
    na = "n/a"
    table.add("accuracy, PyTorch", fmt_pct(acc["fp32_torch"]), fmt_pct(acc["ours_torch"]), na, fmt_pct(acc["ours_dynamic_torch"]), na)
    table.add("accuracy, ONNX Runtime", *(fmt_pct(acc[f"{k}_onnx"]) for k in LABELS))
    table.add("size on disk", f"{fmt_bytes(size['fp32_safetensors_bytes'])} (safetensors)",
              f"{fmt_bytes(size['artifact_bytes'])} ({100 * size['artifact_ratio']:.1f} %)", na, na, na)
    table.add("ONNX file", *(fmt_bytes(size["onnx_bytes"][k]) for k in LABELS))
    table.add("latency, ONNX Runtime", *(fmt_ms(lat[f"{k}/onnx"]["best_median_ms"]) for k in LABELS))
    table.add("latency / ONNX Runtime fp32", "1.000x", f"{ratio['ours_vs_fp32_onnx']['median_of_rounds']:.3f}x",
              f"{ratio['ort_vs_fp32_onnx']['median_of_rounds']:.3f}x", f"{ratio['ours_dynamic_vs_fp32_onnx']['median_of_rounds']:.3f}x",
              f"{ratio['ort_dynamic_vs_fp32_onnx']['median_of_rounds']:.3f}x")
    table.add("latency, PyTorch eager", fmt_ms(lat["fp32/torch"]["best_median_ms"]),
              fmt_ms(lat["ours/torch"]["best_median_ms"]) + " (simulation)", na,
              fmt_ms(lat["ours_dynamic/torch"]["best_median_ms"]), na)
    return table


def targets_table(res: dict[str, Any]) -> Table:
    per_round = ", ".join(f"{r:.3f}" for r in res["latency_ratio"]["ours_vs_ort_onnx"]["per_round"])
    best = res["latency_ratio"]["ours_vs_ort_onnx"]["best_of_rounds"]
    table = Table("Targets", ["target", "measured", "required", "result"],
                  note=f"Latency ratio ours / ORT per round: {per_round}; ratio of the best rounds: {best:.3f}x.")
    for t in res["targets"]:
        table.add(t["description"], _measured(t["measured"], t["unit"]), f"{t['op']} {_measured(t['limit'], t['unit'])}",
                  "pass" if t["passed"] else "**FAIL**")
    return table


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    commit = (res["source"]["commit"] or "unknown")[:10] + (" + local changes in src/" if res["source"]["src_modified"] else "")
    header = (f"Measured {res['date']} on {m['arch']}, {m['cpu']}, {m['cores']} cores, {m['threads']} threads; "
              f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {commit}.\n"
              f"Reproduce with `{res['command']}`.\n")
    return "\n".join([header, figures_table(res).to_markdown(), targets_table(res).to_markdown()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternated latency rounds (default %(default)s)")
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs per contender per round (default %(default)s)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{NAME}.json",
                        help="results file; the tables go beside it as .md (default %(default)s)")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)  # the PyTorch accuracy passes too, so nothing depends on the core count
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"shrinktunnel-{NAME}-") as tmp:
        results = run(Path(tmp), args.rounds, args.runs)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = render(results)
    write_results(args.json, results, markdown)
    print(markdown)
    failed = [name for name, ok in results["checks"].items() if not ok]
    log(f"FAILED: {', '.join(failed)}" if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

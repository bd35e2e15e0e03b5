"""Benchmark: the same int8 models where users run them, in plain sessions (issue 21): ONNX Runtime
(`InferenceSession(path)`, threads fixed), OpenVINO (`compile_model(path, "CPU")`) and ExecuTorch
(XNNPACK), beside each runtime's own quantizer: ONNX Runtime's quantize_static / quantize_dynamic,
NNCF (`nncf.quantize`) + OpenVINO, ExecuTorch's XNNPACKQuantizer.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/runtimes.py --only cnn
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/runtimes.py --only minilm
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/runtimes.py --only resnet

Sections: the MNIST CNN (W8A8 static, batch 64; fidelity: accuracy and top-1 agreement with our PyTorch
model on 2,048 test images), all-MiniLM-L6-v2 (attention fused + dynamic int8 per tensor + SmoothQuant,
batch 32 x 32 tokens; fidelity: mean cosine of the sentence embeddings to fp32 PyTorch on 256 held-out
tweets) and a Hugging Face ResNet from a small config (random weights, W8A8 static, batch 16 x 3 x 64 x 64;
fidelity: cosine of the logits to fp32 PyTorch). torch.ao x86 is in benchmarks/torch_int8.py. Latency:
best median of interleaved rounds; head to head as paired ratios (measure.latency.paired_ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shrinktunnel as st  # noqa: E402
from shrinktunnel import assets  # noqa: E402
from shrinktunnel.export import runtimes as R  # noqa: E402
from shrinktunnel.measure.latency import paired_ratio, time_fn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "runtimes"
THREADS = 2
ROUNDS, RUNS, PAIRS, BLOCK = 2, 10, 20, 5
FUSE = {"fuse_ops": {"bn": False, "linear": "never", "attention": True}}
MINILM_Q = {"quantize": {"activations": {"dynamic": True, "per_token": False}, "smooth": "auto",
                         "smooth_layers": ["*attention*", "*intermediate*"]}}
# OpenVINO runs dynamic int8 MatMuls as bf16 with its dynamic quantization simulated in float (2x slower than
# NNCF there); static int8 inputs (per tensor, calibrated) with the same SmoothQuant run as its u8 x i8 kernels
MINILM_STATIC = {"quantize": {"activations": {"outputs": False}, "smooth": "auto",
                              "smooth_layers": ["*attention*", "*intermediate*"]}}


def _feeds(batches: list, names: list[str]) -> list[dict[str, np.ndarray]]:
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append({k: b[k].numpy() for k in names})
        else:
            x = b[0] if isinstance(b, (tuple, list)) else b
            out.append({names[0]: x.numpy()})
    return out


def ort_own(fp32_onnx: Path, calib: list, work: Path, kind: str) -> Path:
    """ONNX Runtime's quantizer on the fp32 export: quantize_static (QDQ, per channel, U8S8) or quantize_dynamic."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in ort.InferenceSession(str(fp32_onnx)).get_inputs()]
    feeds = _feeds(calib, names)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre, out = work / f"pre_{kind}.onnx", work / f"ort_{kind}.onnx"
    old = os.getcwd()
    os.chdir(work)  # quant_pre_process leaves temporary files in the working directory
    try:
        try:
            quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - its shape inference fails on some graphs; the quantizers still run
            pre = fp32_onnx
        if kind == "static":
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    finally:
        os.chdir(old)
    return out


def nncf_openvino(fp32_onnx: Path, calib: list, work: Path, transformer: bool) -> Path:
    """NNCF's post-training quantization of the fp32 model read by OpenVINO, saved as IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    names = [i.any_name for i in model.inputs]
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    q = nncf.quantize(model, nncf.Dataset(_feeds(calib, names)), subset_size=len(calib), **kwargs)
    out = work / "nncf.xml"
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def executorch_own(fp32: torch.nn.Module, calib: list, example: Any, work: Path, dynamic: bool = False) -> Path:
    """ExecuTorch's own int8 path: PT2E with XNNPACKQuantizer (per channel; static, or dynamic activations
    for transformers), lowered to XNNPACK. `example`: a tensor or a dict of named tensors (stored in the
    program, as our export does, so the session takes keywords)."""
    R.require("executorch")
    import executorch.kernels.quantized  # noqa: F401
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from shrinktunnel.export.executorch import _NAMES

    names = list(example) if isinstance(example, dict) else ["input_0"]

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = fp32.eval()

        def forward(self, *xs):
            return self.m(**dict(zip(names, xs))) if isinstance(example, dict) else self.m(xs[0])

    def flat(b: Any) -> tuple:
        if isinstance(example, dict):
            return tuple(b[n] for n in names)
        return (b[0] if isinstance(b, (tuple, list)) else b,)

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    # dynamic: the Linears only (set_global would also annotate the embeddings' index inputs)
    quantizer = XNNPACKQuantizer().set_module_type(torch.nn.Linear, config) if dynamic else XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(torch.export.export(Positional(), flat(example), strict=False).module(), quantizer)
    with torch.no_grad():
        for b in calib:
            prepared(*flat(b))
        program = torch.export.export(convert_pt2e(prepared), flat(example), strict=False)
    out = work / "et_own.pte"
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       constant_methods={_NAMES: [ord(c) for c in ",".join(names)]})
    out.write_bytes(edge.to_executorch().buffer)
    return out


UNTIMED = False  # --untimed: fidelity only (no lock needed), written beside the timed figures


def measure(sessions: dict[str, R.Session], batch: Any, heads: list[tuple[str, str]]) -> dict[str, Any]:
    """Best median latency of interleaved rounds, and paired ratios for the head-to-head pairs."""
    if UNTIMED:
        return {"latency_ms": {}, "paired": {}}
    feeds = {k: s.feed(**batch) if isinstance(batch, dict) else s.feed(batch) for k, s in sessions.items()}
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for label, s in sessions.items():
            ms = time_fn(lambda s=s, f=feeds[label]: s.run_feed(f), warmup=3, runs=RUNS, threads=THREADS).median_ms
            best[label] = min(ms, best.get(label, float("inf")))
    paired = {}
    for a, b in heads:
        if a in sessions and b in sessions:
            sa, sb = sessions[a], sessions[b]
            paired[f"{a} / {b}"] = paired_ratio(lambda: sa.run_feed(feeds[a]), lambda: sb.run_feed(feeds[b]),
                                                pairs=PAIRS, block=BLOCK).to_dict()
    return {"latency_ms": best, "paired": paired}


def _try(notes: dict, label: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a contender that fails is recorded, not hidden
        traceback.print_exc()
        notes[label] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return None


def _sessions(paths: dict[str, tuple[str, Any]], notes: dict) -> dict[str, R.Session]:
    out = {}
    for label, (runtime, path) in paths.items():
        if path is not None:
            s = _try(notes, label, lambda r=runtime, p=path: R.session(p, r, threads=THREADS))
            if s is not None:
                out[label] = s
    return out


# -- sections ---------------------------------------------------------------------------------------
def cnn(work: Path, use_et: bool) -> dict[str, Any]:
    fp32 = assets.mnist_cnn().eval()
    calib = assets.mnist_calibration()
    q = st.quantize(fp32, st.QuantConfig(), data=calib, progress=False).eval()
    test = assets.mnist_split("test", limit=2048, batch_size=64)
    x = test[0][0]
    notes: dict[str, str] = {}
    paths: dict[str, tuple[str, Any]] = {
        "fp32, ORT": ("ort", st.export_onnx(fp32, work / "fp32.onnx", x)),
        "ours W8A8, ORT": ("ort", st.export_onnx(q, work / "ours.onnx", x))}
    paths["ORT quantize_static, ORT"] = ("ort", _try(notes, "ort static", lambda: ort_own(work / "fp32.onnx", calib[:4], work, "static")))
    paths["fp32, OpenVINO"] = ("openvino", work / "fp32.onnx")
    paths["ours W8A8, OpenVINO"] = ("openvino", work / "ours.onnx")
    paths["NNCF, OpenVINO"] = ("openvino", _try(notes, "nncf", lambda: nncf_openvino(work / "fp32.onnx", calib[:4], work, False)))
    if use_et:
        paths["ours W8A8, ExecuTorch"] = ("executorch", _try(notes, "et ours", lambda: R.export(q, work / "ours.pte", "executorch", x)))
        paths["fp32, ExecuTorch"] = ("executorch", _try(notes, "et fp32", lambda: R.export(fp32, work / "fp32.pte", "executorch", x)))
        paths["XNNPACKQuantizer, ExecuTorch"] = ("executorch", _try(notes, "et own", lambda: executorch_own(fp32, calib[:4], x, work)))
    sessions = _sessions(paths, notes)
    with torch.no_grad():
        ref = torch.cat([q(xb) for xb, _ in test])
    labels = torch.cat([y for _, y in test])
    fid = {}
    for label, s in sessions.items():
        out = torch.cat([s(xb) for xb, _ in test])
        fid[label] = {"accuracy": float((out.argmax(1) == labels).float().mean()),
                      "top1_agreement_with_ours_pytorch": float((out.argmax(1) == ref.argmax(1)).float().mean())}
    fid["ours W8A8, PyTorch (simulated)"] = {"accuracy": float((ref.argmax(1) == labels).float().mean()),
                                             "top1_agreement_with_ours_pytorch": 1.0}
    heads = [("ours W8A8, ORT", "ORT quantize_static, ORT"), ("ours W8A8, OpenVINO", "NNCF, OpenVINO"),
             ("ours W8A8, ExecuTorch", "XNNPACKQuantizer, ExecuTorch"), ("ours W8A8, ORT", "fp32, ORT")]
    return {"fidelity": fid, "notes": notes, "batch": list(x.shape), **measure(sessions, x, heads)}


def minilm(work: Path, use_et: bool) -> dict[str, Any]:
    fp32 = assets.minilm()
    calib = assets.tweet_batches(256, 0, 32, 32)
    held = assets.tweet_batches(256, 1000, 32, 32)
    b = calib[0]
    fused = st.compress(fp32, [FUSE, MINILM_Q], data=calib, progress=False).model
    static = st.compress(fp32, [FUSE, MINILM_STATIC], data=calib, progress=False).model
    notes: dict[str, str] = {}
    fp32_onnx = st.export_onnx(fp32, work / "fp32.onnx", b)
    paths: dict[str, tuple[str, Any]] = {"fp32, ORT": ("ort", fp32_onnx),
                                         "ours int8, ORT": ("ort", st.export_onnx(fused, work / "ours.onnx", b)),
                                         "ours static int8, ORT": ("ort", st.export_onnx(static, work / "static.onnx", b))}
    paths["ORT quantize_dynamic, ORT"] = ("ort", _try(notes, "ort dynamic", lambda: ort_own(fp32_onnx, calib[:8], work, "dynamic")))
    paths["fp32, OpenVINO"] = ("openvino", fp32_onnx)
    paths["ours int8, OpenVINO"] = ("openvino", work / "ours.onnx")
    paths["ours static int8, OpenVINO"] = ("openvino", work / "static.onnx")
    paths["NNCF, OpenVINO"] = ("openvino", _try(notes, "nncf", lambda: nncf_openvino(fp32_onnx, calib[:8], work, True)))
    keys = ("input_ids", "token_type_ids", "attention_mask")
    if use_et:  # ExecuTorch: the unfused model (its attention kernel is ONNX Runtime's), dynamic int8 per token
        dyn = st.quantize(fp32, {"activations": {"dynamic": True}}, progress=False)
        paths["ours int8 per token, ExecuTorch"] = ("executorch", _try(notes, "et ours", lambda: R.export(dyn, work / "ours.pte", "executorch", b)))
        paths["XNNPACKQuantizer dynamic, ExecuTorch"] = ("executorch", _try(notes, "et own", lambda: executorch_own(
            fp32, calib[:2], {k: v for k, v in b.items() if k in keys}, work, dynamic=True)))
    sessions = _sessions(paths, notes)
    with torch.no_grad():
        ref = torch.cat([fp32(**{k: v for k, v in hb.items() if k in keys}) for hb in held])
    fid = {}
    for label, s in sessions.items():
        out = torch.cat([s(**{k: v for k, v in hb.items() if k in s.input_names}) for hb in held])
        fid[label] = {"mean_cosine_to_fp32": float(F.cosine_similarity(ref, out.float(), dim=1).mean())}
    heads = [("ours int8, ORT", "ORT quantize_dynamic, ORT"), ("ours static int8, OpenVINO", "NNCF, OpenVINO"),
             ("ours int8, OpenVINO", "NNCF, OpenVINO"), ("ours static int8, ORT", "ORT quantize_dynamic, ORT"),
             ("ours int8 per token, ExecuTorch", "XNNPACKQuantizer dynamic, ExecuTorch"),
             ("ours int8, ORT", "fp32, ORT"), ("ORT quantize_dynamic, ORT", "ORT quantize_dynamic, ORT")]
    batch = {k: v for k, v in b.items() if k in keys}
    return {"fidelity": fid, "notes": notes, "batch": [32, 32], **measure(sessions, batch, heads)}


def resnet(work: Path, use_et: bool) -> dict[str, Any]:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10)
    hf = ResNetForImageClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = hf

        def forward(self, x):
            return self.m(pixel_values=x).logits

    fp32 = Logits().eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 64, 64, generator=g) for _ in range(4)]
    held = [torch.randn(16, 3, 64, 64, generator=g) for _ in range(4)]
    q = st.compress(fp32, [{"fuse_ops": {"bn": True}}, {"quantize": {}}], data=calib, progress=False).model.eval()
    x = held[0]
    notes: dict[str, str] = {}
    paths: dict[str, tuple[str, Any]] = {"fp32, ORT": ("ort", st.export_onnx(fp32, work / "fp32.onnx", x)),
                                         "ours W8A8, ORT": ("ort", st.export_onnx(q, work / "ours.onnx", x))}
    paths["ORT quantize_static, ORT"] = ("ort", _try(notes, "ort static", lambda: ort_own(work / "fp32.onnx", calib, work, "static")))
    paths["fp32, OpenVINO"] = ("openvino", work / "fp32.onnx")
    paths["ours W8A8, OpenVINO"] = ("openvino", work / "ours.onnx")
    paths["NNCF, OpenVINO"] = ("openvino", _try(notes, "nncf", lambda: nncf_openvino(work / "fp32.onnx", [(c,) for c in calib], work, False)))
    if use_et:
        paths["ours W8A8, ExecuTorch"] = ("executorch", _try(notes, "et ours", lambda: R.export(q, work / "ours.pte", "executorch", x)))
        paths["XNNPACKQuantizer, ExecuTorch"] = ("executorch", _try(notes, "et own", lambda: executorch_own(fp32, calib, x, work)))
    sessions = _sessions(paths, notes)
    with torch.no_grad():
        ref = torch.cat([fp32(h) for h in held])
    fid = {label: {"mean_cosine_to_fp32": float(F.cosine_similarity(ref, torch.cat([s(h) for h in held]), dim=1).mean())}
           for label, s in sessions.items()}
    heads = [("ours W8A8, ORT", "ORT quantize_static, ORT"), ("ours W8A8, OpenVINO", "NNCF, OpenVINO"),
             ("ours W8A8, ExecuTorch", "XNNPACKQuantizer, ExecuTorch")]
    return {"fidelity": fid, "notes": notes, "batch": list(x.shape), **measure(sessions, x, heads)}


def render(res: dict[str, Any]) -> str:
    lines = [f"Measured {res['date']} on {res['machine']['cpu']}, {THREADS} threads, plain sessions; load at start "
             f"{res.get('load', '?')}. Reproduce: `flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/runtimes.py --only SECTION`.", ""]
    for section in ("cnn", "minilm", "resnet"):
        sec = res.get(section)
        if not sec:
            continue
        run = sec.get("run", {})
        when = f"{run.get('date')}" + (f" {run['from']}-{run['to']}" if "from" in run else "")
        lines += [f"### {section} (batch {sec['batch']})" + (f", run {when}, load average {run.get('load')}" if run else ""), "",
                  "| model, runtime | fidelity | latency |", "|---|---|---|"]
        for label, f in sec["fidelity"].items():
            fid = ", ".join(f"{k} {v:.4f}" for k, v in f.items())
            ms = sec["latency_ms"].get(label)
            lines.append(f"| {label} | {fid} | {f'{ms:.2f} ms' if ms else '-'} |")
        if sec["paired"]:
            lines += ["", "| paired (a / b) | ratio | 95 % interval |", "|---|---|---|"]
            lines += [f"| {k} | {p['ratio']:.3f} | {p['low']:.3f} - {p['high']:.3f} |" for k, p in sec["paired"].items()]
        lines += [f"- {k}: {v}" for k, v in sec["notes"].items()] + [""]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("cnn", "minilm", "resnet"), default=None, help="one section (default: all)")
    parser.add_argument("--no-executorch", action="store_true")
    parser.add_argument("--untimed", action="store_true", help="fidelity only, into results/runtimes_untimed.*")
    args = parser.parse_args()
    global UNTIMED
    UNTIMED = args.untimed
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    use_et = not args.no_executorch
    if use_et:
        with contextlib.suppress(R.RuntimeMissingError):
            R.require("executorch")
    res: dict[str, Any] = {"date": today(), "git": git_state(), "machine": machine_info(THREADS),
                           "load": _load()}
    sections = {"cnn": cnn, "minilm": minilm, "resnet": resnet}
    for name in [args.only] if args.only else list(sections):
        started = (time.strftime("%H:%M UTC", time.gmtime()), _load())
        with tempfile.TemporaryDirectory() as tmp:
            res[name] = sections[name](Path(tmp), use_et)
        res[name]["run"] = {"date": today(), "from": started[0], "to": time.strftime("%H:%M UTC", time.gmtime()),
                            "load": f"{started[1]} at the start, {_load()} at the end"}
    path = RESULTS_DIR / f"{NAME}{'_untimed' if UNTIMED else ''}.json"
    if path.is_file():  # one section per run (the lock held for less time): the others' figures are kept
        previous = json.loads(path.read_text())
        for other in ("cnn", "minilm", "resnet"):
            if other not in res and other in previous:
                res[other] = {**previous[other], "run": previous[other].get("run") or
                              {"date": previous.get("date"), "load": previous.get("load")}}
    write_results(path, res, render(res))  # writes NAME.json and NAME.md beside it
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

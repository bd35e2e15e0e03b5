"""Benchmark: sparse kernels for pruned Linear layers: torch.sparse CSR / BSR products against the dense
GEMM, and ONNX Runtime's one sparse CPU kernel (com.microsoft SparseToDenseMatMul) against its MatMul.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/sparse_kernels.py --part models   # ~3 min
    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/sparse_kernels.py --part sweep    # ~5 min

models: LeNet-300-100 pruned to 92 % (magnitude, per layer) as a whole model, and all-MiniLM-L6-v2's first
FFN (384 -> 1536 -> 384, real weights) pruned to 70 / 80 / 90 %, at batch 1 and 32 (MiniLM: sequences of
32 tokens); ONNX Runtime's SparseToDenseMatMul on LeNet's first layer.
sweep: the break-even: sparse over dense latency of one layer of each shape at sparsities 50-98 %.
Every figure is a paired ratio (latency of sparse over dense, alternated blocks, median and 95 % interval;
measure/latency.paired_ratio), so the machine's slow spells hit both sides alike.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.measure.latency import paired_ratio
from shrinktunnel.pruning.sparse_kernels import SparseKernelLinear, use_sparse_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish  # noqa: E402
from _lenet import lenet_300_100  # noqa: E402

NAME = "sparse_kernels"
THREADS = 2
PAIRS, BLOCK = 16, 5


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def _ratio(sparse, dense) -> dict[str, float]:
    with torch.no_grad():
        r = paired_ratio(sparse, dense, pairs=PAIRS, block=BLOCK)
    return {"ratio": r.ratio, "low": r.low, "high": r.high, "sparse_ms": r.a_ms, "dense_ms": r.b_ms}


def _magnitude(w: torch.Tensor, s: float) -> torch.Tensor:
    k = int(round(s * w.numel()))
    cut = w.abs().reshape(-1).kthvalue(k).values if k else -1.0
    return torch.where(w.abs() > cut, w, torch.zeros_like(w))


def _minilm_ffn() -> tuple[torch.Tensor, torch.Tensor]:
    from shrinktunnel import assets

    layer = next(m for n, m in assets.minilm().named_modules() if n.endswith("encoder.layer.0"))
    return layer.intermediate.dense.weight.detach(), layer.output.dense.weight.detach()


def run_models() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    lenet = lenet_300_100().eval()
    pruned = st.prune(lenet, st.PruneConfig(sparsity=0.92))
    fast = use_sparse_kernels(pruned)
    for b in (1, 32):
        x = torch.randn(b, 784)
        assert torch.allclose(fast(x), pruned(x), atol=1e-4)
        rows[f"LeNet-300-100 92 %, batch {b}"] = _ratio(lambda: fast(x), lambda: pruned(x))
        log(f"lenet b{b}: {rows[f'LeNet-300-100 92 %, batch {b}']}")
    w1, w2 = _minilm_ffn()
    for s in (0.7, 0.8, 0.9):
        dense = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384)).eval()
        with torch.no_grad():
            dense[0].weight.copy_(_magnitude(w1, s))
            dense[2].weight.copy_(_magnitude(w2, s))
        sparse = use_sparse_kernels(dense, {"min_sparsity": 0.0})
        for b in (1, 32):
            x = torch.randn(b, 32, 384)
            rows[f"MiniLM FFN {s:.0%}, batch {b} x 32 tokens"] = _ratio(lambda: sparse(x), lambda: dense(x))
            log(f"minilm {s} b{b}: {rows[f'MiniLM FFN {s:.0%}, batch {b} x 32 tokens']}")
    rows.update(_ort_rows(pruned))
    return {"rows": rows}


def _ort_rows(pruned: nn.Module) -> dict[str, Any]:
    """ONNX Runtime: SparseToDenseMatMul (A sparse COO, fed as a run-time input) against MatMul with the
    dense weight as an initializer, on LeNet's first layer (300 x 784 at 92 %)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = next(m.weight for m in pruned.modules() if getattr(m, "weight", None) is not None
             and tuple(m.weight.shape) == (300, 784)).detach().numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.log_severity_level = 3  # the contrib op's output shape inference warns on every run
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 784])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    dense_g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "d", [x_in], [y_out],
                                [numpy_helper.from_array(w, "W")])
    # y^T = W (300 x 784, sparse) @ x^T (784 x N): SparseToDenseMatMul(A, B, transB=1) with B = x
    a_in = helper.make_sparse_tensor_value_info("A", TensorProto.FLOAT, [300, 784])
    sparse_g = helper.make_graph([helper.make_node("SparseToDenseMatMul", ["A", "x"], ["y"], domain="com.microsoft",
                                                   transB=1)], "s", [a_in, x_in], [y_out])
    sessions = {}
    for name, g in (("dense", dense_g), ("sparse", sparse_g)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        sessions[name] = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rows_idx, cols_idx = np.nonzero(w)
    values = w[rows_idx, cols_idx].astype(np.float32)
    coo = ort.SparseTensor.sparse_coo_from_numpy([300, 784], values,
                                                 np.stack([rows_idx, cols_idx], 1).reshape(-1).astype(np.int64),
                                                 ort.OrtDevice.make("cpu", 0))
    a_val = ort.OrtValue.ort_value_from_sparse_tensor(coo)
    out = {}
    for b in (1, 32):
        x = np.random.default_rng(0).standard_normal((b, 784)).astype(np.float32)
        xv = ort.OrtValue.ortvalue_from_numpy(x)
        dense_run = lambda: sessions["dense"].run(None, {"x": x})  # noqa: E731
        sparse_run = lambda: sessions["sparse"].run_with_ort_values(["y"], {"A": a_val, "x": xv})  # noqa: E731
        got = sparse_run()[0].numpy()
        ref = dense_run()[0]
        ok = got.shape == (300, b) and np.allclose(got.T, ref, atol=1e-4)
        out[f"ONNX Runtime SparseToDenseMatMul, LeNet fc1 92 %, batch {b}"] = {**_ratio(sparse_run, dense_run),
                                                                               "matches_dense": bool(ok)}
        log(f"ort b{b}: {out[f'ONNX Runtime SparseToDenseMatMul, LeNet fc1 92 %, batch {b}']}")
    return out


def run_sweep() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    shapes = {"LeNet fc1 300 x 784": (300, 784, (1, 32)), "MiniLM FFN in 1536 x 384": (1536, 384, (32, 1024))}
    rows: dict[str, Any] = {}
    for label, (o, i, batches) in shapes.items():
        w = torch.randn(o, i, generator=g)
        for s in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
            ws = _magnitude(w, s)
            dense = lambda x, ws=ws: F.linear(x, ws)  # noqa: E731
            for layout in ("csr", "bsr"):
                layer = SparseKernelLinear(ws, None, layout, 4)
                for n in batches:
                    x = torch.randn(n, i, generator=g)
                    key = f"{label}, {s:.0%}, {layout}, {n} rows"
                    rows[key] = _ratio(lambda: layer(x), lambda: dense(x))
                    log(f"{key}: {rows[key]['ratio']:.2f}")
    return {"rows": rows}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Measured {res['date']} on {m['cpu']}, load average {res['load']} (other sessions "
             f"running); torch {m['torch']}. Reproduce with `{res['command']}`. Ratio = sparse latency / dense "
             "latency (< 1: sparse faster), median of paired blocks with its 95 % interval.", "",
             "| case | sparse / dense | 95 % interval | sparse ms | dense ms |", "|---|---:|---:|---:|---:|"]
    for k, r in res["rows"].items():
        lines.append(f"| {k} | {r['ratio']:.2f} | {r['low']:.2f}-{r['high']:.2f} | {r['sparse_ms']:.3f} | {r['dense_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("models", "sweep"), default="models")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    res: dict[str, Any] = {"rows": {}}
    for threads in args.threads:  # the sparse kernel and the dense GEMM scale differently with threads
        global THREADS
        THREADS = threads
        torch.set_num_threads(threads)
        part = run_models() if args.part == "models" else run_sweep()
        res["rows"].update({f"{k} [{threads} thread{'s' if threads > 1 else ''}]": v for k, v in part["rows"].items()})
    res["part"] = args.part
    return finish(res, name=NAME, started=started, threads=max(args.threads), render=render,
                  command="flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/sparse_kernels.py " + " ".join(sys.argv[1:]),
                  stem=f"{NAME}_{args.part}{'_' + args.tag if args.tag else ''}")


if __name__ == "__main__":
    sys.exit(main())

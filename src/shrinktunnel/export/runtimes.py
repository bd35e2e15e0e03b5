"""Where a model runs: ONNX Runtime, OpenVINO and ExecuTorch (XNNPACK) behind one small interface.

    s = session(model_or_path, "openvino", example_inputs=batch)   # exported first when given a module
    s(**batch)                     # tensors in, tensors out, like the PyTorch model
    s.latency(batch)               # measure.latency.LatencyStats of one call
    export(model, "m.xml", "openvino", batch)                      # the file that runtime loads

Each session is what a user of that runtime builds by default (ONNX Runtime: `InferenceSession(path)`;
OpenVINO: `Core().compile_model(path, "CPU")`; ExecuTorch: `Runtime.get().load_program(path)`), with the
number of threads fixed. The search (`shrink auto --runtime`) and benchmarks/runtimes.py call this module.
A runtime whose package is missing raises RuntimeMissingError naming the package to install.

ExecuTorch's packages live outside the main environment (`.venv/executorch-extra`, with torchao from
`.venv/torchao-extra`; scripts/install.sh): executorch pulls torchao, coremltools and pandas into any
environment it is installed in, and none of them belongs in the default install.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..core import data as D
from ..errors import ExportError, one_line
from .packages import PACKAGES, RUNTIMES, SUFFIX, RuntimeMissingError, require  # noqa: F401  (re-exported)

__all__ = ["RUNTIMES", "NAMES", "RuntimeMissingError", "Session", "require", "export", "session"]

NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "executorch": "ExecuTorch"}  # as messages name them

def export(model: Any, path: str | os.PathLike, runtime: str, example_inputs: Any) -> Path:
    """Write `model` (an nn.Module or a Result) as the file `runtime` loads, atomically; return its path.
    ort: ONNX (st.export_onnx). openvino: OpenVINO IR (`.xml` + `.bin` beside it), read from that ONNX
    file, weights kept in their precision. executorch: a `.pte` program lowered to XNNPACK, with the
    shapes of `example_inputs` (export/executorch.py)."""
    require(runtime)
    target = Path(path)
    if runtime == "ort":
        from .onnx import export_onnx

        return export_onnx(model, target, example_inputs)
    if runtime == "openvino":
        return _export_openvino(model, target, example_inputs)
    from .executorch import export_executorch

    return export_executorch(model, target, example_inputs)


def _export_openvino(model: Any, target: Path, example_inputs: Any) -> Path:
    import openvino as ov

    from .onnx import export_onnx

    if target.suffix != ".xml":
        raise ExportError(f"--openvino {str(target)!r}: OpenVINO IR is an .xml file (with its .bin beside it); "
                          "give a path ending in .xml")
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = target.parent / f".{target.stem}.tmp-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="shrink-ov-") as d:
        onnx_path = export_onnx(model, Path(d) / "model.onnx", example_inputs)
        try:
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(stem) + ".xml", compress_to_fp16=False)
            os.replace(str(stem) + ".bin", target.with_suffix(".bin"))
            os.replace(str(stem) + ".xml", target)
        except Exception as exc:
            raise ExportError(f"OpenVINO could not convert the exported ONNX: {one_line(exc)}") from exc
        finally:
            for suffix in (".xml", ".bin"):
                Path(str(stem) + suffix).unlink(missing_ok=True)
    return target


class Session:
    """A loaded model in one runtime: call it like the PyTorch model, or time it (`latency`)."""

    def __init__(self, runtime: str, path: Path, run: Callable[[list[np.ndarray]], list[np.ndarray]],
                 input_names: list[str], threads: int) -> None:
        self.runtime, self.path, self.input_names, self.threads = runtime, path, input_names, threads
        self._run = run

    def feed(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """The inputs in the model's order, as numpy arrays (positional first, then by name)."""
        values = dict(zip(self.input_names, args))
        values.update({k: v for k, v in kwargs.items() if k in self.input_names})
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise ExportError(f"{self.runtime} session: inputs {missing} not given; the model takes {self.input_names}")
        return [_np(values[n]) for n in self.input_names]

    def run_feed(self, feed: list[np.ndarray]) -> list[np.ndarray]:
        return self._run(feed)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = [torch.from_numpy(np.asarray(o)) for o in self._run(self.feed(*args, **kwargs))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def latency(self, inputs: Any, *, warmup: int = 5, runs: int = 30):
        """LatencyStats of one call on `inputs` (one batch in the data convention)."""
        from ..measure.latency import time_fn

        (args, kwargs), _ = D.split(inputs)
        feed = self.feed(*args, **kwargs)
        return time_fn(lambda: self._run(feed), warmup=warmup, runs=runs, threads=self.threads,
                       batch=int(feed[0].shape[0]) if feed and feed[0].ndim else 1)


def session(path_or_model: Any, runtime: str = "ort", *, example_inputs: Any = None, threads: int = 2,
            work_dir: str | os.PathLike | None = None, precision: str | None = None) -> Session:
    """A session of `runtime` on a file (.onnx, OpenVINO .xml or .onnx, ExecuTorch .pte) or on a model,
    which is first exported (`example_inputs` needed) into `work_dir` (a temporary folder kept as long
    as the session when None). `precision`: OpenVINO's inference precision ("f32"; None: the runtime's
    default, bf16 on CPUs with AMX / AVX512-BF16)."""
    require(runtime)
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if not path.is_file():
            raise ExportError(f"{runtime} session: no file at {str(path)!r}")
        keep = None
    else:
        if example_inputs is None:
            raise ExportError(f"{runtime} session of a model needs example_inputs: one batch the model accepts")
        keep = None if work_dir is not None else tempfile.TemporaryDirectory(prefix=f"shrink-{runtime}-")
        folder = Path(work_dir) if work_dir is not None else Path(keep.name)
        suffix = ".onnx" if runtime == "openvino" else SUFFIX[runtime]  # OpenVINO reads the ONNX file itself
        path = export(path_or_model, folder / f"model{suffix}", "ort" if runtime == "openvino" else runtime,
                      example_inputs)
    s = {"ort": _ort, "openvino": _openvino, "executorch": _executorch}[runtime](path, threads, precision)
    s._keep = keep  # the temporary folder lives as long as the session
    return s


def _ort(path: Path, threads: int, precision: str | None) -> Session:
    import onnxruntime as ort

    opts = ort.SessionOptions()  # a user's default session; only the thread count fixed
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return Session("ort", path, lambda feed: sess.run(None, dict(zip(names, feed))), names, threads)


def _openvino(path: Path, threads: int, precision: str | None) -> Session:
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    names = [i.any_name for i in compiled.inputs]

    def run(feed: list[np.ndarray]) -> list[np.ndarray]:
        result = request.infer(dict(zip(names, feed)))
        return [result[o] for o in compiled.outputs]

    return Session("openvino", path, run, names, threads)


def _executorch(path: Path, threads: int, precision: str | None) -> Session:
    from .executorch import load_program

    method, names = load_program(path, threads)
    meta = method.metadata
    shapes = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]

    def execute(feed: list[np.ndarray]) -> list[np.ndarray]:
        return [o.numpy() for o in method.execute([torch.from_numpy(np.ascontiguousarray(f)) for f in feed])]

    def run(feed: list[np.ndarray]) -> list[np.ndarray]:
        if [tuple(f.shape) for f in feed] == shapes:
            return execute(feed)
        return _in_program_batches(execute, feed, shapes, path)

    return Session("executorch", path, run, names, threads)


def _in_program_batches(execute: Callable, feed: list[np.ndarray], shapes: list[tuple], path: Path) -> list[np.ndarray]:
    """Run a batch of another size through a program of static shapes: in slices of the program's batch
    along dim 0, the last one padded by repeating its last sample; outputs cut back to the batch's size.
    Anything but dim 0 differing is an ExportError (the program was exported for those shapes)."""
    n = int(feed[0].shape[0]) if feed and feed[0].ndim else 0
    size = shapes[0][0] if shapes and shapes[0] else 0
    if (len(feed) != len(shapes) or not n or not size
            or any(f.ndim != len(s) or f.shape[0] != n or tuple(f.shape[1:]) != s[1:] for f, s in zip(feed, shapes))):
        raise ExportError(f"ExecuTorch program {path.name} takes inputs of shapes {shapes} (static: those of the "
                          f"example it was exported with), got {[tuple(f.shape) for f in feed]}; export it with an "
                          f"example of the shapes it will run on (only the batch dimension may differ)")
    pieces: list[list[np.ndarray]] = []
    for start in range(0, n, size):
        part = [f[start:start + size] for f in feed]
        short = size - part[0].shape[0]
        if short:
            part = [np.concatenate([p, np.repeat(p[-1:], short, axis=0)]) for p in part]
        outs = execute(part)
        if any(o.ndim == 0 or o.shape[0] != size for o in outs):
            raise ExportError(f"ExecuTorch program {path.name}: its outputs are not batch-first, so a batch of {n} "
                              f"cannot run in slices of {size}; export it with a batch of {n}")
        pieces.append([o[:size - short] for o in outs])
    return [np.concatenate([p[k] for p in pieces]) for k in range(len(pieces[0]))]


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)



"""int8 static quantization on the ONNX graph itself, for graphs the PyTorch importer cannot take.

ONNX Runtime's quantizer (`onnxruntime.quantization.quantize_static`, QDQ format) writes the graph;
the activation ranges come from shrinktunnel's own calibrators (quant/observers.py: minmax,
percentile, entropy as TensorRT computes it, mse), fed to ORT through its calibration cache
(`calibration_cache_path`: a JSON of per-tensor ranges it reads instead of calibrating). ORT's own
entropy calibrator, with its defaults, picks the full range (the threshold search has one candidate:
docs/onnx-input.md), which is why this path exists beside ORT's calibrators.

Which tensors get a range is ORT's choice (its histogram calibrator's augmented graph: the inputs and
outputs of the op types it quantizes); we run that graph on the calibration data and observe each.
A tensor whose values are not finite (an attention mask's -inf) gets no range, so ORT leaves it float.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..core import data as D
from ..errors import ConfigError, DataError, ModelError, one_line

__all__ = ["quantize_onnx", "ort_calibration_ranges", "CALIBRATORS"]

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def _feeds(batch: Any, input_names: list[str], input_types: dict[str, Any]) -> dict[str, np.ndarray]:
    (args, kwargs), _ = D.split(batch)
    bound = dict(zip(input_names, args))
    bound.update(kwargs)
    missing = [n for n in input_names if n not in bound]
    if missing:
        raise DataError(f"calibration batch lacks the ONNX inputs {missing}; give dict batches keyed by {input_names}")
    out = {}
    for name in input_names:
        v = bound[name]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[name] = arr.astype(input_types[name], copy=False)
    return out


_NP = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 2: np.uint8, 3: np.int8}


def _opset_13(src: Path, dst: Path) -> Path:
    """`src` converted to opset 13 when older: per-channel QDQ (DequantizeLinear's axis) needs 13, and
    ORT's quantizer writes it into an opset-11 graph regardless (ONNX Runtime then rejects the model)."""
    import onnx
    from onnx import version_converter

    from .reader import default_opset

    model = onnx.load(str(src))
    if (default_opset(model) or 13) >= 13:
        return src
    try:
        onnx.save(version_converter.convert_version(model, 13), str(dst))
    except Exception:  # noqa: BLE001 - left as it is; ORT's own error then names the problem
        return src
    return dst


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimization) of `src` at opset 13 or
    later; `src` itself (upgraded) when the pre-processing fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = _opset_13(src, dst.with_name(dst.stem + ".op13.onnx"))
    for symbolic_skip in (False, True):
        try:
            # In dst's folder: ORT's symbolic shape inference, when it fails, leaves sym_shape_infer_temp.onnx
            # and a large .data file in the working directory (the user's, otherwise).
            with warnings.catch_warnings(), contextlib.chdir(dst.parent):
                warnings.simplefilter("ignore")
                quant_pre_process(str(src.resolve()), str(dst.resolve()), skip_symbolic_shape=symbolic_skip)
            return dst
        except Exception:  # noqa: BLE001 - the next (simpler) pre-processing, or none
            continue
    return src


def ort_calibration_ranges(model_path: Path, data: Iterable[Any], calibrator: str, op_types: list[str] | None,
                           workdir: Path, *, bins: int = 2048, percentile: float = 99.99) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """{tensor: (lo, hi)} for the tensors ORT would quantize, from our calibrator; and the tensors left
    float (values not finite)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from ..quant.config import ActivationQuant, Calibrator
    from ..quant.observers import make_observer

    cal = create_calibrator(model_path, op_types or [], augmented_model_path=str(workdir / "augmented.onnx"),
                            calibrate_method=CalibrationMethod.Entropy, use_external_data_format=False)
    names = sorted(cal.tensors_to_calibrate)
    aq = ActivationQuant(calibrator=Calibrator(calibrator), bins=bins, percentile=percentile)
    observers = {n: make_observer(aq) for n in names}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    types = {i.name: _NP.get(i.type.tensor_type.elem_type, np.float32) for i in inputs}
    session = ort.InferenceSession(cal.augmented_model_path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    wanted = [n for n in outputs if n in observers]
    for batch in D.batches(data):
        try:
            values = session.run(wanted, _feeds(batch, [i.name for i in inputs], types))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; a typed one with its message
            raise DataError(f"ONNX Runtime cannot run {model_path.name} on the calibration data: {one_line(exc)[:240]}; "
                            f"check the batches' shapes and types against the graph's inputs {[i.name for i in inputs]}") from None
        for name, value in zip(wanted, values):
            if value.dtype.kind == "f":
                observers[name].update(torch.from_numpy(np.ascontiguousarray(value)))
    del session, cal
    ranges, left = {}, []
    for name, obs in observers.items():
        if obs.count == 0:
            continue
        try:
            lo, hi = obs.clip_range(0, 255, False)  # uint8 activations, asymmetric (ORT's fast QDQ kernels: U8S8)
        except DataError:
            left.append(name)
            continue
        ranges[name] = (min(lo, 0.0), max(hi, 0.0))
    return ranges, left


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, data: Iterable[Any], *, calibrator: str = "entropy",
                  per_channel: bool = True, op_types: list[str] | None = None, bins: int = 2048,
                  percentile: float = 99.99) -> dict[str, Any]:
    """Write `src` quantized to int8 (QDQ: uint8 activations, int8 weights) at `dst`, atomically, with
    activation ranges from our `calibrator` on `data` (batches in the data convention, keyed or ordered
    as the graph's inputs). Returns {"quantized_tensors", "left_float", "calibrator"}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from .reader import read_onnx

    if calibrator not in CALIBRATORS:
        raise ConfigError(f"calibrator {calibrator!r} is unknown; use one of {', '.join(CALIBRATORS)}")
    read_onnx(src)  # the same checks as load_onnx: ONNX, not truncated, opset 11..21, safe external data
    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shrink-ortq-") as tmp:
        work = Path(tmp)
        pre = preprocess(Path(src), work / "pre.onnx")
        ranges, left = ort_calibration_ranges(pre, data, calibrator, op_types, work, bins=bins, percentile=percentile)
        if not ranges:
            raise ModelError(f"{str(src)!r}: no tensor of an op ONNX Runtime quantizes got a calibration range; nothing to quantize")
        cache = work / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                                                  for n, (lo, hi) in ranges.items()}), cache)
        out = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            quantize_static(str(pre), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache))
            os.replace(out, target)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime's quantizer failed on {str(src)!r}: {one_line(exc)}") from exc
        finally:
            out.unlink(missing_ok=True)
    return {"quantized_tensors": len(ranges), "left_float": left, "calibrator": calibrator}

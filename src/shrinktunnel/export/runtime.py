"""ONNX Runtime sessions, and an adapter that makes a session callable like a model."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["ort_session", "OrtModel", "SLOW_FUSIONS", "weights_only_qdq"]


# Graph fusions whose kernel is slower than the ops it replaces, measured on the CPUs we run on (ONNX
# Runtime 1.32, AMD EPYC with AVX-512, 2 threads): SkipLayerNormalization, fused from Add + LayerNorm in
# every BERT block, takes 0.91 ms on a 32 x 32 x 384 tensor where Add + LayerNormalization take 0.12 ms;
# on all-MiniLM-L6-v2 it is 13 % of the fp32 model's time (82 -> 71 ms without it) and 15 % of int8's.
# The exported file avoids it (export.default_session writes that Add as Sum), so a default session runs
# the fast graph; `ort_session(..., disabled_optimizers=SLOW_FUSIONS)` does the same for other files.
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def weights_only_qdq(path: str | os.PathLike) -> bool:
    """True when the ONNX model dequantizes constant convolution weights but quantizes no activation
    (no QuantizeLinear): the files that `export.default_session.fold_weight_dequantize` rewrites (files
    exported before it, or by other tools, still hold such DequantizeLinear nodes). ONNX Runtime keeps
    every DequantizeLinear out of constant folding for QDQ fusion, so such a conv repacks its weight on
    every run; `ort_session(..., fold_weights=True)` folds them in the session instead."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - unreadable here: ONNX Runtime reports it when it loads the file
        return False
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        return False
    constants = {i.name for i in graph.initializer}
    dequantized = {node.output[0] for node in graph.node
                   if node.op_type == "DequantizeLinear" and node.input and node.input[0] in constants}
    return any(node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in dequantized for node in graph.node)


def ort_session(
    path: str | os.PathLike,
    *,
    threads: int = 2,
    disabled_optimizers: tuple[str, ...] = (),
    fold_weights: bool = False,
    optimized_model_path: str | os.PathLike | None = None,
    profile_prefix: str | os.PathLike | None = None,
) -> ort.InferenceSession:
    """A CPU session as a user builds it (`ort.InferenceSession(path)`: every graph optimisation on),
    with a fixed number of intra-op threads, so that what the project measures is what users run. The
    exported file carries what makes it fast there (export.default_session). For other files:
    `disabled_optimizers` (e.g. SLOW_FUSIONS) leaves fusions out; `fold_weights` sets
    `session.disable_quant_qdq` where `weights_only_qdq(path)`. `optimized_model_path` writes the graph
    ONNX Runtime actually runs (after its fusions), to inspect it; `profile_prefix` turns on ONNX
    Runtime's profiler (`session.end_profiling()` writes its JSON, see op_profile)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    if fold_weights and weights_only_qdq(path):
        opts.add_session_config_entry("session.disable_quant_qdq", "1")  # fold the weights' DequantizeLinear
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


class OrtModel:
    """Call an ONNX model like the PyTorch one: tensors in (positional, then keyword), tensors out."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 2, **session_options: Any) -> None:
        self.session = ort_session(path, threads=threads, **session_options)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feed(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        feed = {name: _np(a) for name, a in zip(self.input_names, args)}
        feed.update({k: _np(v) for k, v in kwargs.items() if k in self.input_names})
        return feed

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = [torch.from_numpy(o) for o in self.session.run(None, self.feed(*args, **kwargs))]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)

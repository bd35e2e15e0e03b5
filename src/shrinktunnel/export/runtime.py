"""ONNX Runtime sessions, and an adapter that makes a session callable like a model."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

__all__ = ["ort_session", "OrtModel"]


def ort_session(path: str | os.PathLike, *, threads: int = 2) -> ort.InferenceSession:
    """A CPU session with all graph optimisations (QDQ fusion into integer kernels) and a fixed
    number of intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtModel:
    """Call an ONNX model like the PyTorch one: tensors in (positional, then keyword), tensors out."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 2) -> None:
        self.session = ort_session(path, threads=threads)
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

"""Export to ONNX and execution in ONNX Runtime. Algorithms never import this package."""

from .onnx import export_onnx
from .runtime import SLOW_FUSIONS, OrtModel, ort_session

__all__ = ["export_onnx", "OrtModel", "ort_session", "SLOW_FUSIONS"]

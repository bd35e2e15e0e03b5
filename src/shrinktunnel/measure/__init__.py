"""Measurement reused by every method: size, parameters, MACs, latency, accuracy, fidelity."""

from .latency import LatencyStats, onnx_latency, torch_latency
from .macs import count_macs
from .perplexity import perplexity
from .quality import accuracy, fidelity
from .size import artifact_bytes, bits_per_weight, count_weights, float_safetensors_bytes

__all__ = [
    "LatencyStats", "torch_latency", "onnx_latency", "count_macs", "perplexity", "accuracy", "fidelity",
    "artifact_bytes", "bits_per_weight", "count_weights", "float_safetensors_bytes",
]

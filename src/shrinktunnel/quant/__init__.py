"""Quantization: formats, observers, quantized layers, post-training quantization."""

from .config import ActivationQuant, Calibrator, Granularity, QuantConfig, WeightQuant
from .float_formats import CastConfig, FloatFormat, FloatWeightLayer
from .modules import QuantizedLayer
from .ptq import quantize_model
from .qat import QATConfig, qat_model

__all__ = ["CastConfig", "FloatFormat", "FloatWeightLayer", "ActivationQuant", "Calibrator", "Granularity", "QuantConfig", "WeightQuant", "QuantizedLayer", "quantize_model", "QATConfig", "qat_model"]

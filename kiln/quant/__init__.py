"""Quantization numerics (torch/NumPy, no TVM): packed layouts and their references (formats.py),
schemes and the Calibration file (schemes.py), scale folding and smoothing (smooth.py), AWQ
(awq.py), AutoAWQ checkpoints (autoawq.py)."""

from .schemes import SCHEMES, Calibration, QuantScheme, dequantize_linear, get_scheme, quantize_params, \
    quantized_linears

__all__ = ["SCHEMES", "Calibration", "QuantScheme", "dequantize_linear", "get_scheme", "quantize_params",
           "quantized_linears"]

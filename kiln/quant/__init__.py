"""Quantization numerics (torch/NumPy, no TVM): packed layouts and their references (formats.py),
schemes (schemes.py), the Calibration file (calibration.py), scale folding and smoothing (smooth.py), AWQ
(awq.py), AutoAWQ checkpoints (autoawq.py)."""

from .calibration import Calibration, quantized_linears
from .schemes import SCHEMES, QuantScheme, dequantize_linear, get_scheme, quantize_params

__all__ = ["SCHEMES", "Calibration", "QuantScheme", "dequantize_linear", "get_scheme", "quantize_params",
           "quantized_linears"]

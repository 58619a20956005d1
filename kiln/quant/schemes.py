"""Quantization schemes: float parameters (+ a Calibration) -> kiln's packed parameters.

``quantize_params(params, spec, scheme, calib)`` returns a new params dict in which every decoder
linear ``NAME`` (``quantized_linears(spec)``) is replaced, at its position, by its packed tensors
``NAME.<suffix>`` (``SCHEMES[scheme].suffixes``; layouts in formats.py), and the norm weights and
biases that received folded scales are replaced by the folded ones (in the model dtype). Embedding,
lm_head, final_norm and everything else pass through unchanged. Deterministic: the same inputs give
bit-identical outputs.

| scheme      | weights                                 | activations    | before quantizing           |
|-------------|-----------------------------------------|----------------|-----------------------------|
| rtn-w4g128  | uint4 asymmetric per group of 128       | model dtype    | -                           |
| rtn-w3g128  | uint3 (in 4-bit slots) per group of 128 | model dtype    | -                           |
| awq-w4g128  | as rtn-w4g128                           | model dtype    | AWQ scales + clip (awq.py)  |
| awq-w3g128  | as rtn-w3g128                           | model dtype    | AWQ scales + clip           |
| w4a8        | QoQ: int8 per channel, uint4 per group  | int8 per token | smoothing, a=0.5 (smooth.py)|
| w8a8        | int8 per output channel                 | int8 per token | smoothing, a=0.5            |

Calibration is the file ``kiln calibrate`` writes (calibration.py, calibrate.py): statistics of every linear's input
from the float model. AWQ reads ``mean_abs`` and ``samples``, smoothing reads ``max_abs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KilnError, UnsupportedModelError
from ..ir.spec import ModelSpec
from ..progress import count
from . import formats
from .awq import awq_layer
from .calibration import Calibration, linear_shapes, quantized_linears  # noqa: F401  (quantized_linears: the linears a scheme packs)
from .smooth import SMOOTH_ALPHA, smooth_layer

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# schemes

@dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: str  # "weight_only" | "w4a8" | "w8a8"
    bits: int  # weight bits
    group_size: int | None  # input channels per scale; None: one scale per output channel
    needs_calib: bool
    awq: bool = False  # AWQ scale + clip search before round-to-nearest

    def __post_init__(self):
        assert self.kind in ("weight_only", "w4a8", "w8a8"), self.kind

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The tensors ``NAME.<suffix>`` that replace a quantized linear ``NAME``, in order."""
        return {"weight_only": ("qweight", "scales", "zeros"),
                "w4a8": ("qweight", "group_scales", "zeros", "channel_scales"),
                "w8a8": ("qweight", "channel_scales")}[self.kind]

    @property
    def act_bits(self) -> int | None:
        """8: the kernel quantizes activations per token to int8; None: they stay in the model dtype."""
        return None if self.kind == "weight_only" else 8

    @property
    def calib_tables(self) -> tuple[str, ...]:
        if self.awq:
            return ("mean_abs", "samples")
        return ("max_abs",) if self.kind in ("w4a8", "w8a8") else ()


SCHEMES: dict[str, QuantScheme] = {s.name: s for s in (
    QuantScheme("rtn-w4g128", "weight_only", 4, 128, needs_calib=False),
    QuantScheme("rtn-w3g128", "weight_only", 3, 128, needs_calib=False),
    QuantScheme("awq-w4g128", "weight_only", 4, 128, needs_calib=True, awq=True),
    QuantScheme("awq-w3g128", "weight_only", 3, 128, needs_calib=True, awq=True),
    QuantScheme("w4a8", "w4a8", 4, 128, needs_calib=True),
    QuantScheme("w8a8", "w8a8", 8, None, needs_calib=True),
)}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise KilnError(f"unknown quantization scheme {name!r}; kiln has: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def quantize_linear(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One float weight [out, in] -> its packed tensors by suffix (layouts in formats.py)."""
    if scheme.kind == "weight_only":
        q, scales, zeros = formats.quantize_weight_only(w, scheme.bits, scheme.group_size, scale_dtype=dtype)
        return {"qweight": formats.pack_int4(q), "scales": scales, "zeros": zeros}
    if scheme.kind == "w4a8":
        q, group_scales, zeros, channel_scales = formats.quantize_w4a8(w, scheme.group_size)
        return {"qweight": formats.pack_int4(q), "group_scales": group_scales, "zeros": zeros,
                "channel_scales": channel_scales.float()}
    w8, channel_scales = formats.quantize_w8a8(w)
    return {"qweight": w8, "channel_scales": channel_scales.float()}


def dequantize_linear(qparams: dict[str, torch.Tensor], name: str, scheme: str | QuantScheme) -> torch.Tensor:
    """The float32 weight [out, in] that linear ``name`` of ``quantize_params``'s output stands for
    (activation quantization of w4a8/w8a8 not included)."""
    sch = get_scheme(scheme) if isinstance(scheme, str) else scheme
    t = {suf: qparams[f"{name}.{suf}"] for suf in sch.suffixes}
    if sch.kind == "weight_only":
        w = formats.dequantize_weight_only(t["qweight"], t["scales"], t["zeros"], sch.group_size)
        return torch.from_numpy(w)
    if sch.kind == "w4a8":
        w8 = formats.w4a8_weight_int8(t["qweight"], t["group_scales"], t["zeros"], sch.group_size)
        return torch.from_numpy(w8).float() * t["channel_scales"][:, None]
    return t["qweight"].float() * t["channel_scales"][:, None]


def quantize_params(params: dict[str, torch.Tensor], spec: ModelSpec, scheme: str,
                    calib: Calibration | None = None) -> dict[str, torch.Tensor]:
    """Quantize every decoder linear of ``params`` with ``scheme``; a new dict (see the module doc).
    ``params`` and its tensors are left unchanged."""
    sch = get_scheme(scheme)
    if sch.needs_calib and calib is None:
        raise KilnError(f"quantization scheme {scheme!r} needs calibration statistics of the model's activations: "
                        f"run `kiln calibrate` on the model and pass the file it writes")
    shapes = linear_shapes(spec)
    for name, shape in shapes.items():
        if name not in params:
            raise KilnError(f"cannot quantize: the parameters have no {name}")
        if tuple(params[name].shape) != shape:
            raise KilnError(f"cannot quantize: {name} has shape {tuple(params[name].shape)}, the model needs {shape}")
        if sch.bits == 4 or sch.bits == 3:
            if shape[1] % 8:
                raise UnsupportedModelError(f"{scheme} packs 8 weights per int32 along the input: {name} has "
                                            f"{shape[1]} input features, not a multiple of 8")
    if sch.calib_tables:
        calib.check(spec, sch.calib_tables)
    dtype = _TORCH_DTYPES[spec.dtype]

    packed: dict[str, dict[str, torch.Tensor]] = {}
    folded: dict[str, torch.Tensor] = {}
    for i in range(spec.num_layers):
        prefix = f"layers.{i}."
        work = {k: v.float() for k, v in params.items() if k.startswith(prefix)}  # replaced, never mutated
        before = dict(work)
        if sch.awq:
            awq_layer(work, spec, i, calib, sch.bits, sch.group_size)
            count(f"{sch.name}: searched layer", i + 1, spec.num_layers)
        elif sch.kind in ("w4a8", "w8a8"):
            smooth_layer(work, spec, i, calib, SMOOTH_ALPHA)
        for k, v in work.items():
            if k in shapes:
                packed[k] = quantize_linear(v, sch, dtype)
            elif v is not before[k]:
                folded[k] = v.to(dtype)  # a norm weight or bias that received scales

    out: dict[str, torch.Tensor] = {}
    for k, v in params.items():
        if k in packed:
            out.update({f"{k}.{suf}": packed[k][suf] for suf in sch.suffixes})
        else:
            out[k] = folded.get(k, v)
    return out

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

Calibration is the file ``kiln calibrate`` writes (calibrate.py): statistics of every linear's input
from the float model. AWQ reads ``mean_abs`` and ``samples``, smoothing reads ``max_abs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KilnError, UnsupportedModelError
from ..ir.spec import ModelSpec
from . import formats
from .awq import awq_layer
from .smooth import SMOOTH_ALPHA, smooth_layer

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linears that read the input of another one: their calibration statistics may be stored once, under it
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
CALIB_FORMAT = "kiln.calibration"
CALIB_VERSION = 1
MAX_SAMPLES = 512

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def input_key(name: str) -> str:
    """The linear whose input ``name`` reads: ``layers.0.k_proj`` -> ``layers.0.q_proj``."""
    prefix, _, proj = name.rpartition(".")
    return f"{prefix}.{SHARED_INPUT[proj]}" if proj in SHARED_INPUT else name


# ------------------------------------------------------------------------------------------------
# calibration (the interface with calibrate.py)

@dataclass
class Calibration:
    """Statistics of each linear's input, keyed by the linear's param name (``layers.0.q_proj``).

    q/k/v read one input, as do gate/up: a table may hold it under every linear of the group or only
    under the first (q_proj, gate_proj); ``get`` resolves either."""

    mean_abs: dict[str, torch.Tensor]  # [in] mean |x| per input channel over all tokens (AWQ's s_X)
    max_abs: dict[str, torch.Tensor]  # [in] max |x| per input channel (SmoothQuant / QoQ smoothing)
    samples: dict[str, torch.Tensor]  # [T, in] float32, T <= 512 input rows (AWQ's losses)
    meta: dict[str, str] = field(default_factory=dict)  # provenance (model, dataset, num_tokens, ...)

    TABLES = ("mean_abs", "max_abs", "samples")

    def get(self, table: str, name: str) -> torch.Tensor:
        """The ``table`` statistic of the input of linear ``name`` (stored under it or its group's first)."""
        d = getattr(self, table)
        for key in (name, input_key(name)):
            if key in d:
                return d[key]
        raise KilnError(f"the calibration has no {table} for the input of {name}; it was made for another "
                        f"model or is incomplete: run `kiln calibrate` on this model again")

    def check(self, spec: ModelSpec, tables: tuple[str, ...] = TABLES) -> None:
        """Raise KilnError unless ``tables`` cover every quantized linear of ``spec`` with the right shapes."""
        for name, (_, in_f) in linear_shapes(spec).items():
            for table in tables:
                shape = tuple(self.get(table, name).shape)
                if table == "samples":
                    ok = len(shape) == 2 and 0 < shape[0] <= MAX_SAMPLES and shape[1] == in_f
                    want = f"[T <= {MAX_SAMPLES}, {in_f}]"
                else:
                    ok, want = shape == (in_f,), f"[{in_f}]"
                if not ok:
                    raise KilnError(f"calibration {table} for the input of {name} has shape {list(shape)}, the model "
                                    f"needs {want}: it was made for another model; run `kiln calibrate` on this one")

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: tensors ``<table>/<name>``; a JSON header under the metadata key
        ``kiln.calibration`` holds the format version, ``meta`` and aliases (a tensor given under several
        names, e.g. q/k/v's shared input, is stored once)."""
        from safetensors.torch import save_file

        tensors, aliases, seen, storages = {}, {}, {}, set()
        for table in self.TABLES:
            for name, t in getattr(self, table).items():
                key = f"{table}/{name}"
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if ident in seen:
                    aliases[key] = seen[ident]
                    continue
                seen[ident] = key
                t = t.detach().cpu().contiguous()
                ptr = t.untyped_storage().data_ptr()
                tensors[key] = t.clone() if ptr in storages else t  # safetensors refuses shared storage
                storages.add(ptr)
        header = {"version": CALIB_VERSION, "aliases": aliases, "meta": self.meta}
        save_file(tensors, str(path), metadata={CALIB_FORMAT: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise KilnError(f"calibration file {path} does not exist: run `kiln calibrate` to make one")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[CALIB_FORMAT])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise KilnError(f"{path} is not a kiln calibration file ({type(e).__name__}: {e}); "
                            f"make one with `kiln calibrate`") from None
        if header.get("version") != CALIB_VERSION:
            raise KilnError(f"{path} has calibration format version {header.get('version')}, this kiln reads "
                            f"{CALIB_VERSION}: run `kiln calibrate` again")
        for key, target in header.get("aliases", {}).items():
            tensors[key] = tensors[target]
        tables: dict[str, dict[str, torch.Tensor]] = {t: {} for t in cls.TABLES}
        for key, t in tensors.items():
            table, _, name = key.partition("/")
            if table in tables:
                tables[table][name] = t
        return cls(**tables, meta=dict(header.get("meta", {})))


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


def quantized_linears(spec: ModelSpec) -> list[str]:
    """Every decoder linear, layer by layer (embedding and lm_head stay in the model dtype)."""
    return [f"layers.{i}.{proj}" for i in range(spec.num_layers) for proj in LINEARS]


def linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of every quantized linear."""
    H, I = spec.hidden_size, spec.intermediate_size
    qd, kvd = spec.num_q_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per = {"q_proj": (qd, H), "k_proj": (kvd, H), "v_proj": (kvd, H), "o_proj": (H, qd),
           "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    return {name: per[name.rpartition(".")[2]] for name in quantized_linears(spec)}


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

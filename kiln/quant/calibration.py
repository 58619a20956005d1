"""The Calibration file ``kiln calibrate`` writes (calibrate.py) and the quantization schemes read
(schemes.py, awq.py, smooth.py): statistics of every decoder linear's input from the float model, and
the linears it covers (``quantized_linears``, ``linear_shapes``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KilnError
from ..ir.spec import ModelSpec

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# linears that read the input of another one: their calibration statistics may be stored once, under it
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
CALIB_FORMAT = "kiln.calibration"
CALIB_VERSION = 1
MAX_SAMPLES = 512


def input_key(name: str) -> str:
    """The linear whose input ``name`` reads: ``layers.0.k_proj`` -> ``layers.0.q_proj``."""
    prefix, _, proj = name.rpartition(".")
    return f"{prefix}.{SHARED_INPUT[proj]}" if proj in SHARED_INPUT else name


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
    def load(cls, path: str | Path) -> Calibration:
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

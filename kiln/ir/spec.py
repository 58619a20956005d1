"""ModelSpec: the frozen description of a decoder LLM that every layer of kiln agrees on.

The frontend produces it from a checkpoint's config, the passes read it, the artifact stores it as
JSON in its manifest and the runtime sizes the KV cache from it. Pure Python: no TVM import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("global", "sliding")
KV_PARAMS = ("k_proj", "v_proj", "k_bias", "v_bias", "k_norm")  # a layer's parameters that make its K/V


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding (rotate-half / NeoX layout) and its scaling."""

    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear: positions are divided by it; llama3: low-frequency scale-down
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        assert self.type in ROPE_TYPES, self.type
        assert self.theta > 0 and self.factor > 0

    def inv_freq(self, head_dim: int) -> list[float]:
        """Per-pair inverse frequencies, as transformers computes them (float64 here)."""
        base = [1.0 / self.theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
        if self.type == "linear":
            return [f / self.factor for f in base]
        if self.type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            out = []
            for f in base:
                wavelen = 2 * math.pi / f
                if wavelen > low_wavelen:
                    out.append(f / self.factor)
                elif wavelen < high_wavelen:
                    out.append(f)
                else:
                    smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                        self.high_freq_factor - self.low_freq_factor)
                    out.append((1 - smooth) * f / self.factor + smooth * f)
            return out
        return base


@dataclass(frozen=True)
class ModelSpec:
    """Shape and features of a decoder-only transformer (Llama family)."""

    architecture: str  # the Hugging Face architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    context_len: int  # the longest sequence the compiled model serves
    rope: RopeSpec = field(default_factory=RopeSpec)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q/k/v projections
    o_bias: bool = False  # bias on the output projection
    qk_norm: bool = False
    sliding_window: int | None = None  # the window W of the sliding layers; None: every layer attends globally
    # per layer "global" or "sliding" (window sliding_window); () = every layer sliding if sliding_window is
    # set, else global. Normalised in __post_init__ to one entry per layer.
    layer_types: tuple[str, ...] = ()
    # per layer, the layer whose K/V it attends to: itself for a KV owner, an earlier owner of the same type
    # for a layer that shares (MixAttention / cross-layer KV sharing). () = every layer owns its KV.
    kv_sources: tuple[int, ...] = ()
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        assert self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"
        assert self.num_kv_heads > 0 and self.num_q_heads % self.num_kv_heads == 0, \
            f"num_attention_heads ({self.num_q_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
        assert self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim must be positive and even, got {self.head_dim}"
        assert self.num_layers > 0, f"num_hidden_layers must be positive, got {self.num_layers}"
        assert self.context_len > 0, f"the context length must be positive, got {self.context_len}"
        assert min(self.vocab_size, self.hidden_size, self.intermediate_size) > 0, "sizes must be positive"
        L = self.num_layers
        types = tuple(self.layer_types) or (("sliding" if self.sliding_window else "global"),) * L
        sources = tuple(int(x) for x in self.kv_sources) or tuple(range(L))
        object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "kv_sources", sources)
        assert len(types) == L and set(types) <= set(LAYER_TYPES), \
            f"layer_types needs {L} entries of {LAYER_TYPES}, got {types}"
        assert "sliding" not in types or (self.sliding_window or 0) > 0, "sliding layers need a sliding_window"
        assert len(sources) == L, f"kv_sources needs {L} entries, got {len(sources)}"
        for i, src in enumerate(sources):
            assert 0 <= src <= i, f"layer {i} takes its KV from layer {src}: a source must be this or an earlier layer"
            assert sources[src] == src, f"layer {i} takes its KV from layer {src}, which itself shares another's"
            assert types[src] == types[i], f"layer {i} ({types[i]}) shares the KV of layer {src} ({types[src]})"

    @property
    def num_groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def grouped_kv(self) -> bool:
        """Whether the layers keep KV differently (a sliding window, or shared KV): such a model is served
        by kiln's grouped KV cache (passes/lower_paged_groups.py, runtime/kv_groups.py), not TVM's."""
        return "sliding" in self.layer_types or any(src != i for i, src in enumerate(self.kv_sources))

    @property
    def kv_owners(self) -> dict[str, tuple[int, ...]]:
        """The layers that store K/V (their own), per attention type: {"global": (...), "sliding": (...)}."""
        out: dict[str, list[int]] = {t: [] for t in LAYER_TYPES}
        for i, (t, src) in enumerate(zip(self.layer_types, self.kv_sources)):
            if src == i:
                out[t].append(i)
        return {t: tuple(v) for t, v in out.items()}

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one layer for one token, in bytes."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every KV-owning layer for one token, in bytes (each owner storing every token)."""
        return sum(len(v) for v in self.kv_owners.values()) * self.kv_bytes_per_token_per_layer

    def kv_bytes(self, seq_len: int) -> dict[str, int]:
        """KV bytes one sequence of ``seq_len`` tokens holds, per attention type: global owners keep every
        token, sliding owners the last ``sliding_window``: (global owners x L + sliding owners x min(L, W))."""
        owners, per = self.kv_owners, self.kv_bytes_per_token_per_layer
        window = min(seq_len, self.sliding_window or seq_len)
        return {"global": len(owners["global"]) * seq_len * per, "sliding": len(owners["sliding"]) * window * per}

    @property
    def sm_scale(self) -> float:
        return self.head_dim ** -0.5

    def replace(self, **changes: Any) -> "ModelSpec":
        if "sliding_window" in changes and "layer_types" not in changes and len(set(self.layer_types)) == 1:
            changes["layer_types"] = ()  # uniform layers follow the window again: all sliding, or all global
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"], d["kv_sources"] = list(self.layer_types), list(self.kv_sources)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"], d["kv_sources"] = tuple(d.get("layer_types", ())), tuple(d.get("kv_sources", ()))
        return cls(**d)


def shared_kv_params(kv_sources: tuple[int, ...]) -> set[str]:
    """The K/V parameters of layers that read another layer's KV (``ModelSpec.kv_sources``): the reference
    form has them, passes/share_kv.py removes them, a checkpoint trained that way lacks them."""
    return {f"layers.{i}.{p}" for i, src in enumerate(kv_sources) if src != i for p in KV_PARAMS}

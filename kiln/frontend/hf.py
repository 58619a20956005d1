"""Import a Hugging Face checkpoint directory: config.json -> ModelSpec, safetensors -> kiln parameters.

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``) checkpoints in
float32, float16 or bfloat16 are read; weights are cast to the compile dtype. Every problem a user
can cause (missing files, a truncated shard, a missing tensor, a wrong shape, an unsupported
architecture or feature) raises a CheckpointError / UnsupportedModelError naming it.

A pre-quantized checkpoint (config.json ``quantization_config``) is read when it is AutoAWQ's GEMM
format with 4 bits, groups of 128 and zero points (``prequantized``): each decoder linear's
``X.weight`` is then stored as ``X.qweight`` / ``X.qzeros`` / ``X.scales``, read as stored for
kiln/quant/autoawq.py to convert. Any other quantization_config is an UnsupportedModelError.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedModelError
from ..ir.spec import DTYPES, ModelSpec, RopeSpec
from .registry import ARCHITECTURES, Architecture

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not valid: expected a JSON object, got {type(data).__name__}")
    return data


def architecture_of(config: dict[str, Any]) -> Architecture:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    got = ", ".join(names) or f"model_type={config.get('model_type')!r} with no 'architectures'"
    raise UnsupportedModelError(
        f"unsupported architecture {got}; kiln supports: {', '.join(sorted(ARCHITECTURES))}")


@dataclass(frozen=True)
class PreQuantized:
    """How a pre-quantized checkpoint stores its decoder linears: each ``X.weight`` is replaced by the
    tensors ``X.<suffix>``, read as stored (no cast, no shape check here)."""

    source_format: str  # recorded in the artifact's manifest options
    scheme: str  # the kiln scheme (kiln/quant/schemes.py) the stored tensors convert to, without calibration
    suffixes: tuple[str, ...]


AUTOAWQ_GEMM = PreQuantized("autoawq", "awq-w4g128", ("qweight", "qzeros", "scales"))
# transformers' AwqConfig `backend` values that name no packing (the loader's kernel choice, or AutoAWQ itself)
_AWQ_GEMM_BACKENDS = (None, "autoawq", "auto", "gemm")


def prequantized_of(config: dict[str, Any]) -> PreQuantized | None:
    """None for a float checkpoint; AUTOAWQ_GEMM for the one quantized format kiln reads; else raise.

    AutoAWQ writes ``{"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
    "version": "gemm"}`` (its own quant_config.json spells ``w_bit`` / ``q_group_size``); transformers 5
    reads the packing from ``version`` or ``format`` and calls the llm-awq packing ``backend: "llm-awq"``."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"config.json has a quantization_config that is not an object: {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise UnsupportedModelError(
            f"pre-quantized checkpoints with quant_method={method!r} are not supported; kiln loads AutoAWQ GEMM "
            f"checkpoints (awq, 4 bits, group 128) or quantizes a float checkpoint itself with --quant")
    packing = str(qc.get("format") or qc.get("version") or "gemm").lower()
    settings = {"bits": qc.get("bits", qc.get("w_bit", 4)),
                "group_size": qc.get("group_size", qc.get("q_group_size", 128)),
                "zero_point": qc.get("zero_point", True), "version": packing, "backend": qc.get("backend")}
    wanted = {"bits": (4,), "group_size": (128,), "zero_point": (True,), "version": ("gemm",),
              "backend": _AWQ_GEMM_BACKENDS}
    bad = [f"{k}={v!r}" for k, v in settings.items() if v not in wanted[k]]
    if bad:
        raise UnsupportedModelError(
            f"AutoAWQ checkpoint with {', '.join(bad)} is not supported: kiln loads AutoAWQ's GEMM packing with "
            f"bits=4, group_size=128, zero_point=true (as awq-w4g128); re-quantize with those settings, or "
            f"compile the float checkpoint with --quant")
    return AUTOAWQ_GEMM


def prequantized(model_dir: Path) -> PreQuantized | None:
    """How ``model_dir``'s checkpoint is pre-quantized (None: a float checkpoint); raises if unsupported."""
    return prequantized_of(_read_json(Path(model_dir) / "config.json"))


def rope_spec(config: dict[str, Any]) -> RopeSpec:
    # transformers >= 5 writes rope_parameters; older configs rope_theta + rope_scaling.
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rtype = merged.get("rope_type", merged.get("type", "default"))
    if rtype == "default":
        return RopeSpec(theta=float(theta))
    if rtype == "linear":
        return RopeSpec(theta=float(theta), type="linear", factor=float(merged["factor"]))
    if rtype == "llama3":
        return RopeSpec(theta=float(theta), type="llama3", factor=float(merged["factor"]),
                        low_freq_factor=float(merged["low_freq_factor"]),
                        high_freq_factor=float(merged["high_freq_factor"]),
                        original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
    raise UnsupportedModelError(f"unsupported rope scaling type {rtype!r}; kiln supports default, linear, llama3")


HF_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "sliding"}


def _attention_layout(config: dict[str, Any], ctx: int) -> tuple[int | None, tuple[str, ...], tuple[int, ...]]:
    """(sliding window, per-layer types, per-layer KV sources) from a config.

    Types: ``layer_types`` (transformers 5: "full_attention" / "sliding_attention"); Qwen2/Qwen3's older
    ``max_window_layers``; Mistral-style ``sliding_window`` alone (every layer slides);
    ``use_sliding_window: false`` (none does). A window at least as long as the compiled context can never
    take effect: those layers are global. KV sources: kiln's ``kv_sources`` (per layer, the absolute index
    of the layer whose K/V it attends to; its own index for an owner: docs/mixattention.md), or
    ``num_kv_shared_layers`` (the last N layers reuse the KV of the last earlier layer of the same type)."""
    n = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is None and window is not None and "max_window_layers" in config:
        first = int(config["max_window_layers"])  # Qwen2/Qwen3 before transformers 5: layers from it on slide
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * n
    if config.get("use_sliding_window") is False:
        types = ["full_attention"] * n
    unknown = sorted({t for t in types if t not in HF_LAYER_TYPES})
    if unknown or len(types) != n:
        raise UnsupportedModelError(f"layer_types {unknown or types} are not supported; kiln supports "
                                    f"{', '.join(HF_LAYER_TYPES)} ({n} entries)")
    kinds = [HF_LAYER_TYPES[t] for t in types]
    if "sliding" in kinds and window is None:
        raise UnsupportedModelError("layer_types has sliding_attention layers but the config has no sliding_window")
    if "sliding" in kinds and int(window) >= ctx:
        kinds = ["global"] * n
    if "sliding" not in kinds:
        window = None
    sources = list(range(n))
    if config.get("kv_sources") is not None:
        sources = [int(x) for x in config["kv_sources"]]
    elif config.get("num_kv_shared_layers"):
        first_shared = n - int(config["num_kv_shared_layers"])
        for i in range(first_shared, n):
            owners = [j for j in range(first_shared) if kinds[j] == kinds[i]]
            if not owners:
                raise UnsupportedModelError(f"layer {i} shares KV but no earlier layer is {kinds[i]}")
            sources[i] = owners[-1]
    return (int(window) if window else None), tuple(kinds), tuple(sources)


def eos_ids(model_dir: Path, config: dict[str, Any]) -> tuple[int, ...]:
    gen = model_dir / "generation_config.json"
    eos = _read_json(gen).get("eos_token_id") if gen.exists() else None
    if eos is None:
        eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def check_context_len(context_len: int | None, config: dict, where) -> None:
    """Refuse a context length beyond the model's max_position_embeddings (where the config states one): RoPE
    and the weights were trained for no longer sequences."""
    max_pos = config.get("max_position_embeddings")
    if context_len and max_pos and context_len > int(max_pos):
        raise UnsupportedModelError(f"--context-len {context_len} is beyond the model's max_position_embeddings "
                                    f"({int(max_pos)}, {where}); pass --context-len {int(max_pos)} or less")


def load_spec(model_dir: Path, dtype: str | None = None, context_len: int | None = None,
              kv_sources: tuple[int, ...] | None = None) -> ModelSpec:
    """``kv_sources``: a sharing map given by the user (``kiln compile --kv-sharing``), over the config's."""
    spec = _load_spec(model_dir, dtype, context_len)
    if kv_sources is None:
        return spec
    try:
        return spec.replace(kv_sources=tuple(kv_sources))
    except AssertionError as e:
        raise UnsupportedModelError(f"--kv-sharing {','.join(map(str, kv_sources))} does not fit {spec.num_layers} "
                                    f"layers of types {','.join(spec.layer_types)}: {e}") from None


def _load_spec(model_dir: Path, dtype: str | None, context_len: int | None) -> ModelSpec:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory (expected a Hugging Face checkpoint directory)")
    config = _read_json(model_dir / "config.json")
    arch = architecture_of(config)
    prequantized_of(config)  # an unsupported quantized checkpoint fails here, before any weight is read
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch.name} with mlp_bias=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act={config['hidden_act']!r} is not supported (only silu)")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        max_pos = int(config.get("max_position_embeddings", 4096))
        check_context_len(context_len, config, model_dir / "config.json")
        ctx = context_len or max_pos
        window, layer_types, kv_sources = _attention_layout(config, ctx)
        bias = config.get("attention_bias", False)
        if dtype is None:
            dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        if dtype not in DTYPES:
            raise UnsupportedModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        return ModelSpec(
            architecture=arch.name,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_q_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            context_len=ctx,
            rope=rope_spec(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(bias if arch.qkv_bias is None else arch.qkv_bias),
            o_bias=bool(bias if arch.o_bias is None else arch.o_bias),
            qk_norm=arch.qk_norm,
            sliding_window=window,
            layer_types=layer_types,
            kv_sources=kv_sources,
            dtype=dtype,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids(model_dir, config),
        )
    except KeyError as e:
        raise CheckpointError(f"{model_dir / 'config.json'} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'} has an invalid value: {e}") from None


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in model_dir.iterdir())
        raise CheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {model_dir} (found: {', '.join(found)}); "
            "kiln reads safetensors checkpoints only")
    return {name: single for name in _safetensors_keys(single)}


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_weights(model_dir: Path, spec: ModelSpec, names: dict[str, tuple[int, ...]],
                 pre: PreQuantized | None = None):
    """Read the tensors kiln needs, as torch tensors of ``spec.dtype``, keyed by kiln parameter name.

    ``names`` maps each kiln parameter name to its expected shape (from the reference builder). With
    ``pre``, a parameter whose ``X.weight`` the checkpoint stores quantized (``X.<first suffix>`` is
    present instead) comes back as ``NAME.<suffix>`` for every suffix of ``pre``, as stored.
    """
    import torch
    from safetensors import safe_open

    model_dir = Path(model_dir)
    arch = ARCHITECTURES[spec.architecture]
    files = _weight_files(model_dir)
    want: dict[str, str] = {}
    as_stored: set[str] = set()  # pre-quantized tensors: no cast, their shapes are checked by their converter
    for kname in names:
        m = re.match(r"layers\.(\d+)\.(.*)", kname)
        tmpl = f"layers.{{i}}.{m.group(2)}" if m else kname
        hf = arch.weights[tmpl].replace("{i}", m.group(1)) if m else arch.weights[tmpl]
        base = hf.removesuffix(".weight")
        if pre is not None and hf not in files and f"{base}.{pre.suffixes[0]}" in files:
            for suffix in pre.suffixes:
                want[f"{kname}.{suffix}"] = f"{base}.{suffix}"
                as_stored.add(f"{kname}.{suffix}")
        else:
            want[kname] = hf
    missing = sorted({hf for hf in want.values() if hf not in files})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir} lacks weights {', '.join(missing[:5])}{more}")
    by_file: dict[Path, list[str]] = {}
    for kname, hf in want.items():
        by_file.setdefault(files[hf], []).append(kname)
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    out = {}
    from tqdm import tqdm

    bar = tqdm(total=len(want), desc="loading weights", unit="tensor", leave=False,
               disable=not sys.stderr.isatty() or len(want) < 64)
    for path, knames in by_file.items():
        if not path.exists():
            raise CheckpointError(f"weight shard {path.name} listed in the index is missing from {model_dir}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for kname in knames:
                    t = f.get_tensor(want[kname])
                    if kname not in as_stored:
                        if tuple(t.shape) != tuple(names[kname]):
                            raise CheckpointError(f"{want[kname]} in {path.name} has shape {tuple(t.shape)}, "
                                                  f"config.json implies {tuple(names[kname])}")
                        t = t.to(dt).contiguous()
                    out[kname] = t
                    bar.update()
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    bar.close()
    return out


def tokenizer_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise CheckpointError(f"{model_dir} has no tokenizer.json (kiln needs a fast tokenizer to serve the model)")
    return [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).exists()]

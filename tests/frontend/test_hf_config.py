"""kiln.frontend.hf on hand-written checkpoints: config.json -> ModelSpec, and every error a user can cause.

Unit tier: no compile. Configs are written by hand in both the transformers-5 layout (``rope_parameters``)
and the older one (``rope_theta`` + ``rope_scaling``); broken checkpoints start from a valid
``conftest.make_hf_model`` checkpoint and break one thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, make_hf_model
from kiln.errors import CheckpointError, KilnError, UnsupportedModelError
from kiln.frontend.hf import load_spec
from kiln.ir.spec import RopeSpec

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# A Llama config as transformers 5 writes it.
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 320,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def write_config(root: Path, base: dict | None = None, drop: tuple[str, ...] = (), generation: dict | None = None,
                 **changes) -> Path:
    """A checkpoint directory holding config.json (``base`` minus ``drop``, then ``changes``) and, when
    given, generation_config.json."""
    cfg = {k: v for k, v in (LLAMA if base is None else base).items() if k not in drop}
    cfg.update(changes)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (root / "generation_config.json").write_text(json.dumps(generation))
    return root


def mistral(**changes) -> dict:
    return {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", **changes}


def qwen2(**changes) -> dict:
    cfg = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_window_layers": 28,
           "use_sliding_window": False, "sliding_window": None, **changes}
    cfg.pop("attention_bias")
    return cfg


# ----------------------------------------------------------------------------------------------- spec


def test_llama_spec(tmp_path):
    spec = load_spec(write_config(tmp_path))
    assert spec.architecture == "LlamaForCausalLM"
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers) == (320, 64, 128, 2)
    assert (spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.rms_norm_eps == 1e-5
    assert spec.context_len == 256
    assert spec.rope == RopeSpec(theta=10000.0)
    assert not spec.tie_word_embeddings and not spec.attention_bias and not spec.o_bias and not spec.qk_norm
    assert spec.sliding_window is None
    assert spec.dtype == "float32"
    assert spec.bos_token_id == 1 and spec.eos_token_ids == (2,)


ROPE_CASES = {
    # transformers >= 5: everything under rope_parameters
    "v5-default": ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
                   RopeSpec(theta=500000.0)),
    "v5-linear": ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}},
                  RopeSpec(theta=10000.0, type="linear", factor=4.0)),
    "v5-llama3": ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3_SCALING}},
                  RopeSpec(theta=500000.0, type="llama3", **LLAMA3_SCALING)),
    # older configs: rope_theta at the top level, rope_scaling separate (or null, or absent)
    "old-theta": ({"rope_theta": 500000.0}, RopeSpec(theta=500000.0)),
    "old-null-scaling": ({"rope_theta": 1000000.0, "rope_scaling": None}, RopeSpec(theta=1000000.0)),
    "old-linear-type-key": ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
                            RopeSpec(theta=10000.0, type="linear", factor=2.0)),
    "old-linear": ({"rope_theta": 20000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                   RopeSpec(theta=20000.0, type="linear", factor=2.0)),
    "old-llama3": ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
                   RopeSpec(theta=500000.0, type="llama3", **LLAMA3_SCALING)),
    "none-given": ({}, RopeSpec(theta=10000.0)),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_forms(tmp_path, case):
    changes, want = ROPE_CASES[case]
    spec = load_spec(write_config(tmp_path, drop=("rope_parameters",), **changes))
    assert spec.rope == want


@pytest.mark.parametrize("case", ["v5-linear", "v5-llama3", "old-linear-type-key", "old-llama3", "old-theta"])
def test_rope_inv_freq_matches_transformers(tmp_path, case):
    """kiln reads each config form the way transformers does: same inverse frequencies, no attention scaling."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    changes, _ = ROPE_CASES[case]
    d = write_config(tmp_path, drop=("rope_parameters",), **changes)
    spec = load_spec(d)
    cfg = transformers.LlamaConfig.from_pretrained(d)
    rot = LlamaRotaryEmbedding(cfg)
    assert rot.attention_scaling == 1.0
    want = rot.inv_freq.double().tolist()
    assert spec.rope.inv_freq(spec.head_dim) == pytest.approx(want, rel=1e-6)


def test_head_dim_default_and_explicit(tmp_path):
    assert load_spec(write_config(tmp_path / "a")).head_dim == 64 // 4
    assert load_spec(write_config(tmp_path / "b", head_dim=32)).head_dim == 32
    assert load_spec(write_config(tmp_path / "c", head_dim=None)).head_dim == 16  # null means the default


def test_gqa_and_mha(tmp_path):
    gqa = load_spec(write_config(tmp_path / "gqa", num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    assert (gqa.num_q_heads, gqa.num_kv_heads, gqa.num_groups) == (8, 2, 4)
    mqa = load_spec(write_config(tmp_path / "mqa", num_key_value_heads=1))
    assert (mqa.num_kv_heads, mqa.num_groups) == (1, 4)
    mha = load_spec(write_config(tmp_path / "mha", drop=("num_key_value_heads",)))  # absent: one kv head per q head
    assert mha.num_kv_heads == mha.num_q_heads == 4


def test_gqa_heads_not_divisible(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_spec(write_config(tmp_path, num_attention_heads=4, num_key_value_heads=3))


def test_context_len(tmp_path):
    d = write_config(tmp_path)
    assert load_spec(d).context_len == 256
    assert load_spec(d, context_len=64).context_len == 64
    with pytest.raises(UnsupportedModelError, match=r"--context-len 1024 is beyond the model's max_position_embeddings "
                                                    r"\(256, .*config.json\); pass --context-len 256 or less"):
        load_spec(d, context_len=1024)  # refused, not capped: the user asked for more than the model serves
    del_max = json.loads((d / "config.json").read_text())
    del del_max["max_position_embeddings"]
    (d / "config.json").write_text(json.dumps(del_max))
    assert load_spec(d, context_len=8192).context_len == 8192  # no stated maximum: the user's length


@pytest.mark.parametrize("name, config, context_len, want", [
    ("mistral window >= context", mistral(sliding_window=4096), None, None),
    ("mistral window == context", mistral(sliding_window=256), None, None),
    ("mistral window < context", mistral(sliding_window=128), None, 128),
    ("mistral window < context cut by context_len", mistral(sliding_window=128), 64, None),
    ("mistral window null", mistral(sliding_window=None), None, None),
    ("qwen2 use_sliding_window false", qwen2(use_sliding_window=False, sliding_window=32), None, None),
    ("qwen2 v5 all full layers", qwen2(layer_types=["full_attention"] * 2), None, None),
    ("qwen2 v5 all sliding layers", qwen2(use_sliding_window=True, sliding_window=32,
                                          layer_types=["sliding_attention"] * 2), None, 32),
    # older Qwen2 configs have no layer_types: layers >= max_window_layers slide (as transformers reads them)
    ("qwen2 old, window on no layer", qwen2(use_sliding_window=True, sliding_window=32, max_window_layers=28),
     None, None),
    ("qwen2 old, window on every layer", qwen2(use_sliding_window=True, sliding_window=32, max_window_layers=0),
     None, 32),
])
def test_sliding_window(tmp_path, name, config, context_len, want):
    assert load_spec(write_config(tmp_path, base=config), context_len=context_len).sliding_window == want


@pytest.mark.parametrize("config", [
    qwen2(use_sliding_window=True, sliding_window=32, layer_types=["full_attention", "sliding_attention"]),
    qwen2(use_sliding_window=True, sliding_window=32, max_window_layers=1),  # old form, layer 1 slides
], ids=["v5", "old"])
def test_mixed_sliding_and_global_layers_read_per_layer_and_lowered_to_the_grouped_cache(tmp_path, config):
    from kiln.frontend.reference import build_reference

    from kiln.codegen.targets import resolve_target
    from kiln.ir.abi import GROUPED_ENTRY_POINTS
    from kiln.ir.attention import is_attention
    from kiln.passes.pipeline import build_pipeline, run_pipeline

    spec = load_spec(write_config(tmp_path, base=config))
    assert spec.layer_types == ("global", "sliding") and spec.sliding_window == 32 and spec.kv_sources == (0, 1)
    mod = build_reference(spec)  # each layer's attention with its own window
    windows = {int(f.attrs["kiln.layer_id"]): int(f.attrs["kiln.sliding_window"])
               for _, f in mod.functions_items() if is_attention(f)}
    assert windows == {0: -1, 1: 32}
    out = run_pipeline(build_pipeline(resolve_target("cpu"), spec, fuse=False), mod).mod  # kiln's grouped KV cache
    assert {gv.name_hint for gv, f in out.functions_items() if "global_symbol" in (f.attrs or {})} == \
        set(GROUPED_ENTRY_POINTS)
    kernels = {gv.name_hint for gv, _ in out.functions_items()}
    assert {"kv_attention_o0", "kv_attention_o1_w32", "kv_append_o0", "kv_append_o1"} <= kernels


# Character.AI's 13-layer map (llm-foundry's MPT docstring): 1 global KV owner (L0) and 4 sliding owners
CHARACTER_AI_TYPES = ["full_attention", *["sliding_attention"] * 5, "full_attention", *["sliding_attention"] * 5,
                      "full_attention"]
CHARACTER_AI_SOURCES = [0, 1, 1, 3, 3, 3, 0, 7, 7, 9, 9, 9, 0]


def test_kiln_kv_sources_config_gives_the_mixattention_spec(tmp_path):
    from kiln.frontend.reference import build_reference

    cfg = qwen2(use_sliding_window=True, sliding_window=64, num_hidden_layers=13, layer_types=CHARACTER_AI_TYPES,
                kv_sources=CHARACTER_AI_SOURCES, max_position_embeddings=4096)
    spec = load_spec(write_config(tmp_path, base=cfg))
    assert spec.kv_owners == {"global": (0,), "sliding": (1, 3, 7, 9)}
    per = spec.kv_bytes_per_token_per_layer
    for L in (10, 64, 2000):  # global owners x L + sliding owners x min(L, W)
        assert sum(spec.kv_bytes(L).values()) == per * (1 * L + 4 * min(L, 64))
    assert spec.grouped_kv
    mod = build_reference(spec)  # every layer owns its KV until share_kv (the pipeline applies it)
    assert not any("kiln.kv_source" in (f.attrs or {}) for _, f in mod.functions_items())


def test_num_kv_shared_layers_reuse_the_last_owner_of_their_type(tmp_path):
    cfg = qwen2(use_sliding_window=True, sliding_window=64, num_hidden_layers=6, max_position_embeddings=4096,
                layer_types=["sliding_attention", "full_attention"] * 3, num_kv_shared_layers=2)
    spec = load_spec(write_config(tmp_path, base=cfg))
    assert spec.kv_sources == (0, 1, 2, 3, 2, 3)


@pytest.mark.parametrize("sources, message", [
    ([0, 0, 1, 3, 3, 3, 0, 7, 7, 9, 9, 9, 0], "shares the KV of layer 0"),  # sliding layer 1 -> global layer 0
    ([0, 1, 2, 3, 3, 3, 0, 7, 7, 9, 9, 9, 13], "earlier layer"),
    ([0, 1, 1, 2, 3, 3, 0, 7, 7, 9, 9, 9, 0], "itself shares another's"),
])
def test_bad_kv_sources_are_refused(tmp_path, sources, message):
    from kiln.errors import CheckpointError

    cfg = qwen2(use_sliding_window=True, sliding_window=64, num_hidden_layers=13, layer_types=CHARACTER_AI_TYPES,
                kv_sources=sources, max_position_embeddings=4096)
    with pytest.raises(CheckpointError, match=message):
        load_spec(write_config(tmp_path, base=cfg))


def test_sliding_window_agrees_with_transformers(tmp_path):
    """For the window configs above, kiln's verdict matches transformers' own layer_types."""
    import transformers

    for i, (cfg, cls) in enumerate([(qwen2(use_sliding_window=True, sliding_window=32, max_window_layers=28),
                                     transformers.Qwen2Config),
                                    (qwen2(use_sliding_window=True, sliding_window=32, max_window_layers=0),
                                     transformers.Qwen2Config),
                                    (qwen2(use_sliding_window=False, sliding_window=32), transformers.Qwen2Config)]):
        d = write_config(tmp_path / str(i), base=cfg)
        hf = cls.from_pretrained(d)
        hf_window = hf.sliding_window if "sliding_attention" in hf.layer_types else None
        assert load_spec(d).sliding_window == hf_window, cfg


@pytest.mark.parametrize("generation, config_eos, want", [
    ({"eos_token_id": 7}, 2, (7,)),  # generation_config.json wins over config.json
    ({"eos_token_id": [2, 7, 9]}, 2, (2, 7, 9)),
    ({"bos_token_id": 1}, 2, (2,)),  # no eos in generation_config.json: config.json's
    (None, 2, (2,)),  # no generation_config.json
    (None, [2, 5], (2, 5)),
    (None, None, ()),
])
def test_eos_ids(tmp_path, generation, config_eos, want):
    spec = load_spec(write_config(tmp_path, generation=generation, eos_token_id=config_eos))
    assert spec.eos_token_ids == want
    assert all(type(t) is int for t in spec.eos_token_ids)


def test_dtype(tmp_path):
    assert load_spec(write_config(tmp_path / "a", dtype="bfloat16")).dtype == "bfloat16"
    assert load_spec(write_config(tmp_path / "b", drop=("dtype",), torch_dtype="float16")).dtype == "float16"
    assert load_spec(write_config(tmp_path / "c", drop=("dtype",))).dtype == "float32"
    assert load_spec(write_config(tmp_path / "d", dtype="bfloat16"), dtype="float32").dtype == "float32"
    with pytest.raises(UnsupportedModelError, match="int8"):
        load_spec(write_config(tmp_path / "e"), dtype="int8")


def test_architecture_features(tmp_path):
    llama_bias = load_spec(write_config(tmp_path / "l", attention_bias=True))
    assert llama_bias.attention_bias and llama_bias.o_bias  # Llama's attention_bias covers o_proj too
    q2 = load_spec(write_config(tmp_path / "q2", base=qwen2(tie_word_embeddings=True)))
    assert q2.attention_bias and not q2.o_bias and q2.tie_word_embeddings and not q2.qk_norm
    m = load_spec(write_config(tmp_path / "m", base=mistral(attention_bias=True)))
    assert not m.attention_bias and not m.o_bias
    q3 = load_spec(write_config(tmp_path / "q3", base={**LLAMA, "architectures": ["Qwen3ForCausalLM"],
                                                         "model_type": "qwen3", "head_dim": 32}))
    assert q3.qk_norm and q3.head_dim == 32 and not q3.attention_bias


TRANSFORMERS_WRITTEN = {  # conftest variant -> what the config.json transformers wrote for it must give
    "llama": lambda s: s.num_kv_heads == 2 and not s.tie_word_embeddings and s.rope.type == "default",
    "llama3-tied": lambda s: s.tie_word_embeddings and s.dtype == "bfloat16" and s.rope == RopeSpec(
        theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64),
    "llama-linear": lambda s: s.rope == RopeSpec(type="linear", factor=2.0) and s.num_kv_heads == 4
    and s.dtype == "float16",
    "mistral": lambda s: s.head_dim == 16 and s.sliding_window is None and s.architecture == "MistralForCausalLM",
    "qwen2": lambda s: s.attention_bias and not s.o_bias and s.tie_word_embeddings and s.sliding_window is None,
    "qwen3": lambda s: s.qk_norm and s.head_dim == 32 and not s.attention_bias,
}


@pytest.mark.parametrize("variant", TRANSFORMERS_WRITTEN)
def test_configs_written_by_transformers(zoo, variant):
    check = TRANSFORMERS_WRITTEN[variant]
    model_dir, _ = zoo.hf(variant)
    spec = load_spec(model_dir)
    assert spec.vocab_size == BASE_CONFIG["vocab_size"] and spec.context_len == 256 and spec.eos_token_ids == (2,)
    assert check(spec), spec


# ------------------------------------------------------------------------------------------ spec errors


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*not a directory"):
        load_spec(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_spec(f)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_spec(tmp_path)


@pytest.mark.parametrize("text", ['{"architectures": ["LlamaForCausalLM"], ', "", b"\xff\xfe{}"],
                         ids=["cut", "empty", "binary"])
def test_invalid_json(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_spec(tmp_path)


@pytest.mark.parametrize("text", ["[]", '"LlamaForCausalLM"', "null", "3"])
def test_config_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        load_spec(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
                                   "num_hidden_layers"])
def test_missing_required_field(tmp_path, field):
    with pytest.raises(CheckpointError, match=f"config.json lacks the field '{field}'"):
        load_spec(write_config(tmp_path, drop=(field,)))


@pytest.mark.parametrize("changes", [{"hidden_size": "big"}, {"num_hidden_layers": 0}, {"vocab_size": None},
                                     {"head_dim": 15}], ids=["str", "zero-layers", "null", "odd-head-dim"])
def test_invalid_value(tmp_path, changes):
    with pytest.raises(CheckpointError, match="invalid value"):
        load_spec(write_config(tmp_path, **changes))


def test_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        load_spec(write_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    assert all(name in msg for name in SUPPORTED), msg


def test_no_architectures_field(tmp_path):
    with pytest.raises(UnsupportedModelError) as e:
        load_spec(write_config(tmp_path, drop=("architectures",)))
    msg = str(e.value)
    assert "model_type='llama'" in msg and all(name in msg for name in SUPPORTED), msg


@pytest.mark.parametrize("changes", [
    {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 64}},
    {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    {"rope_parameters": None, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
], ids=["v5-yarn", "old-yarn", "old-dynamic"])
def test_unsupported_rope_type(tmp_path, changes):
    with pytest.raises(UnsupportedModelError, match=r"rope.*('yarn'|'dynamic').*default, linear, llama3"):
        load_spec(write_config(tmp_path, **changes))


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_unsupported_hidden_act(tmp_path, act):
    with pytest.raises(UnsupportedModelError, match=f"hidden_act='{act}'.*silu"):
        load_spec(write_config(tmp_path, hidden_act=act))


def test_mlp_bias_unsupported(tmp_path):
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        load_spec(write_config(tmp_path, mlp_bias=True))


# ---------------------------------------------------------------------------------- weight/import errors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Valid checkpoints to break: a single-file float32 one and a sharded bfloat16 one."""
    root = tmp_path_factory.mktemp("ckpt")
    make_hf_model("llama", root / "single")
    make_hf_model("llama3-tied", root / "sharded")
    return root


@pytest.fixture
def single(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints / "single", tmp_path / "single"))


@pytest.fixture
def sharded(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints / "sharded", tmp_path / "sharded"))


def _import(d, **kw):
    from kiln.frontend import import_hf

    return import_hf(d, **kw)


def test_valid_checkpoints_import(single, sharded):
    """The unbroken copies import: every failure below comes from the one thing broken."""
    import torch
    from safetensors.torch import load_file

    from kiln.frontend.reference import param_shapes

    a = _import(single)
    assert {k: tuple(v.shape) for k, v in a.params.items()} == param_shapes(a.spec)
    assert a.params["layers.1.up_proj"].dtype == torch.float32
    assert torch.equal(a.params["layers.1.up_proj"], load_file(single / "model.safetensors")[
        "model.layers.1.mlp.up_proj.weight"])
    assert {p.name for p in a.tokenizer_files} >= {"tokenizer.json", "tokenizer_config.json"}
    b = _import(sharded, dtype="float32")
    assert b.spec.dtype == "float32" and b.spec.tie_word_embeddings and "lm_head" not in b.params
    assert all(v.dtype == torch.float32 for v in b.params.values())
    assert len(list(sharded.glob("model-*.safetensors"))) == 2


def test_no_safetensors(single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*found: .*config\.json.*safetensors"):
        _import(single)


def test_pytorch_bin_only(single):
    (single / "model.safetensors").rename(single / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safetensors checkpoints only"):
        _import(single)


@pytest.mark.parametrize("keep", [0, 6, 0.5, -1], ids=["empty", "header-cut", "half", "last-byte"])
def test_truncated_safetensors(single, keep):
    f = single / "model.safetensors"
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    f.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        _import(single)


def test_garbage_safetensors(single):
    f = single / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(1000))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _import(single)


def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(single):
    _rewrite(single / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weights model\.layers\.1\.mlp\.up_proj\.weight"):
        _import(single)


def test_missing_lm_head(single):
    """An untied model (tie_word_embeddings false) needs lm_head.weight."""
    _rewrite(single / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weights lm_head\.weight"):
        _import(single)


def test_many_missing_tensors(single):
    def drop_layer1(t):
        for k in [k for k in t if k.startswith("model.layers.1.")]:
            del t[k]

    _rewrite(single / "model.safetensors", drop_layer1)
    with pytest.raises(CheckpointError, match=r"lacks weights .* and \d+ more"):
        _import(single)


def test_wrong_shape(single):
    import torch

    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)

    _rewrite(single / "model.safetensors", shrink)
    with pytest.raises(CheckpointError,
                       match=r"model\.layers\.0\.self_attn\.q_proj\.weight .*shape \(64, 32\).*\(64, 64\)"):
        _import(single)


def test_config_disagrees_with_weights(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (single / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight .*shape"):
        _import(single)


def test_sharded_missing_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    (sharded / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[1]} listed in the index is missing"):
        _import(sharded)


def test_sharded_index_names_missing_tensor(sharded):
    p = sharded / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    del index["weight_map"]["model.norm.weight"]
    p.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks weights model\.norm\.weight"):
        _import(sharded)


def test_sharded_index_invalid(sharded):
    p = sharded / "model.safetensors.index.json"
    p.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json is not valid JSON"):
        _import(sharded)
    p.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="index.json has no weight_map"):
        _import(sharded)


def test_sharded_truncated_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a readable safetensors file"):
        _import(sharded)


def test_no_tokenizer(single):
    (single / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        _import(single)
    assert _import(single, with_tokenizer=False).tokenizer_files == []


def test_errors_are_kiln_errors():
    assert issubclass(CheckpointError, KilnError) and issubclass(UnsupportedModelError, KilnError)

"""Supported architectures as data: the Hugging Face architecture name, which features its configs
switch on, and how its weight names map to kiln's parameter names. Adding a Llama-family
architecture is adding an entry here; nothing else dispatches on class names."""

from __future__ import annotations

from dataclasses import dataclass

# kiln parameter name template -> Hugging Face tensor name template ({i} is the layer index).
LLAMA_WEIGHTS: dict[str, str] = {
    "embed_tokens": "model.embed_tokens.weight",
    "layers.{i}.input_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.o_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down_proj": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


@dataclass(frozen=True)
class Architecture:
    name: str
    weights: dict[str, str]
    # q/k/v projection bias: True/False fixed by the architecture, or None to read config "attention_bias".
    qkv_bias: bool | None = None
    # o_proj bias: likewise.
    o_bias: bool | None = None
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", LLAMA_WEIGHTS),
        Architecture("MistralForCausalLM", LLAMA_WEIGHTS, qkv_bias=False, o_bias=False),
        Architecture("Qwen2ForCausalLM", LLAMA_WEIGHTS, qkv_bias=True, o_bias=False),
        Architecture("Qwen3ForCausalLM", LLAMA_WEIGHTS, qk_norm=True),
    )
}

"""A PyTorch reference of the MixAttention forward: the numerical truth for kiln's share_kv pass and its
per-group KV cache (issue "MixAttention").

A Llama-family decoder whose layers each have an attention type (``spec.layer_types``: "global", or
"sliding" over the last ``spec.sliding_window`` positions, itself included) and a KV source
(``spec.kv_sources``): an owner computes K and V from its own input; a sharing layer computes only its
queries and attends to its source layer's K and V of the same forward (RoPE already applied) — it has
no k_proj/v_proj weights. Weights use kiln's parameter names (frontend/reference.py ``param_shapes``
minus the sharing layers' k/v). Everything is plain float32 on the CPU with full recompute: no
cache, so it is the definition, not an implementation.
"""

from __future__ import annotations

import torch

from kiln.frontend.reference import param_shapes
from kiln.ir.spec import ModelSpec


# Character.AI's 13-layer map (llm-foundry's MPT docstring): L0 global; L1, L3, L7, L9 sliding owners; the
# rest share: 1 global KV owner and 4 sliding owners for 13 attention layers
CHARACTER_AI_TYPES = ("global", *["sliding"] * 5, "global", *["sliding"] * 5, "global")
CHARACTER_AI_SOURCES = (0, 1, 1, 3, 3, 3, 0, 7, 7, 9, 9, 9, 0)


def character_ai_spec(window: int = 64, context_len: int = 512, **kw) -> ModelSpec:
    """A small random-weight-sized model with the Character.AI map (window 64 for testing)."""
    return ModelSpec("MixAttention", **{**dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=13,
                                               num_q_heads=4, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6,
                                               context_len=context_len, sliding_window=window,
                                               layer_types=CHARACTER_AI_TYPES, kv_sources=CHARACTER_AI_SOURCES), **kw})


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """kiln's parameter layout without the K/V projections (and biases) of layers that share KV."""
    sharing = {i for i, src in enumerate(spec.kv_sources) if src != i}
    drop = {f"layers.{i}.{p}" for i in sharing for p in ("k_proj", "v_proj", "k_bias", "v_bias", "k_norm")}
    return {n: s for n, s in param_shapes(spec).items() if n not in drop}


def random_weights(spec: ModelSpec, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (1.0 + 0.1 * torch.randn(s, generator=g)) if n.endswith("norm") else std * torch.randn(s, generator=g)
            for n, s in weight_shapes(spec).items()}


def _rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, inv_freq):  # x: [s, h, d], rotate-half
    f = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def mask(spec: ModelSpec, layer: int, n: int) -> torch.Tensor:
    """[n, n] bool: query i sees key j (causal; within the window for a sliding layer)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = j <= i
    if spec.layer_types[layer] == "sliding":
        allowed &= (i - j) < spec.sliding_window
    return allowed


@torch.no_grad()
def forward(spec: ModelSpec, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [n, V] of the token sequence ``ids`` (positions 0..n-1)."""
    n, d, hq, hkv = len(ids), spec.head_dim, spec.num_q_heads, spec.num_kv_heads
    inv_freq = torch.tensor(spec.rope.inv_freq(d), dtype=torch.float32)
    pos = torch.arange(n)
    x = w["embed_tokens"][torch.tensor(ids)]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # owner layer -> (k, v): [n, hkv, d], RoPE applied

    def lin(h, name, bias=None):
        y = h @ w[name].T
        return y + w[bias] if bias and bias in w else y

    for i in range(spec.num_layers):
        p = f"layers.{i}."
        h = _rms_norm(x, w[p + "input_norm"], spec.rms_norm_eps)
        q = lin(h, p + "q_proj", p + "q_bias").view(n, hq, d)
        if spec.qk_norm:
            q = _rms_norm(q, w[p + "q_norm"], spec.rms_norm_eps)
        q = _rope(q, pos, inv_freq)
        src = spec.kv_sources[i]
        if src == i:
            k = lin(h, p + "k_proj", p + "k_bias").view(n, hkv, d)
            if spec.qk_norm:
                k = _rms_norm(k, w[p + "k_norm"], spec.rms_norm_eps)
            kv[i] = (_rope(k, pos, inv_freq), lin(h, p + "v_proj", p + "v_bias").view(n, hkv, d))
        k, v = kv[src]
        g = hq // hkv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [n, hq, d]
        scores = torch.einsum("ihd,jhd->hij", q, k) * spec.sm_scale
        scores = scores.masked_fill(~mask(spec, i, n)[None], float("-inf"))
        o = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, hq * d)
        x = x + lin(o, p + "o_proj", p + "o_bias")
        h = _rms_norm(x, w[p + "post_attention_norm"], spec.rms_norm_eps)
        x = x + lin(torch.nn.functional.silu(lin(h, p + "gate_proj")) * lin(h, p + "up_proj"), p + "down_proj")
    x = _rms_norm(x, w["final_norm"], spec.rms_norm_eps)
    return x @ (w["embed_tokens"] if spec.tie_word_embeddings else w["lm_head"]).T


def greedy(spec: ModelSpec, w: dict[str, torch.Tensor], prompt: list[int], num_tokens: int) -> list[int]:
    """``num_tokens`` greedy continuations of ``prompt`` (full recompute each step)."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(int(forward(spec, w, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def save_checkpoint(spec: ModelSpec, w: dict[str, torch.Tensor], path) -> None:
    """A Hugging Face-layout Llama checkpoint of a MixAttention model trained that way: config.json with
    ``layer_types`` / ``sliding_window`` and kiln's ``kv_sources``, safetensors without the sharing layers'
    K/V projections."""
    import json
    import re
    from pathlib import Path

    from safetensors.torch import save_file

    from kiln.frontend.registry import LLAMA_WEIGHTS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in w.items():
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        hf = LLAMA_WEIGHTS[f"layers.{{i}}.{m.group(2)}"].replace("{i}", m.group(1)) if m else LLAMA_WEIGHTS[name]
        tensors[hf] = t.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": spec.vocab_size,
              "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_q_heads,
              "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "rms_norm_eps": spec.rms_norm_eps,
              "max_position_embeddings": spec.context_len, "rope_theta": spec.rope.theta, "torch_dtype": "float32",
              "tie_word_embeddings": spec.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
              "sliding_window": spec.sliding_window,
              "layer_types": [{"global": "full_attention", "sliding": "sliding_attention"}[t] for t in spec.layer_types],
              "kv_sources": list(spec.kv_sources)}
    (path / "config.json").write_text(json.dumps(config, indent=1))

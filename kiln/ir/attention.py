"""Canonical attention in Relax: one private composite function per layer, marked with kiln.* attributes.

Reference semantics of ``attention_L{i}(q, k, v) -> o`` over one sequence of ``s`` tokens:

    q: [s, num_q_heads, head_dim], k, v: [s, num_kv_heads, head_dim]   (RoPE *not* applied yet)
    q, k = rope(q, positions 0..s-1), rope(k, positions 0..s-1)          (rotate-half, RopeSpec scaling)
    o[t, h] = softmax_j(q[t, h] . k[j, h // group] * sm_scale  masked to j <= t) @ v[j, h // group]
    o: [s, num_q_heads, head_dim]

The body is ordinary Relax, so the reference form compiles and runs by itself; the attributes carry
everything the paged-attention pass needs to replace the call with the KV-cache builtin, which does
RoPE, append and attention in one kernel. Softmax is computed in float32 whatever the model dtype.
"""

from __future__ import annotations

from .spec import ModelSpec, RopeSpec
from .tvm import relax, te, tirx

OP_ATTR = "kiln.op"
ATTENTION = "attention"


def layer_window(spec, layer_id: int) -> int:
    """The sliding window of layer ``layer_id`` (-1: global), from the spec's per-layer attention types."""
    types = getattr(spec, "layer_types", None)
    sliding = types[layer_id] == "sliding" if types else bool(spec.sliding_window)
    return int(spec.sliding_window) if sliding and spec.sliding_window else -1


def attention_attrs(spec: ModelSpec, layer_id: int) -> dict:
    r = spec.rope
    return {
        OP_ATTR: ATTENTION,
        "kiln.layer_id": layer_id,
        "kiln.num_q_heads": spec.num_q_heads,
        "kiln.num_kv_heads": spec.num_kv_heads,
        "kiln.head_dim": spec.head_dim,
        "kiln.sm_scale": spec.sm_scale,
        "kiln.causal": 1,
        "kiln.sliding_window": layer_window(spec, layer_id),
        "kiln.rope": "normal",
        "kiln.rope_theta": float(r.theta),
        "kiln.rope_type": r.type,
        "kiln.rope_factor": float(r.factor),
        "kiln.rope_low_freq_factor": float(r.low_freq_factor),
        "kiln.rope_high_freq_factor": float(r.high_freq_factor),
        "kiln.rope_original_max_position_embeddings": int(r.original_max_position_embeddings),
    }


def rope_te(x: te.Tensor, inv_freq: te.Tensor, head_dim: int, positions: te.Tensor | None = None):
    """Rotate-half RoPE of ``x[t, h, d]`` at position ``positions[t]`` (default ``t``), in float32."""
    half = head_dim // 2

    def f(t, h, d):
        pair = tirx.floormod(d, half)
        angle = (t if positions is None else positions[t]).astype("float32") * inv_freq[pair]
        xf = x[t, h, d].astype("float32")
        rot = tirx.Select(d < half, -x[t, h, d + half].astype("float32"), x[t, h, d - half].astype("float32"))
        return (xf * tirx.cos(angle) + rot * tirx.sin(angle)).astype(x.dtype)

    return te.compute(x.shape, f, name="rope")


def _causal_mask_te(scores: te.Tensor, window: int):
    lowest = tirx.min_value(scores.dtype)

    def f(h, i, j):
        keep = j <= i
        if window > 0:
            keep = tirx.all(keep, i - j < window)
        return tirx.Select(keep, scores[h, i, j], lowest)

    return te.compute(scores.shape, f, name="causal_mask")


def rope_spec_of(func) -> RopeSpec:
    """The RoPE an attention composite applies, read back from its ``kiln.rope_*`` attributes."""
    a = func.attrs
    return RopeSpec(theta=float(a["kiln.rope_theta"]), type=str(a["kiln.rope_type"]), factor=float(a["kiln.rope_factor"]),
                    low_freq_factor=float(a["kiln.rope_low_freq_factor"]),
                    high_freq_factor=float(a["kiln.rope_high_freq_factor"]),
                    original_max_position_embeddings=int(a["kiln.rope_original_max_position_embeddings"]))


def build_attention_function(bb: relax.BlockBuilder, spec: ModelSpec, layer_id: int) -> relax.GlobalVar:
    """Add ``attention_L{layer_id}`` to the module being built by ``bb`` and return its GlobalVar."""
    hq, hkv, d, dt = spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.dtype
    s = tirx.Var("s", "int64")
    q = relax.Var("q", relax.TensorType([s, hq, d], dt))
    k = relax.Var("k", relax.TensorType([s, hkv, d], dt))
    v = relax.Var("v", relax.TensorType([s, hkv, d], dt))
    inv_freq = relax.const(__import__("numpy").asarray(spec.rope.inv_freq(d), dtype="float32"))
    name = f"attention_L{layer_id}"
    with bb.function(name, [q, k, v], attrs=attention_attrs(spec, layer_id), private=True):
        with bb.dataflow():
            qr = bb.emit_te(rope_te, q, inv_freq, d, primfunc_name_hint="rope")
            kr = bb.emit_te(rope_te, k, inv_freq, d, primfunc_name_hint="rope")
            qh = bb.emit(relax.op.permute_dims(qr, [1, 0, 2]))  # [hq, s, d]
            kh = bb.emit(relax.op.permute_dims(kr, [1, 2, 0]))  # [hkv, d, s]
            vh = bb.emit(relax.op.permute_dims(v, [1, 0, 2]))  # [hkv, s, d]
            if spec.num_groups > 1:  # GQA: kv head j serves q heads j*g .. j*g+g-1
                kh = bb.emit(relax.op.repeat(kh, spec.num_groups, axis=0))
                vh = bb.emit(relax.op.repeat(vh, spec.num_groups, axis=0))
            if dt != "float32":
                qh = bb.emit(relax.op.astype(qh, "float32"))
                kh = bb.emit(relax.op.astype(kh, "float32"))
                vh = bb.emit(relax.op.astype(vh, "float32"))
            scores = bb.emit(relax.op.multiply(relax.op.matmul(qh, kh), relax.const(spec.sm_scale, "float32")))
            scores = bb.emit_te(_causal_mask_te, scores, layer_window(spec, layer_id),
                                primfunc_name_hint="causal_mask")
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            o = bb.emit(relax.op.matmul(probs, vh))  # [hq, s, d]
            if dt != "float32":
                o = bb.emit(relax.op.astype(o, dt))
            o = bb.emit_output(relax.op.permute_dims(o, [1, 0, 2]))  # [s, hq, d]
        gv = bb.emit_func_output(o)
    return bb.get().get_global_var(name) if not isinstance(gv, relax.GlobalVar) else gv


def is_attention(func) -> bool:
    """True for a Relax function that is a kiln attention composite."""
    attrs = getattr(func, "attrs", None)
    return isinstance(func, relax.Function) and attrs is not None and OP_ATTR in attrs and \
        str(attrs[OP_ATTR]) == ATTENTION
